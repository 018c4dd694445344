"""Issue 12 item 4: HOST lists several key services; the client spreads requests over the healthy
ones, fails over at once when one dies, skips it for a cool-down, and uses it again once it is
back. Two real key service processes serve the same SQLite store, master key and PKI on two
ports (the replica's server.yaml is a copy of the first with another `port:`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from ctypes import byref
from pathlib import Path

import pytest
import yaml

from pkcs11ws import constants as C
from pkcs11ws.client import KeyServiceClient
from pkcs11ws.client.transport import COOLDOWN
from pkcs11ws.config import load_config
from pkcs11ws.errors import TransportError
from pkcs11ws.log import Logger
from pkcs11ws.protocol import Attrs
from tests.support.p11ctypes import mechanism
from tests.support.service import Api, Service, free_port

PASS = b"correct horse 1"


def serve(svc: Service, yaml_path: Path, port: int, log: Path) -> Service:
    """Start a key service from yaml_path (listening on port); wait for /health."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pkcs11ws.server.cli", "serve", "--config", str(yaml_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    new = dataclasses.replace(
        svc,
        port=port,
        url=f"https://127.0.0.1:{port}",
        server_yaml=yaml_path,
        pid=proc.pid,
        log=log,
        proc=proc,
    )
    api = Api(new)
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the replica exited:\n{new.log_text()}")
            with contextlib.suppress(OSError):
                if api.get("/health").status == 200:
                    return new
            if time.monotonic() > deadline:
                new.stop()
                raise RuntimeError("the replica did not answer /health")
            time.sleep(0.05)
    finally:
        api.close()


@pytest.fixture
def replicas(fresh_service, tmp_path: Path):
    """(a, b, started): two services on one store; started collects every process to stop."""
    a = fresh_service()
    doc = yaml.safe_load(a.server_yaml.read_text())
    port = free_port()
    doc["port"] = port
    doc["admin_port"] = None  # the first one's admin listener keeps its port
    b_yaml = tmp_path / "replica.yaml"
    b_yaml.write_text(yaml.safe_dump(doc))
    started: list[Service] = []
    b = serve(a, b_yaml, port, tmp_path / "replica.out")
    started.append(b)
    try:
        yield a, b, started
    finally:
        for svc in started:
            svc.stop()


def kill9(svc: Service) -> None:
    os.kill(svc.pid, signal.SIGKILL)
    svc.proc.wait(10)


def host_list(a: Service, b: Service) -> str:
    # Both spellings the service's certificate names: an address and a bare-name entry.
    return f"127.0.0.1:{a.port}, localhost:{b.port}"


def pair_client(a: Service, b: Service, log: Path, **overrides: object) -> KeyServiceClient:
    env = {f"PKCS11WS_{k.upper()}": str(v) for k, v in overrides.items()}
    env["PKCS11WS_HOST"] = host_list(a, b)
    env["PKCS11WS_LOGLEVEL"] = "3"
    env["PKCS11WS_LOGFILEPATH"] = str(log)
    cfg = load_config(str(a.client_cfg), environ=env)
    logger = Logger()
    logger.configure(cfg)
    return KeyServiceClient(cfg, logger)


def test_requests_spread_over_both_and_an_activation_works_on_either(replicas, tmp_path):
    a, b, _ = replicas
    c = pair_client(a, b, tmp_path / "p11.log", maxretries=0)
    assert [s.label for s in c.transport.servers] == [f"127.0.0.1:{a.port}", f"localhost:{b.port}"]
    card = c.create_softcard("f" + uuid.uuid4().hex[:12], PASS)
    token, _ = c.activate(card["id"], PASS)
    attrs: Attrs = {
        "CKA_CLASS": C.CKO_SECRET_KEY,
        "CKA_KEY_TYPE": C.CKK_SHA256_HMAC,
        "CKA_VALUE": b"k" * 32,
    }
    key = c.create_object(card["id"], token, attrs)["handle"]
    macs = {c.sign(token, key, "CKM_SHA256_HMAC", b"spread") for _ in range(40)}
    assert len(macs) == 1
    # Both replicas signed with the one activation token (sealed, opened by either).
    assert a.served("POST /crypto/v1/sign 200") >= 10
    assert b.served("POST /crypto/v1/sign 200") >= 10
    assert c.stats()["failures"] == 0
    c.close()


def test_kill9_one_replica_then_restart(replicas, tmp_path):
    a, b, started = replicas
    log = tmp_path / "p11.log"
    c = pair_client(a, b, log, maxretries=0)  # no retries: only failover can hide the dead one
    card = c.create_softcard("f" + uuid.uuid4().hex[:12], PASS)
    token, _ = c.activate(card["id"], PASS)
    for _ in range(10):
        c.random(8)
    kill9(b)
    for _ in range(40):  # no error: every request B would have had goes to A
        assert len(c.random(8)) == 8
    failures = c.stats()["failures"]
    assert 1 <= failures <= 2  # B refused once (or once more after a kept-alive connection)
    text = log.read_text()
    assert f"key service localhost:{b.port} failed" in text
    # During the cool-down B is not tried again: no new failures.
    for _ in range(20):
        c.random(8)
    assert c.stats()["failures"] == failures
    # B comes back (same configuration, same port) and is used again after its cool-down.
    b2 = serve(b, b.server_yaml, b.port, tmp_path / "replica-again.out")
    started.append(b2)
    time.sleep(COOLDOWN + 0.5)
    for _ in range(20):
        c.random(8)
    assert b2.served("POST /crypto/v1/random 200") >= 5
    assert f"key service localhost:{b.port} answers again" in log.read_text()
    # The activation made before the outage still works on both.
    assert c.search_objects(card["id"], token, {}) == []
    c.close()


def test_every_server_failed_is_one_attempt_of_maxretries(tmp_path):
    # Two closed ports: each round tries both at once; MAXRETRIES counts rounds.
    env = {
        "PKCS11WS_HOST": f"127.0.0.1:{free_port()},localhost:{free_port()}",
        "PKCS11WS_MAXRETRIES": "2",
        "PKCS11WS_RETRYDELAY": "0",
    }
    cfg_path = tmp_path / "p11.cfg"
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("unused: nothing is reached\n")
    cfg_path.write_text("CERT client.pem\nKEY client.key\nAUTH ca.pem\nLOGLEVEL 0\n")
    c = KeyServiceClient(load_config(str(cfg_path), environ=env), Logger())
    with pytest.raises(TransportError) as ei:
        c.health()
    assert ei.value.ckr == C.CKR_DEVICE_ERROR and "after 2 retries" in ei.value.message
    assert c.stats()["requests"] == 6  # 3 rounds x 2 servers
    c.close()


# --------------------------------------------------------------------------------------------
# Through the module: application threads sign while a replica is killed -9 and restarted.


def test_module_threads_ride_through_a_replica_kill(bare_mod, replicas, tmp_path):
    a, b, started = replicas
    setup = KeyServiceClient(load_config(str(a.client_cfg)))
    name = "m" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex.encode()
    setup.create_softcard(name, pin)
    setup.close()
    log = tmp_path / "module.log"
    cfg = tmp_path / "p11.cfg"
    lines = [
        ln
        for ln in a.client_cfg.read_text().splitlines()
        if not ln.strip()
        or ln.split()[0].upper()
        not in ("HOST", "MAXRETRIES", "RETRYDELAY", "LOGLEVEL", "LOGFILEPATH")
    ]
    extra = [
        f"HOST {host_list(a, b)}",
        "MAXRETRIES 0",
        "RETRYDELAY 0",
        "LOGLEVEL 3",
        f"LOGFILEPATH {log}",
    ]
    cfg.write_text("\n".join([*lines, *extra]) + "\n")
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    slot = bare_mod.slot_by_label(name)
    h = bare_mod.open(slot)
    assert bare_mod.login(h, pin) == C.CKR_OK
    key = bare_mod.create(
        h,
        [
            (C.CKA_TOKEN, True),
            (C.CKA_PRIVATE, True),
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC),
            (C.CKA_SIGN, True),
            (C.CKA_VALUE, b"s" * 32),
        ],
    )
    stop = threading.Event()
    errors: list[str] = []
    done = [0] * 4

    def work(i: int) -> None:
        session = bare_mod.open(slot)
        m, _ = mechanism(C.CKM_SHA256_HMAC)
        try:
            while not stop.is_set():
                try:
                    bare_mod.ok("C_SignInit", session, byref(m), key)
                    if len(bare_mod.single("C_Sign", session, b"data %d" % i)) != 32:
                        errors.append("short MAC")
                except Exception as e:
                    errors.append(repr(e))
                    return
                done[i] += 1
        finally:
            bare_mod.call("C_CloseSession", session)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        kill9(b)
        time.sleep(2.0)
        b2 = serve(b, b.server_yaml, b.port, tmp_path / "replica-again.out")
        started.append(b2)
        time.sleep(COOLDOWN + 1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert all(n > 0 for n in done), done
    assert b2.served("POST /crypto/v1/sign 200") > 0  # the restarted replica signs again
    text = log.read_text()
    assert f"key service localhost:{b.port} failed" in text
    # The login survived: no re-login was needed, the session still signs.
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    bare_mod.ok("C_SignInit", h, byref(m), key)
    assert len(bare_mod.single("C_Sign", h, b"after")) == 32


# --------------------------------------------------------------------------------------------
# Failover on a 5xx answer and on a server that accepts but never answers.


class Broken:
    """A TLS endpoint with the service's own certificate (so the client trusts it) that requires
    the client certificate like the service and then answers every request with 503, or never
    answers at all (mute)."""

    def __init__(self, svc: Service, mute: bool = False) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(svc.ca))
        self.ctx.load_cert_chain(
            str(svc.dir / "pki" / "server.pem"), str(svc.dir / "pki" / "server.key")
        )
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mute = mute
        self.requests = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            if self.mute:
                self.held.append(raw)  # accepted, never answered
                continue
            threading.Thread(target=self._answer, args=(raw,), daemon=True).start()

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = s.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    while len(buf) < length:
                        buf += s.recv(65536)
                    buf = buf[length:]
                    self.requests += 1
                    body = b'{"code":"UNAVAILABLE","message":"store down"}'
                    s.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for s in self.held:
            s.close()


