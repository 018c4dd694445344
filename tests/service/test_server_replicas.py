"""Two key service replicas on one PostgreSQL database: any replica answers any request.

Both replicas run from ONE server.yaml (`init --store postgresql://...`, then `serve --port` for
the second), over real mutual TLS; the database is the session's real PostgreSQL server. What
one replica did, the other sees: an activation, a lockout, an idempotent create retried there.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml

from pkcs11ws import constants as C
from tests.support.service import Api, Service, b64, encode, new_idem, start_replica, start_service

PASS = b"replicated passphrase"
THRESHOLD = 5


@pytest.fixture(scope="module")
def pair(postgres: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Service]]:
    url = postgres.new_database()
    lockout = {"lockout": {"threshold": THRESHOLD, "max_seconds": 300}}
    a = start_service(tmp_path_factory.mktemp("replicas"), store=url, overrides=lockout)
    made = [a]
    try:
        made.append(start_replica(a))
        yield made
    finally:
        for svc in made:
            svc.stop()


@pytest.fixture
def apis(pair: list[Service]) -> Iterator[list[Api]]:
    clients = [Api(svc) for svc in pair]
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def db_url(svc: Service) -> str:
    return str(yaml.safe_load(svc.server_yaml.read_text())["store"])


def create_card_id(api: Api) -> str:
    body = {"name": uuid.uuid4().hex[:20], "passphrase": b64(PASS)}
    return str(api.ok(api.post("/km/v1/softcards", body, idem=new_idem()))["id"])


def test_one_configuration_two_ports(pair: list[Service]) -> None:
    a, b = pair
    assert a.server_yaml == b.server_yaml and a.port != b.port
    assert db_url(a).startswith("postgresql://")
    assert "store postgresql://" in a.log_text()


def test_an_activation_made_on_one_works_on_the_other(apis: list[Api]) -> None:
    a, b = apis
    card = create_card_id(a)
    token = a.activate(card, PASS)
    # The card, the session and a key made through A are all there for B, and the reverse.
    key = b.import_key(card, token, C.CKK_SHA256_HMAC, b"k" * 32, CKA_SIGN=True, CKA_VERIFY=True)
    sign = {"mechanism": "CKM_SHA256_HMAC", "key": key, "data": b64(b"replicated")}
    sig_a = a.ok(a.post("/crypto/v1/sign", sign, token=token))
    sig_b = b.ok(b.post("/crypto/v1/sign", sign, token=token))
    assert sig_a == sig_b
    # Deactivating on B ends the activation on A.
    b.ok(b.post(f"/km/v1/softcards/{card}/deactivate", token=token))
    r = a.post("/crypto/v1/sign", sign, token=token)
    assert r.code == "NOT_ACTIVATED"


def test_the_lockout_is_shared(apis: list[Api]) -> None:
    a = apis[0]
    card = create_card_id(a)
    wrong = {"passphrase": b64(b"wrong")}
    for i in range(THRESHOLD):
        api = apis[i % 2]
        assert api.post(f"/km/v1/softcards/{card}/activate", wrong).code == "PASSPHRASE_INCORRECT"
    # Locked on both, even for the right passphrase.
    for api in apis:
        r = api.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(PASS)})
        assert r.code == "PASSPHRASE_LOCKED", r.body


def test_concurrent_wrong_passphrases_on_both_replicas_are_all_counted(
    pair: list[Service],
) -> None:
    # Wrong passphrases sent to both replicas at once: every one that was answered "incorrect"
    # is in the card's failure count (no lost update between replicas).
    card = create_card_id(Api(pair[0]))
    codes: list[str | None] = []
    lock = threading.Lock()

    def attempt(svc: Service) -> None:
        api = Api(svc)
        try:
            for _ in range(2):
                r = api.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(b"bad")})
                with lock:
                    codes.append(r.code)
        finally:
            api.close()

    threads = [threading.Thread(target=attempt, args=(pair[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 12
    assert set(codes) <= {"PASSPHRASE_INCORRECT", "PASSPHRASE_LOCKED"}, codes
    with psycopg.connect(db_url(pair[0])) as con:
        row = con.execute("SELECT failures FROM softcards WHERE id = %s", (card,)).fetchone()
    assert row is not None
    assert row[0] == codes.count("PASSPHRASE_INCORRECT") >= THRESHOLD


def test_a_guessing_burst_over_both_replicas_gets_at_most_threshold_evaluations(
    pair: list[Service],
) -> None:
    # 30 wrong passphrases at once, half to each replica, each on its own connection: the
    # reservation in the shared database lets at most THRESHOLD reach scrypt, on both together.
    card = create_card_id(Api(pair[0]))
    results: list[str | None] = []
    lock = threading.Lock()
    start = threading.Barrier(30, timeout=300)

    def attempt(svc: Service) -> None:
        api = Api(svc)
        try:
            api.get("/health")  # connected before the barrier
            start.wait()
            r = api.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(b"guess")})
            with lock:
                results.append(r.code)
        finally:
            api.close()

    threads = [threading.Thread(target=attempt, args=(pair[i % 2],)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 30
    incorrect = results.count("PASSPHRASE_INCORRECT")
    assert incorrect + results.count("PASSPHRASE_LOCKED") == 30, results
    assert 1 <= incorrect <= THRESHOLD, results
    # Server side: scrypt ran once per "incorrect" answer, counting both replicas' logs.
    line = f"login failed: softcard {card}: wrong passphrase"
    deadline = time.monotonic() + 10
    while sum(svc.log_text().count(line) for svc in pair) < incorrect:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(svc.log_text().count(line) for svc in pair) == incorrect


def test_an_idempotent_create_retried_on_the_other_replica_returns_the_first_answer(
    apis: list[Api],
) -> None:
    a, b = apis
    card = create_card_id(a)
    token = a.activate(card, PASS)
    body = {"attrs": encode({"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": b"once", "CKA_VALUE": b"v"})}
    key = new_idem()
    path = f"/km/v1/softcards/{card}/objects"
    first = a.post(path, body, token=token, idem=key)
    again = b.post(path, body, token=token, idem=key)
    assert first.status == again.status == 201 or (first.status, again.status) == (200, 200)
    assert first.json == again.json
    # The same key with another body is a conflict on either replica.
    other = {"attrs": encode({"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": b"twice"})}
    assert b.post(path, other, token=token, idem=key).code == "IDEMPOTENCY_CONFLICT"
    found = a.ok(
        a.post(
            f"/km/v1/softcards/{card}/objects/search",
            {"attrs": encode({"CKA_LABEL": b"once"})},
            token=token,
        )
    )
    assert [o["handle"] for o in found["objects"]] == [first.json["handle"]]


def test_the_same_create_sent_to_both_replicas_at_once_makes_one_object(
    pair: list[Service], apis: list[Api]
) -> None:
    card = create_card_id(apis[0])
    token = apis[0].activate(card, PASS)
    path = f"/km/v1/softcards/{card}/objects"
    for round_ in range(3):
        label = f"race{round_}".encode()
        body = {"attrs": encode({"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": label})}
        key = new_idem()
        answers: list[Any] = []
        start = threading.Barrier(4)

        def send(
            svc: Service,
            body: Any = body,
            key: str = key,
            start: Any = start,
            answers: list[Any] = answers,
        ) -> None:
            api = Api(svc)
            try:
                start.wait(30)
                answers.append(api.post(path, body, token=token, idem=key))
            finally:
                api.close()

        threads = [threading.Thread(target=send, args=(pair[i % 2],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 4
        assert all(200 <= r.status < 300 for r in answers), [r.body for r in answers]
        assert len({r.body for r in answers}) == 1
        found = apis[1].ok(
            apis[1].post(
                f"/km/v1/softcards/{card}/objects/search",
                {"attrs": encode({"CKA_LABEL": label})},
                token=token,
            )
        )
        assert len(found["objects"]) == 1
