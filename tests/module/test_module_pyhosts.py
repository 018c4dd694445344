"""libpkcs11ws.so loaded by other Python processes through ctypes.

- Another 3.11 interpreter (the venv's base Python, which has none of our dependencies): the
  module attaches to it and makes the provider's dependencies importable.
- A Python of another minor version: the module refuses cleanly (CKR_GENERAL_ERROR and one
  stderr line) instead of crashing the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config

SCRIPT = r"""
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1])
CK_ULONG = ctypes.c_ulong
fl = ctypes.c_void_p()
rv = lib.C_GetFunctionList(ctypes.byref(fl))
print("C_GetFunctionList", rv)
if rv:
    sys.exit(0)
print("C_Initialize", lib.C_Initialize(None))
n = CK_ULONG(0)
lib.C_GetSlotList(1, None, ctypes.byref(n))  # the shared service may hold many softcards
slots = (CK_ULONG * n.value)()
print("C_GetSlotList", lib.C_GetSlotList(1, slots, ctypes.byref(n)))
h = CK_ULONG()
found = None
for s in slots[: n.value]:
    info = (ctypes.c_ubyte * 208)()
    lib.C_GetTokenInfo(CK_ULONG(s), info)
    if bytes(info[:32]).rstrip() == sys.argv[2].encode():
        found = s
print("C_OpenSession", lib.C_OpenSession(CK_ULONG(found), CK_ULONG(6), None, None, ctypes.byref(h)))
pin = os.environ["TEST_PIN"].encode()
print("C_Login", lib.C_Login(h, CK_ULONG(1), pin, CK_ULONG(len(pin))))
buf = ctypes.create_string_buffer(32)
print("C_GenerateRandom", lib.C_GenerateRandom(h, buf, CK_ULONG(32)))
print("C_Finalize", lib.C_Finalize(None))
print("in", sys.version_info[:2], "pycurl from", "pycurl" in sys.modules)
"""


def run(python: str, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [python, "-c", SCRIPT, module_path(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def version_of(python: str) -> tuple[int, int] | None:
    r = subprocess.run(
        [python, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        return None
    major, minor = r.stdout.split()
    return int(major), int(minor)


def test_attaches_to_another_interpreter_of_the_same_version(service):
    base = getattr(sys, "_base_executable", sys.executable)
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment")
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "y" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"PKCS11WS_CONFIG": str(service.client_cfg), "TEST_PIN": pin}
    r = run(base, name, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for fn in (
        "C_GetFunctionList",
        "C_Initialize",
        "C_GetSlotList",
        "C_OpenSession",
        "C_Login",
        "C_GenerateRandom",
        "C_Finalize",
    ):
        assert f"{fn} 0\n" in r.stdout, r.stdout + r.stderr
    assert "in (3, 11) pycurl from True" in r.stdout


def other_pythons() -> list[str]:
    found = [p for p in map(shutil.which, ("python3.12", "python3.13", "python3.10")) if p]
    pyenv = shutil.which("pyenv")
    if pyenv is not None:
        r = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True)
        for v in r.stdout.split():
            prefix = subprocess.run([pyenv, "prefix", v], capture_output=True, text=True)
            exe = os.path.join(prefix.stdout.strip(), "bin", "python3")
            if prefix.returncode == 0 and os.access(exe, os.X_OK):
                found.append(exe)
    return found


def test_refuses_another_python_version():
    mine = sys.version_info[:2]
    for python in other_pythons():
        version = version_of(python)
        if version is None or version == mine:
            continue
        r = run(python)
        assert r.returncode == 0, r.stderr  # the host survives
        assert "C_GetFunctionList 5" in r.stdout  # CKR_GENERAL_ERROR
        want = f"refusing to load: built for Python {mine[0]}.{mine[1]} but the host process"
        assert want in r.stderr and f"runs Python {version[0]}.{version[1]}." in r.stderr
        return
    pytest.skip("no Python of another minor version on this machine")
