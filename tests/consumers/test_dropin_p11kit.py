"""p11-kit and GnuTLS as consumers: a p11-kit `module:` file makes libpkcs11ws.so visible to
`p11-kit list-modules` and to GnuTLS's `p11tool` (certificates written and listed through it).

As root p11-kit reads no per-user configuration, so the test writes a uniquely named file into
/etc/pkcs11/modules/ and removes it (and the folders it made) afterwards; as another user it
uses ~/.config/pkcs11/modules under a temporary HOME. p11-kit hands `x-init-reserved` to
C_Initialize as pReserved, so `x-init-reserved: config=PATH` selects our configuration;
GnuTLS initialises modules with its own arguments, so p11tool gets it from $PKCS11WS_CONFIG.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.certs import self_signed
from tests.support.dropin_util import (
    CONFIG_PLACEHOLDER,
    MODULE_PLACEHOLDER,
    consumer_env,
    require,
    snippet,
)


@contextlib.contextmanager
def module_file(text: str, home: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A p11-kit module file for the test's life: (module name, extra environment)."""
    name = f"pkcs11ws-test-{uuid.uuid4().hex[:8]}"
    if os.geteuid() == 0:
        folder, extra = Path("/etc/pkcs11/modules"), {}
    else:
        folder, extra = home / ".config" / "pkcs11" / "modules", {"HOME": str(home)}
    made = [p for p in (folder.parent, folder) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.module"
    path.write_text(text)
    try:
        yield name, extra
    finally:
        path.unlink(missing_ok=True)
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if we made it and it is empty again


@pytest.fixture(scope="module")
def p11kit_card(own_service):
    return client_card(own_service.client_cfg, "k")


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def section(text: str, start: str) -> str:
    """The lines of p11-kit list-modules' block for one module."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(start))
    out = [lines[i]]
    for line in lines[i + 1 :]:
        if line and not line.startswith(" "):
            break
        out.append(line)
    return "\n".join(out)


def test_p11kit_list_modules_with_reserved_config(own_service, p11kit_card, tmp_path):
    p11kit = require(shutil.which("p11-kit"), "p11-kit", "p11-kit")
    text = snippet(
        "p11kit-module",
        {MODULE_PLACEHOLDER: module_path(), CONFIG_PLACEHOLDER: str(own_service.client_cfg)},
    )
    with module_file(text, tmp_path) as (name, extra):
        # $PKCS11WS_CONFIG points nowhere: the path can only come from x-init-reserved.
        env = consumer_env(own_service.client_cfg, **extra)
        env["PKCS11WS_CONFIG"] = str(tmp_path / "missing.cfg")
        out = run([p11kit, "list-modules"], env).stdout
    block = section(out, f"{name}:")
    assert module_path() in block.splitlines()[0]
    assert "library-manufacturer: pkcs11ws" in block
    assert f"token: {p11kit_card[0]}" in block and "model: WSOP softcard" in block


def test_p11tool_tokens_and_certificates(fresh_service, tmp_path):
    p11tool = require(shutil.which("p11tool"), "GnuTLS p11tool", "gnutls-bin")
    # A service of its own: GnuTLS reads at most a few dozen slots (it passes a fixed-size
    # array to C_GetSlotList and gives up on CKR_BUFFER_TOO_SMALL), and the shared service
    # holds a softcard for every other test.
    own_service = fresh_service()
    name, pin = client_card(own_service.client_cfg, "k")
    der, _, _ = self_signed("p11tool cert")
    pem = tmp_path / "cert.pem"
    pem.write_bytes(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM))
    with module_file(f"module: {module_path()}\n", tmp_path) as (_, extra):
        env = consumer_env(own_service.client_cfg, **extra)
        out = run([p11tool, "--list-tokens"], env).stdout
        assert f"Label: {name}" in out and "Model: WSOP softcard" in out
        assert f"Module: {module_path()}" in out
        uri = f"pkcs11:token={name}"
        # GnuTLS takes the PIN from $GNUTLS_PIN (never argv); it writes certificates public.
        run(
            [
                p11tool,
                "--login",
                "--write",
                "--load-certificate",
                str(pem),
                "--label",
                "gnutls-cert",
                "--id",
                "0c0d",
                uri,
            ],
            {**env, "GNUTLS_PIN": pin},
        )
        listed = run([p11tool, "--list-all-certs", uri], env).stdout
        assert "Label: gnutls-cert" in listed and "id=%0C%0D" in listed
        exported = run([p11tool, "--export", f"{uri};object=gnutls-cert;type=cert"], env).stdout
    assert x509.load_pem_x509_certificate(exported.encode()).public_bytes(Encoding.DER) == der


def test_enable_in_keeps_unnamed_programs_out(own_service, p11kit_card, tmp_path):
    # The README's system-wide registration names the programs that may load the module:
    # pkcs11-tool through p11-kit's proxy is not named, so it must not see the softcards.
    tool = require(shutil.which("pkcs11-tool"), "OpenSC pkcs11-tool", "opensc")
    proxies = sorted(Path("/usr/lib").glob("*/p11-kit-proxy.so"))
    proxy = require(str(proxies[0]) if proxies else None, "p11-kit-proxy.so", "p11-kit-modules")
    text = snippet(
        "p11kit-module",
        {MODULE_PLACEHOLDER: module_path(), CONFIG_PLACEHOLDER: str(own_service.client_cfg)},
    )
    assert "\nenable-in: p11-kit, p11tool\n" in text
    for named in (False, True):
        body = text.replace("p11tool\n", "p11tool, pkcs11-tool\n") if named else text
        with module_file(body, tmp_path) as (_, extra):
            env = consumer_env(own_service.client_cfg, **extra)
            out = run([tool, "--module", proxy, "-L"], env).stdout
        assert (f"token label        : {p11kit_card[0]}" in out) is named, out
