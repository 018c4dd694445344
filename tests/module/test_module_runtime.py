"""How libpkcs11ws.so finds its Python runtime (bootstrap.c): a host that already runs another
Python minor version is refused in one line instead of getting a second interpreter."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pkcs11ws.__main__ import module_path

OTHER = [f"python3.{m}" for m in (12, 13, 10) if m != sys.version_info.minor]

HOST = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
fl = ctypes.c_void_p()
print("rv", lib.C_GetFunctionList(ctypes.byref(fl)), flush=True)
"""


def _works(path: str) -> bool:
    res = subprocess.run(
        [path, "-c", "import ctypes"], capture_output=True, timeout=60, check=False
    )
    return res.returncode == 0


def other_python() -> str | None:
    """A Python 3 interpreter of another minor version: on PATH, or one pyenv manages."""
    for name in OTHER:
        path = shutil.which(name)
        if path is not None and "/shims/" not in path and _works(path):
            return path
    if shutil.which("pyenv") is None:
        return None
    res = subprocess.run(
        ["pyenv", "versions", "--bare"], capture_output=True, text=True, timeout=60, check=False
    )
    for v in res.stdout.split():
        parts = v.split(".")
        if len(parts) < 2 or parts[0] != "3" or not parts[1].isdigit():
            continue
        if int(parts[1]) == sys.version_info.minor or int(parts[1]) < 8:
            continue
        prefix = subprocess.run(
            ["pyenv", "prefix", v], capture_output=True, text=True, timeout=60, check=False
        ).stdout.strip()
        path = f"{prefix}/bin/python3"
        if prefix and _works(path):
            return path
    return None


def test_host_running_another_python_is_refused():
    py = other_python()
    if py is None:
        pytest.skip(f"none of {OTHER} is installed")
    res = subprocess.run(
        [py, "-c", HOST, module_path()], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "rv 5" in res.stdout  # CKR_GENERAL_ERROR
    want = f"built for Python 3.{sys.version_info.minor} but the host process runs Python 3."
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("libpkcs11ws: refusing to load: "), res.stderr
    assert want in lines[0]
