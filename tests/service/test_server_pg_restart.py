"""PostgreSQL restarts under load: the key service answers 503 only while the database is down,
the module retries through it, and nothing acknowledged is lost.

Its own real PostgreSQL cluster (tests/support/pg_util.py; not the session's, which other tests
share), one key service on it over real mutual TLS, and at the same time:
- HTTP clients creating objects (an Idempotency-Key per object, the same key again after a 503,
  as the module does) and signing, each request's start, end and status recorded;
- an application thread driving the real module (libpkcs11ws.so via ctypes, in this process):
  C_GenerateKey and C_Sign in a loop, with MAXRETRIES/RETRYDELAY generous enough to outlast the
  restart: it must see no error at all.
The database is stopped (`pg_ctl stop -m fast`) for a few seconds and started again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from ctypes import byref
from typing import Any

import pytest

from pkcs11ws import constants as C
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.p11ctypes import Module, mechanism
from tests.support.pg_util import PgServer
from tests.support.service import Api, Service, b64, encode, new_idem, start_service

PASS = b"restart passphrase"
DOWN_SECONDS = 3.0
# After the database is back, the service's pool reconnects within about a second; on a loaded
# 2-core CI box give it far more before calling a 503 "not while it was down".
RECOVERY_SECONDS = 15.0
HMAC_GEN = [
    (C.CKA_TOKEN, True),
    (C.CKA_PRIVATE, True),
    (C.CKA_CLASS, C.CKO_SECRET_KEY),
    (C.CKA_VALUE_LEN, 32),
    (C.CKA_SIGN, True),
    (C.CKA_VERIFY, True),
]


@pytest.fixture
def own_postgres() -> Iterator[PgServer]:
    server = PgServer()
    try:
        yield server
    finally:
        server.destroy()


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[float, float, int]] = []  # start, end, status
        self.acknowledged: dict[str, str] = {}  # label -> handle

    def add(self, start: float, status: int) -> None:
        with self.lock:
            self.requests.append((start, time.monotonic(), status))


def http_creator(
    svc: Service, card: str, token: str, rec: Recorder, stop: threading.Event, n: int
) -> None:
    api = Api(svc)
    try:
        i = 0
        while not stop.is_set():
            label = f"c{n}-{i}"
            body = {
                "attrs": encode(
                    {"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": label.encode(), "CKA_VALUE": b"v"}
                )
            }
            key = new_idem()
            while True:  # like the module: the same key again after a 5xx
                t0 = time.monotonic()
                r = api.post(f"/km/v1/softcards/{card}/objects", body, token=token, idem=key)
                rec.add(t0, r.status)
                if r.status < 500:
                    break
                time.sleep(0.2)
            if 200 <= r.status < 300:
                with rec.lock:
                    rec.acknowledged[label] = r.json["handle"]
            i += 1
    finally:
        api.close()


def http_signer(svc: Service, token: str, key: str, rec: Recorder, stop: threading.Event) -> None:
    api = Api(svc)
    body = {"mechanism": "CKM_SHA256_HMAC", "key": key, "data": b64(b"under load")}
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            r = api.post("/crypto/v1/sign", body, token=token)
            rec.add(t0, r.status)
            if r.status >= 500:
                time.sleep(0.2)
    finally:
        api.close()


def test_postgres_restart_under_load(
    own_postgres: PgServer, bare_mod: Module, tmp_path_factory: pytest.TempPathFactory
) -> None:
    svc = start_service(tmp_path_factory.mktemp("pgrestart"), store=own_postgres.new_database())
    try:
        _run(svc, own_postgres, bare_mod, tmp_path_factory.mktemp("module"))
    finally:
        svc.stop()


def _run(svc: Service, pg: PgServer, bare_mod: Module, work: Any) -> None:
    # Two softcards: one for the HTTP clients, one for the module's application thread.
    api = Api(svc)
    cards = []
    for _ in range(2):
        name = uuid.uuid4().hex[:20]
        r = api.post("/km/v1/softcards", {"name": name, "passphrase": b64(PASS)}, idem=new_idem())
        cards.append((name, api.ok(r)["id"]))
    token = api.activate(cards[0][1], PASS)
    key = api.import_key(cards[0][1], token, C.CKK_SHA256_HMAC, b"s" * 32, CKA_SIGN=True)
    api.close()

    cfg = work / "p11.cfg"
    lines = [
        ln
        for ln in svc.client_cfg.read_text().splitlines()
        if not ln.strip() or ln.split()[0] not in ("MAXRETRIES", "RETRYDELAY", "LOGFILEPATH")
    ]
    cfg.write_text(
        "\n".join([*lines, "MAXRETRIES 60", "RETRYDELAY 1", f"LOGFILEPATH {work / 'module.log'}"])
        + "\n"
    )
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    h = bare_mod.open(bare_mod.slot_by_label(cards[1][0]))
    assert bare_mod.login(h, PASS) == C.CKR_OK

    rec = Recorder()
    stop = threading.Event()
    app: dict[str, Any] = {"keys": [], "signed": 0, "errors": []}

    def application() -> None:
        m, _ = mechanism(C.CKM_SHA256_HMAC)
        while not stop.is_set():
            try:
                k = bare_mod.generate(h, C.CKM_GENERIC_SECRET_KEY_GEN, HMAC_GEN)
                app["keys"].append(k)
                bare_mod.ok("C_SignInit", h, byref(m), k)
                assert len(bare_mod.single("C_Sign", h, b"application data")) == 32
                app["signed"] += 1
            except BaseException as exc:
                app["errors"].append(exc)
                return

    threads = [
        threading.Thread(target=http_creator, args=(svc, cards[0][1], token, rec, stop, n))
        for n in range(2)
    ]
    threads.append(threading.Thread(target=http_signer, args=(svc, token, key, rec, stop)))
    threads.append(threading.Thread(target=application))
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        down = time.monotonic()
        pg.stop()
        time.sleep(DOWN_SECONDS)
        pg.start()
        up = time.monotonic()
        time.sleep(RECOVERY_SECONDS + 3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)

    # The application through the module saw no error, before, during or after.
    assert app["errors"] == [], app["errors"]
    assert app["signed"] >= 2

    statuses = {s for _, _, s in rec.requests}
    assert statuses <= {200, 201, 503}, statuses
    failed = [(t0, t1) for t0, t1, s in rec.requests if s == 503]
    retries = (work / "module.log").read_text(errors="replace").count("retry ")
    print(
        f"requests {len(rec.requests)}, 503s {len(failed)}, acknowledged creates "
        f"{len(rec.acknowledged)}, module keys {len(app['keys'])}, module retries {retries}"
    )
    assert failed, "no request met the outage"
    for t0, t1 in failed:  # 503 only while the database was down (or reconnecting)
        assert t1 >= down and t0 <= up + RECOVERY_SECONDS, (t0 - down, t1 - down, up - down)
    late = [s for t0, _, s in rec.requests if t0 > up + RECOVERY_SECONDS]
    assert late and all(s < 300 for s in late)

    # Nothing acknowledged is lost, nothing is made twice.
    client = KeyServiceClient(load_config(str(svc.client_cfg)))
    try:
        found: dict[str, list[str]] = {}
        api = Api(svc)
        token2 = api.activate(cards[0][1], PASS)
        objs = api.ok(
            api.post(
                f"/km/v1/softcards/{cards[0][1]}/objects/search",
                {"attrs": encode({"CKA_CLASS": C.CKO_DATA})},
                token=token2,
            )
        )
        api.close()
        for o in objs["objects"]:
            label = b64_label(o["attrs"]["CKA_LABEL"])
            found.setdefault(label, []).append(o["handle"])
        for label, handle in rec.acknowledged.items():
            assert found.get(label) == [handle], (label, found.get(label))
        assert all(len(v) == 1 for v in found.values())
        counts = {c["id"]: c for c in client.list_softcards()}
        assert counts[cards[1][1]]["keys"] == len(app["keys"])
    finally:
        client.close()


def b64_label(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()
