"""Fault-injection helpers shared by the module tests: restart a service on its port, a TCP
relay that loses an answer, a module configuration and a logged-in card.

Real parts only: the relay forwards real TLS bytes between the module and the real service; it
never looks inside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from pkcs11ws import constants as C
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.p11ctypes import Module
from tests.support.service import Api, Service


def serve_again(svc: Service, log: Path) -> subprocess.Popen[bytes]:
    """Start the service of svc again, on the same port and store, its output appended to log
    (the caller stops it)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pkcs11ws.server.cli", "serve", "--config", svc.server_yaml],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def restart(svc: Service, made: list[Service], stop: bool = True) -> Service:
    """Stop the service by PID (SIGTERM) unless it is down, start it again: same port and dir.
    The new process is added to made (the `restarted` fixture stops them all)."""
    if stop:
        svc.stop()
    proc = serve_again(svc, svc.log)
    new = dataclasses.replace(svc, pid=proc.pid, proc=proc)
    made.append(new)
    api = Api(new)
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the service did not restart:\n{new.log_text()}")
            with contextlib.suppress(OSError):
                if api.get("/health").status == 200:
                    return new
            if time.monotonic() > deadline:
                new.stop()
                raise RuntimeError("the restarted service did not answer /health")
            time.sleep(0.05)
    finally:
        api.close()


def object_count(svc: Service, card_id: str) -> int:
    """The number of objects on a softcard, as the service counts them."""
    client = KeyServiceClient(load_config(str(svc.client_cfg)))
    try:
        for card in client.list_softcards():
            if card["id"] == card_id:
                return int(card["keys"]) + int(card["certificates"]) + int(card["data"])
    finally:
        client.close()
    raise LookupError(card_id)


class Relay:
    """A TCP relay in front of the service, to lose an answer and then refuse connections.

    drop_next_answer(): the next bytes the service sends are discarded, that connection is
    closed, and from then on new connections are reset at once until accept() is called.
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.drop = False
        self.refusing = False
        self.dropped = threading.Event()
        self.refused = 0
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def drop_next_answer(self) -> None:
        with self.lock:
            self.drop = True

    def accept(self) -> None:
        with self.lock:
            self.refusing = False

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def _serve(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                refusing = self.refusing
            if refusing:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                client.close()  # RST: the peer sees a reset, as from a host that is down
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        socks = [client, upstream]
        try:
            while not self.closed:
                ready, _, _ = select.select(socks, [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is upstream:
                        with self.lock:
                            lose = self.drop
                            if lose:
                                self.drop = False
                                self.refusing = True
                        if lose:
                            self.dropped.set()
                            return  # the answer is lost with the connection
                        client.sendall(data)
                    else:
                        upstream.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


def setup_card(
    svc: Service, mod: Module, cfg: Path, pin: bytes | None = None, name: str | None = None
) -> tuple[int, str]:
    """A softcard on svc (named name, or a random name), the module initialised with cfg, a
    logged-in session."""
    client = KeyServiceClient(load_config(str(svc.client_cfg)))
    name = name or "r" + uuid.uuid4().hex[:12]
    pin = pin or uuid.uuid4().hex.encode()
    card = client.create_softcard(name, pin)
    client.close()
    assert mod.initialize(str(cfg)) == C.CKR_OK
    h = mod.open(mod.slot_by_label(name))
    assert mod.login(h, pin) == C.CKR_OK
    return h, card["id"]


def write_cfg(svc: Service, path: Path, **settings: str) -> Path:
    lines = [
        ln
        for ln in svc.client_cfg.read_text().splitlines()
        if not ln.strip() or ln.split()[0].lower() not in settings
    ]
    path.write_text("\n".join(lines + [f"{k.upper()} {v}" for k, v in settings.items()]) + "\n")
    return path