def test_a_5xx_answer_fails_over_and_cools_the_server_down(service, tmp_path):
    broken = Broken(service)
    try:
        env = {
            "PKCS11WS_HOST": f"localhost:{broken.port}, 127.0.0.1:{service.port}",
            "PKCS11WS_MAXRETRIES": "0",
            "PKCS11WS_LOGLEVEL": "3",
            "PKCS11WS_LOGFILEPATH": str(tmp_path / "p11.log"),
        }
        cfg = load_config(str(service.client_cfg), environ=env)
        c = KeyServiceClient(cfg, Logger())
        c.log.configure(cfg)
        for _ in range(10):
            assert len(c.random(8)) == 8  # never the 503
        assert broken.requests == 1  # then skipped for the cool-down
        assert (
            f"key service localhost:{broken.port} failed (HTTP 503)"
            in (tmp_path / "p11.log").read_text()
        )
        c.close()
    finally:
        broken.close()


def test_a_mute_server_costs_one_share_of_the_deadline_then_is_skipped(service, tmp_path):
    mute = Broken(service, mute=True)
    try:
        env = {
            "PKCS11WS_HOST": f"localhost:{mute.port}, 127.0.0.1:{service.port}",
            "PKCS11WS_MAXRETRIES": "0",
            "PKCS11WS_TIMEOUT": "4",
        }
        c = KeyServiceClient(load_config(str(service.client_cfg), environ=env), Logger())
        took = []
        for _ in range(6):
            t0 = time.monotonic()
            assert len(c.random(8)) == 8
            took.append(time.monotonic() - t0)
        # The round that met the mute server waited for its share (TIMEOUT 4 / 2 servers)...
        assert 1.5 <= max(took) < 4, took
        # ... and no other call waited: it was cooling down.
        assert sorted(took)[-2] < 1.0, took
        c.close()
    finally:
        mute.close()


