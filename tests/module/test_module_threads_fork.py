"""libpkcs11ws.so in a C host under concurrency: threads, fork while busy, finalize/initialize.

The host (tests/module/c/threads_fork.c) is compiled by the test against include/pkcs11ws_ck.h and
dlopen()s the module RTLD_LOCAL. It imports an AES key and an HMAC key whose values come from
here (on stdin, with the passphrase), so every MAC and ciphertext it gets from the module is
compared with the value computed here by `cryptography`/hmac:

- 8 threads, each with its own session, sign and encrypt concurrently (8 x 16 messages);
- a thread of the parent is busy signing and encrypting while 20 children are forked at once;
  each child must find the module uninitialised, C_Initialize, log in, sign and encrypt, and
  exit 0 within the deadline (a deadlocked child is killed and reported); the parent's own
  session still works afterwards;
- C_Finalize then C_Initialize again in the same process.

tests/module/test_module_host.py covers the basic C-host round trip, fork of an idle parent and the
bad-configuration path; this file adds the checked values and the exact numbers above.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "c" / "threads_fork.c"
NTHREADS, ITERS, MSG_LEN = 8, 16, 64  # as in threads_fork.c


def message(t: int, i: int) -> bytes:
    return bytes((t * 31 + i * 7 + j) & 0xFF for j in range(MSG_LEN))


@pytest.fixture(scope="module")
def fork_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("threads_fork") / "threads_fork"
    subprocess.run(
        [
            cc,
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(ROOT / "include"),
            "-o",
            str(exe),
            str(SOURCE),
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    return exe


def host_input(pin: str, aes_key: bytes, iv: bytes, mac_key: bytes) -> str:
    lines = [f"PIN {pin}", f"AES {aes_key.hex()} {iv.hex()}", f"HMAC {mac_key.hex()}"]
    for t in range(NTHREADS):
        for i in range(ITERS):
            msg = message(t, i)
            mac = hmac.new(mac_key, msg, hashlib.sha256).hexdigest()
            enc = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
            ct = (enc.update(msg) + enc.finalize()).hex()
            lines.append(f"EXP {t} {i} {mac} {ct}")
    return "\n".join(lines) + "\n"


def run_host(fork_host: Path, service, *modes: str, timeout: float = 150):
    """A fresh softcard, fresh keys, and the host running the given modes on them."""
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "tf" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    env = {**os.environ, "PKCS11WS_CONFIG": str(service.client_cfg)}
    env.pop("PYTHONPATH", None)
    stdin = host_input(pin, os.urandom(32), os.urandom(16), os.urandom(32))
    r = subprocess.run(
        [str(fork_host), module_path(), name, *modes],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert pin not in r.stdout + r.stderr
    return r


def test_threads_fork_and_reinitialize(fork_host, service):
    r = run_host(fork_host, service, "threads", "fork", "reinit")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"ok threads {NTHREADS} x {ITERS}", r.stdout
    assert lines[1].startswith("ok fork 20 children, busy thread "), r.stdout
    assert lines[2:] == ["ok reinit"], r.stdout


def test_host_detects_a_wrong_value(fork_host, service, tmp_path):
    """The checks above can fail: a host given a wrong expected MAC reports it."""
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "tf" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    key = os.urandom(32)
    stdin = host_input(pin, key, bytes(16), key)
    # Expected values computed with another HMAC key: the very first comparison must fail.
    other = host_input(pin, key, bytes(16), os.urandom(32)).splitlines()
    mine = stdin.splitlines()
    stdin = "\n".join(mine[:3] + other[3:]) + "\n"
    env = {**os.environ, "PKCS11WS_CONFIG": str(service.client_cfg)}
    r = subprocess.run(
        [str(fork_host), module_path(), name, "threads"],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "FAIL MAC of message" in r.stdout, r.stdout + r.stderr
