"""`python -m pkcs11ws install --prefix DIR`: the WSOP layout of real files (nothing points back
into this checkout), the installed library loaded by pkcs11-tool, the launchers run from outside
the tree, and what a reinstall leaves alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkcs11ws.__main__ import module_path
from pkcs11ws.cli import install
from tests.support.tools_util import activated_card, clean_env, service_env

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ["ckcheckinst", "ckinfo-dynamic", "cklist-dynamic", "ckmechinfo", "softcardtool"]


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pkcs11ws", "install", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )


def pkcs11_tool(lib: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pkcs11-tool", "--module", str(lib), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("install") / "opt" / "pkcs11"
    res = run_install("--prefix", str(d))
    assert res.returncode == 0, res.stderr
    return d


def test_layout(prefix):
    lib = prefix / "lib" / "libpkcs11webservices.so"
    assert lib.is_file() and not lib.is_symlink()
    assert lib.read_bytes() == Path(module_path()).read_bytes()
    for t in TOOLS:
        p = prefix / "bin" / t
        assert p.is_file() and os.access(p, os.X_OK), t
        text = p.read_text()
        assert text.startswith("#!/bin/sh\n")
        assert f'exec "$prefix/runtime/bin/python3.11" -I -m {install.TOOLS[t]} "$@"' in text
    runtime = prefix / "runtime"
    assert (runtime / "pyvenv.cfg").is_file()
    site = runtime / "lib" / "python3.11" / "site-packages"
    for name in (
        "pkcs11ws/_native/libpkcs11ws.so",
        "pkcs11ws/_native/libpkcs11ws-python.so",
        "pkcs11ws/_data/example_pkcs11webservices.cfg",
        "pycurl",
        "cryptography",
    ):
        assert (site / name).exists(), name
    assert not list(site.glob("pkcs11ws/_native/*.pyx"))
    assert not (site / "uvicorn").exists()  # the [server] extra stays out


def test_nothing_points_into_the_checkout(prefix):
    # Real files only: no symlink but the runtime venv's own, no file naming this tree
    # (neither text nor the shared objects, nor the byte-compiled files).
    for path in prefix.rglob("*"):
        if path.is_symlink():
            # The venv's interpreter links (to the base Python) and lib64 -> lib.
            assert path.parent in (prefix / "runtime" / "bin", prefix / "runtime"), path
            assert not Path(os.path.realpath(path)).is_relative_to(ROOT), path
            continue
        if path.is_file():
            assert str(ROOT).encode() not in path.read_bytes(), path
    example = (prefix / "conf" / "example_pkcs11webservices.cfg").read_text()
    settings = [ln for ln in example.splitlines() if ln and not ln.startswith("#")]
    assert f"CERT {prefix}/conf/client.crt" in settings
    assert f"LOGFILEPATH {prefix}/log/pkcs11webservices.log" in settings
    assert not any("/opt/nfast" in ln for ln in settings)
    # Comments still describe the module's built-in default.
    assert "/opt/nfast/webservices/pkcs11/conf/pkcs11webservices.cfg" in example
    assert (prefix / "log").is_dir()
    assert not (prefix / "conf" / "pkcs11webservices.cfg").exists()


def test_pkcs11_tool_loads_the_installed_library(prefix, service, tmp_path):
    card = activated_card(service)
    log = tmp_path / "module.log"
    env = service_env(service, PKCS11WS_LOGFILEPATH=str(log), PKCS11WS_LOGLEVEL="4")
    res = pkcs11_tool(prefix / "lib" / "libpkcs11webservices.so", env, "-L")
    assert res.returncode == 0, res.stderr
    assert f"token label        : {card.name}" in res.stdout
    assert "token manufacturer : pkcs11ws" in res.stdout
    # The log names the file the host loaded (a copy of the module), as the original does.
    assert " libpkcs11webservices: " in log.read_text().splitlines()[0]


def test_launchers(prefix, service):
    env = service_env(service)
    card = activated_card(service)
    res = subprocess.run(
        [str(prefix / "bin" / "softcardtool"), "-l"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert res.returncode == 0 and card.id in res.stdout, res.stderr
    lib = str(prefix / "lib" / "libpkcs11webservices.so")
    for t, args in (
        ("ckinfo-dynamic", ["--library", lib]),
        ("ckmechinfo", ["--library", lib]),
        ("cklist-dynamic", ["--library", lib, "--token-label", card.name]),
    ):
        res = subprocess.run(
            [str(prefix / "bin" / t), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert res.returncode == 0, (t, res.stderr)
    res = subprocess.run(
        [str(prefix / "bin" / "ckcheckinst"), "--library", lib],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert res.returncode == 0, res.stdout
    assert "checks passed" in res.stdout


def test_launcher_defaults_to_the_prefix_config(prefix):
    res = subprocess.run(
        [str(prefix / "bin" / "ckcheckinst")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert res.returncode == 1
    cfg = prefix / "conf" / "pkcs11webservices.cfg"
    first = next(ln for ln in res.stdout.splitlines() if ln.startswith("FAILED"))
    assert f"{cfg}: configuration file not found" in first
    assert "set by the install's launcher script" in first
    assert f"Fix: copy {prefix}/conf/example_pkcs11webservices.cfg to {cfg}" in first


def test_reinstall_keeps_the_config(prefix):
    cfg = prefix / "conf" / "pkcs11webservices.cfg"
    cfg.write_text("# mine\n")
    try:
        res = run_install("--prefix", str(prefix))
        assert res.returncode == 0, res.stderr
        assert cfg.read_text() == "# mine\n"
        assert "next: copy" not in res.stdout
    finally:
        cfg.unlink()


def test_the_tree_can_be_moved(prefix, tmp_path, service):
    # The module and the launchers find the runtime from their own location.
    moved = tmp_path / "elsewhere"
    shutil.copytree(prefix, moved, symlinks=True)
    card = activated_card(service)
    res = pkcs11_tool(moved / "lib" / "libpkcs11webservices.so", service_env(service), "-L")
    assert res.returncode == 0, res.stderr
    assert f"token label        : {card.name}" in res.stdout
    res = subprocess.run(
        [str(moved / "bin" / "softcardtool"), "-l"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=service_env(service),
    )
    assert res.returncode == 0 and card.id in res.stdout, res.stderr


def test_module_refuses_a_tree_without_runtime(tmp_path):
    lib = tmp_path / "lib" / "libpkcs11webservices.so"
    lib.parent.mkdir()
    shutil.copy2(module_path(), lib)
    res = pkcs11_tool(lib, clean_env(), "-I")
    assert res.returncode != 0
    assert "libpkcs11ws: cannot find the pkcs11ws package next to the module" in res.stderr
    assert f"{tmp_path}/lib/../runtime/lib/python3.11/site-packages/pkcs11ws/_native" in res.stderr


def test_usage_errors():
    res = run_install()
    assert res.returncode == 2 and "--prefix" in res.stderr
