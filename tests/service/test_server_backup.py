"""`pkcs11ws-server backup` while the service writes, then `restore`: every key acknowledged before
the backup started is back and encrypts correctly; restore refuses a store in use. Also SIGTERM:
a request in flight when it arrives completes, new connections are refused, exit status 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from tests.support.service import Api, b64, serve_dir, unb64

PASS = b"backup test passphrase"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pkcs11ws.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _aes_cbc(value: bytes, iv: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    return e.update(data) + e.finalize()


def test_backup_under_load_then_restore(fresh_service, tmp_path: Path) -> None:
    svc = fresh_service()
    api = Api(svc)
    card, token = api.new_card(PASS)
    acked: list[tuple[float, str, bytes]] = []  # (monotonic time acknowledged, handle, value)
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        client = Api(svc)
        try:
            while not stop.is_set():
                value = os.urandom(16)
                handle = client.import_key(card, token, C.CKK_AES, value)
                acked.append((time.monotonic(), handle, value))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while len(acked) < 20 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        started = time.monotonic()
        out = tmp_path / "keys.backup"
        res = _cli("backup", "--config", str(svc.server_yaml), str(out))
        assert res.returncode == 0, res.stderr
        done = len(acked)
        while len(acked) < done + 10 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)  # the load goes on after the backup
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    before = [(h, v) for t, h, v in acked if t < started]
    assert len(before) >= 20 and len(acked) > len(before) + 5
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert _cli("backup", "--config", str(svc.server_yaml), str(out)).returncode != 0  # exists

    # Restore refuses while the service has the store open.
    res = _cli("restore", "--config", str(svc.server_yaml), "--overwrite", str(out))
    assert res.returncode != 0 and "in use" in res.stderr
    api.close()
    assert svc.stop() == 0
    res = _cli("restore", "--config", str(svc.server_yaml), str(out))
    assert res.returncode != 0 and "--overwrite" in res.stderr  # a store is there
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a database" * 100)
    res = _cli("restore", "--config", str(svc.server_yaml), "--overwrite", str(garbage))
    assert res.returncode != 0
    res = _cli("restore", "--config", str(svc.server_yaml), "--overwrite", str(out))
    assert res.returncode == 0, res.stderr

    restored = serve_dir(svc.dir, svc.port)
    try:
        api = Api(restored)
        token = api.activate(card, PASS)
        iv, block = os.urandom(16), os.urandom(32)
        for handle, value in before:
            r = api.post(
                "/crypto/v1/encrypt",
                {"key": handle, "mechanism": "CKM_AES_CBC", "iv": b64(iv), "data": b64(block)},
                token=token,
            )
            assert r.status == 200, (handle, r.body)
            assert unb64(r.json["data"]) == _aes_cbc(value, iv, block), handle
        api.close()
    finally:
        assert restored.stop() == 0


def _raw_tls(svc, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def test_sigterm_drains_in_flight_request(fresh_service) -> None:
    svc = fresh_service()
    api = Api(svc)
    body = json.dumps({"length": 16}).encode()
    conn = _raw_tls(svc, api.ctx)
    # Headers and half the body: the request is in flight (the app is reading its body).
    conn.sendall(
        b"POST /crypto/v1/random HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )
    time.sleep(0.5)
    os.kill(svc.pid, signal.SIGTERM)
    # The listener closes: a new connection is refused while the old request is still open.
    deadline = time.monotonic() + 30
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            with socket.create_connection(("127.0.0.1", svc.port), timeout=5):
                pass
            time.sleep(0.1)
        except ConnectionRefusedError:
            refused = True
    assert refused, "the service kept accepting connections after SIGTERM"
    assert svc.proc.poll() is None  # still draining
    conn.sendall(body[5:])
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        answer += chunk
    conn.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert len(unb64(json.loads(answer.split(b"\r\n\r\n", 1)[1])["data"])) == 16
    assert svc.proc.wait(60) == 0
    api.close()
