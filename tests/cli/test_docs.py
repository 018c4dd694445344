"""The docs match the code: every command block of README.md runs, and every reference to
docs/design.md in the code names a section that exists.

README blocks, by the HTML comment just above each:
- `<!-- snippet: NAME -->`: a consumer's configuration or program, run by the tests/*.py that
  reads it with dropin_util.snippet("NAME") (checked here: some test must read it);
- `<!-- not-run: WHY -->`: the very few that cannot run inside the suite (at most MAX_NOT_RUN);
- anything else must be a shell block, and is run here by bash (-e -o pipefail) as pasted, in a
  fresh folder holding a `.venv` link to this venv, against a real key service with a softcard
  `mycard` (passphrase in $PIN through the placeholder `PIN=...`) and the files the examples
  name (msg, in, cert.der); the placeholders /path/to/... become real paths, and the ports
  18001/18002 free ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.certs import self_signed
from tests.support.dropin_util import CONFIG_PLACEHOLDER, MODULE_PLACEHOLDER
from tests.support.service import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_NOT_RUN = 3
_BLOCK = re.compile(
    r"(?:<!-- (?P<mark>[^>]*?) -->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M
)


@dataclass(frozen=True)
class Block:
    line: int
    heading: str
    mark: str
    lang: str
    body: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.heading.lower()).strip('-')}"


def blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        start = m.start("lang")
        headings = re.findall(r"^#+ (.*)$", text[:start], re.M)
        heading = headings[-1] if headings else ""
        mark = (m.group("mark") or "").strip()
        line = text.count("\n", 0, start) + 1
        out.append(Block(line, heading, mark, m.group("lang"), m.group("body")))
    return out


RUN = [b for b in blocks() if not b.mark]


def test_every_block_is_run_or_marked() -> None:
    tests_text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("*.py"))
    not_run = []
    for b in blocks():
        if b.mark.startswith("snippet: "):
            name = b.mark.removeprefix("snippet: ")
            # Matched through the formatter's line breaks: snippet(\n    "name", ...).
            found = re.search(rf'snippet\(\s*"{re.escape(name)}"', tests_text)
            assert found, f"no test reads README snippet {name!r}"
        elif b.mark.startswith("not-run: "):
            assert len(b.mark) > len("not-run: ") + 10, f"{b.id}: say why it cannot run"
            not_run.append(b.id)
        else:
            assert not b.mark, f"{b.id}: unknown marker {b.mark!r}"
            assert b.lang in ("sh", ""), f"{b.id}: a {b.lang} block needs a snippet/not-run mark"
    assert len(not_run) <= MAX_NOT_RUN, not_run
    assert len(RUN) >= 4  # the quick start, the service, the consumers' commands
    assert set(EXPECT) <= {b.heading for b in RUN}, "EXPECT names a section with no run block"


# ------------------------------------------------------------------------------------------
# The environment the shell blocks run in.


@dataclass
class Sandbox:
    svc: Any
    pin: str
    module: str


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    from tests.support.service import start_service

    svc = start_service(tmp_path_factory.mktemp("readme-service"))
    try:
        pin = uuid.uuid4().hex
        client = KeyServiceClient(load_config(str(svc.client_cfg)))
        try:
            client.create_softcard("mycard", pin.encode())
        finally:
            client.close()
        module = subprocess.run(
            [sys.executable, "-m", "pkcs11ws", "module-path"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        # The certificate the OpenSSL example reads back (`object=my-cert`).
        work = tmp_path_factory.mktemp("readme-cert")
        (work / "cert.der").write_bytes(self_signed("readme my-cert")[0])
        env = {**_env(svc, pin), "PKCS11WS_RETRYDELAY": "0"}
        subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                module,
                "--token-label",
                "mycard",
                "--login",
                "--pin",
                "env:PIN",
                "--write-object",
                str(work / "cert.der"),
                "--type",
                "cert",
                "--id",
                "0b",
                "--label",
                "my-cert",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        yield Sandbox(svc, pin, module)
    finally:
        svc.stop()


def _env(svc: Any, pin: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKCS11WS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PKCS11WS_CONFIG"] = str(svc.client_cfg)
    env["PIN"] = pin
    env["README_PIN"] = pin
    return env


# What each block's output must show (by its section heading), beyond exiting 0.
EXPECT = {
    "Quick start for operators": ("name payments", "checks passed", "label        : payments"),
    "Use it from Java, OpenSSL, p11-kit, pkcs11-tool and Python": ("libpkcs11ws.so",),
    "OpenSSL 3 (pkcs11-provider)": ("BEGIN CERTIFICATE", "Total found: 1"),
    "OpenSC pkcs11-tool": ("token label        : mycard", "Created certificate"),
    "Client identities, roles and grants": ("registered 'payments'",
                                            "token label        : paycard"),
    "Running the key service": ('"status":"ok"', "pkcs11ws_workers_ready 2.0", "backed up",
                                "restored"),
}  # fmt: skip


def _two_free_ports() -> tuple[int, int]:
    for _ in range(50):
        port = free_port()
        if port < 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                return port, port + 1
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_shell_block_runs(block: Block, sandbox: Sandbox, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "msg").write_bytes(b"a message to sign\n")
    (work / "in").write_bytes(b"some plaintext\n" * 5)
    (work / "cert.der").write_bytes(self_signed("readme cert")[0])
    port, admin = _two_free_ports()
    body = block.body
    for old, new in (
        (MODULE_PLACEHOLDER, sandbox.module),
        (CONFIG_PLACEHOLDER, str(sandbox.svc.client_cfg)),
        ("export PIN=...", 'export PIN="$README_PIN"'),
        ("18001", str(port)),
        ("18002", str(admin)),
    ):
        body = body.replace(old, new)
    assert "..." not in body.replace("...]", ""), f"{block.id}: a placeholder the test misses"
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", body],
        cwd=work,
        env=_env(sandbox.svc, sandbox.pin),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        # A block that failed half way may leave its background service: end the group we made.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, f"README block at line {block.line} failed:\n{body}\n---\n{out}"
    for expected in EXPECT.get(block.heading, ()):
        assert expected in out, f"README block at line {block.line}: no {expected!r} in\n{out}"


# ------------------------------------------------------------------------------------------
# docs/design.md references.

_SOURCES = (
    "",
    ".py",
    ".pyx",
    ".pxi",
    ".pxd",
    ".c",
    ".h",
    ".toml",
    ".md",
    ".service",
    ".cfg",
    ".sh",
    ".java",
)
_REF = re.compile(r"design\.md(?:,? section (?P<n>\d+)| (?P<m>\d+)\b|, (?P<name>[A-Z][a-z]+))")


def test_design_md_references_resolve() -> None:
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.*)$", design, re.M)
    numbered = {h.split(".", 1)[0] for h in headings if re.match(r"\d+\.", h)}
    names = " ".join(headings)
    files = [
        p
        for d in ("pkcs11ws", "include", "tests", "bench", "tools", "ci", "conf")
        for p in (ROOT / d).rglob("*")
        if p.is_file()
    ]
    files += [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "setup.py", README]
    seen = 0
    for path in files:
        if path.suffix not in _SOURCES or ".venv" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        flat = re.sub(r"[\s#*/]+", " ", text)  # references may wrap across comment lines
        for m in _REF.finditer(flat):
            seen += 1
            n = m.group("n") or m.group("m")
            where = f"{path.relative_to(ROOT)}: {m.group(0)!r}"
            if n is not None:
                assert n in numbered, f"{where}: docs/design.md has no section {n}"
            else:
                assert m.group("name") in names, f"{where}: no such docs/design.md section"
    assert seen >= 10
