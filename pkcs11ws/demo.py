"""`make demo`: the main job on the embedded default, end to end on this machine.

Initialises a key service (development PKI, SQLite) under ./.demo, starts it, creates a softcard,
then drives it: first through the protocol client, then through the PKCS#11 module with a real
consumer (OpenSC's pkcs11-tool). Prints each step and a summary, stops the service it started (by
PID) and exits non-zero if any step failed. Repeatable: every run starts from a fresh ./.demo.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

WORK = Path(".demo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self) -> None:
        self.steps: list[tuple[str, bool, str]] = []

    def step(self, name: str, fn: Callable[[], str]) -> bool:
        t0 = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Exception as e:  # every failure is reported, then the demo goes on to clean up
            detail, ok = f"{type(e).__name__}: {e}", False
        ms = (time.perf_counter() - t0) * 1000
        print(
            f"[{'OK' if ok else 'FAILED':6}] {name} ({ms:.0f} ms){': ' + detail if detail else ''}"
        )
        self.steps.append((name, ok, detail))
        return ok


def _bin(name: str) -> str:
    """A console script of this venv (next to the running interpreter)."""
    return str(Path(sys.executable).with_name(name))


def main() -> int:
    demo = Demo()
    if WORK.exists():
        shutil.rmtree(WORK)
    port = _free_port()
    print(f"pkcs11ws demo: key service on 127.0.0.1:{port}, state in {WORK.resolve()}")
    subprocess.run(
        # A free admin port too: init's default (port + 1) may be taken on a busy machine, and
        # then the service exits before the first step.
        [
            _bin("pkcs11ws-server"),
            "init",
            str(WORK),
            "--port",
            str(port),
            "--admin-port",
            str(_free_port()),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cfg_path = str((WORK / "pkcs11webservices.cfg").resolve())
    log = (WORK / "server.log").open("w")
    server = subprocess.Popen(
        [_bin("pkcs11ws-server"), "serve", "--config", str(WORK / "server.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        return _run(demo, cfg_path, server)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        passed = sum(ok for _, ok, _ in demo.steps)
        print(f"\nkey service stopped (pid {server.pid}); log in {WORK / 'server.log'}")
        print(f"summary: {passed} of {len(demo.steps)} steps passed")


def _run(demo: Demo, cfg_path: str, server: subprocess.Popen[bytes]) -> int:
    from pkcs11ws.client.api import KeyServiceClient
    from pkcs11ws.config import load_config

    client = KeyServiceClient(load_config(cfg_path))

    def health() -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                h = client.health()
                return f"service {h['version']}, protocol {h['protocol']}"
            except Exception:
                if server.poll() is not None:
                    raise RuntimeError(
                        f"the key service exited ({server.returncode}); see {WORK / 'server.log'}"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    if not demo.step("key service answers over mutual TLS", health):
        return 1
    name = "demo" + secrets.token_hex(3)
    passphrase = secrets.token_urlsafe(12)
    state: dict[str, str] = {}

    def create_card() -> str:
        card = client.create_softcard(name, passphrase.encode())
        state["card"] = card["id"]
        return f"softcard {name} ({card['id']})"

    def activate() -> str:
        state["token"], ttl = client.activate(state["card"], passphrase.encode())
        return f"activation valid {ttl} s"

    def aes() -> str:
        key = client.generate_key(
            state["card"],
            state["token"],
            "CKM_AES_KEY_GEN",
            {
                "CKA_CLASS": 4,
                "CKA_KEY_TYPE": 0x1F,
                "CKA_VALUE_LEN": 32,
                "CKA_TOKEN": True,
                "CKA_PRIVATE": True,
                "CKA_LABEL": b"demo-aes",
                "CKA_ID": b"\x01",
            },
        )
        iv, msg = os.urandom(16), b"attack at dawn, bring the keys"
        ct = client.encrypt(state["token"], key["handle"], "CKM_AES_CBC_PAD", iv, msg)
        pt = client.decrypt(state["token"], key["handle"], "CKM_AES_CBC_PAD", iv, ct)
        if pt != msg:
            raise AssertionError("decrypt(encrypt(m)) != m")
        return f"AES-256 key generated, CBC-PAD round trip of {len(msg)} bytes -> {len(ct)}"

    def hmac() -> str:
        key = client.generate_key(
            state["card"],
            state["token"],
            "CKM_SHA256_KEY_GEN",
            {
                "CKA_CLASS": 4,
                "CKA_KEY_TYPE": 0x2B,
                "CKA_VALUE_LEN": 32,
                "CKA_TOKEN": True,
                "CKA_PRIVATE": True,
                "CKA_LABEL": b"demo-hmac",
                "CKA_ID": b"\x02",
            },
        )
        sig = client.sign(state["token"], key["handle"], "CKM_SHA256_HMAC", b"hello")
        client.verify(state["token"], key["handle"], "CKM_SHA256_HMAC", b"hello", sig)
        return f"HMAC-SHA256 key generated, {len(sig)}-byte MAC signed and verified"

    def checkinst() -> str:
        r = subprocess.run(
            [_bin("ckcheckinst"), "--config", cfg_path, "--softcard", name],
            input=passphrase + "\n",
            capture_output=True,
            text=True,
            timeout=300,
        )
        print("\n".join("         | " + line for line in r.stdout.splitlines()))
        if r.returncode != 0:
            raise RuntimeError(f"ckcheckinst exit {r.returncode}: {r.stderr.strip()[-300:]}")
        checks = sum(line.lstrip().startswith("OK") for line in r.stdout.splitlines())
        return f"{checks} checks OK, self-test included"

    for title, fn in (
        ("create softcard", create_card),
        ("ckcheckinst with the self-test", checkinst),
        ("log in (activate)", activate),
        ("AES key generation and encrypt/decrypt", aes),
        ("HMAC key generation and sign/verify", hmac),
    ):
        if not demo.step(title, fn):
            return 1
    from pkcs11ws import demo_module

    if not demo_module.run(demo, cfg_path, name, passphrase):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