def test_ipv6_literal_in_brackets(fresh_service, tmp_path):
    # A replica listening on ::1 only, listed as [::1]:PORT next to an IPv4 one: the URL, the
    # TLS host check (the dev certificate names ::1) and the spread all work.
    a = fresh_service()
    doc = yaml.safe_load(a.server_yaml.read_text())
    port = free_port()
    doc.update(host="::1", port=port, admin_port=None)
    v6_yaml = tmp_path / "v6.yaml"
    v6_yaml.write_text(yaml.safe_dump(doc))
    with (tmp_path / "v6.out").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pkcs11ws.server.cli", "serve", "--config", str(v6_yaml)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    v6 = dataclasses.replace(
        a, port=port, server_yaml=v6_yaml, pid=proc.pid, log=tmp_path / "v6.out", proc=proc
    )
    try:
        only = {"PKCS11WS_HOST": f"[::1]:{port}", "PKCS11WS_MAXRETRIES": "0"}
        probe = KeyServiceClient(load_config(str(a.client_cfg), environ=only), Logger())
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, v6.log_text()
            try:
                probe.health()
                break
            except TransportError:
                assert time.monotonic() < deadline, v6.log_text()
                time.sleep(0.1)
        probe.close()
        env = {"PKCS11WS_HOST": f"[::1]:{port}, 127.0.0.1:{a.port}", "PKCS11WS_MAXRETRIES": "0"}
        c = KeyServiceClient(load_config(str(a.client_cfg), environ=env), Logger())
        assert [s.url for s in c.transport.servers] == [
            f"https://[::1]:{port}",
            f"https://127.0.0.1:{a.port}",
        ]
        for _ in range(20):
            assert len(c.random(8)) == 8
        assert c.stats()["failures"] == 0
        assert v6.served("POST /crypto/v1/random 200") >= 5
        assert a.served("POST /crypto/v1/random 200") >= 5
        c.close()
    finally:
        v6.stop()
