"""The passphrase lockout under parallel guessing, over real mutual TLS, as an attacker tries it.

Every guess comes on its own fresh TLS connection (connected first, then all sent at once from
a barrier), against a service with two worker processes. The service logs one "login failed"
line per passphrase it actually evaluated (scrypt ran); with threshold 5 at most 5 may appear,
every other guess must be answered PASSPHRASE_LOCKED. A second test checks that the capped
scrypt pool keeps a guessing burst from starving the signing of an active session.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pkcs11ws import constants as C
from tests.support.service import b64, unb64

RIGHT = b"the right passphrase"
# Generous limits for the test's own connections: they are opened first and wait for the
# barrier, which can take a while on a loaded machine.
PATIENT = {"connections": {"handshake_timeout": 120, "keep_alive_timeout": 120}}


def _burst(svc, path: str, bodies: list[bytes]) -> list[tuple[int, str]]:
    ctx = ssl.create_default_context(cafile=str(svc.ca))
    ctx.load_cert_chain(str(svc.cert), str(svc.key))
    barrier = threading.Barrier(len(bodies), timeout=300)

    def one(body: bytes) -> tuple[int, str]:
        conn = http.client.HTTPSConnection("127.0.0.1", svc.port, context=ctx, timeout=300)
        try:
            conn.connect()
            barrier.wait()
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read()).get("code", "")
        finally:
            conn.close()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def _evaluated(svc, card: str) -> int:
    return svc.log_text().count(f"login failed: softcard {card}: wrong passphrase")


@pytest.mark.parametrize("guesses", [40, 200])
def test_parallel_wrong_passphrases_get_at_most_threshold_evaluations(
    guesses, fresh_service, make_api
):
    svc = fresh_service(workers=2, overrides=PATIENT)
    api = make_api(svc)
    card, _ = api.new_card(RIGHT)
    body = json.dumps({"passphrase": b64(b"wrong guess")}).encode()
    results = _burst(svc, f"/km/v1/softcards/{card}/activate", [body] * guesses)
    codes = [code for _, code in results]
    incorrect = codes.count("PASSPHRASE_INCORRECT")
    locked = codes.count("PASSPHRASE_LOCKED")
    assert incorrect + locked == guesses, codes
    assert 1 <= incorrect <= 5, codes
    assert all(status == 429 for status, code in results if code == "PASSPHRASE_LOCKED")
    # Server side: scrypt ran exactly for the guesses answered "incorrect", never more.
    deadline = time.monotonic() + 10
    while _evaluated(svc, card) < incorrect and time.monotonic() < deadline:
        time.sleep(0.1)  # the log line of the last answer may still be on its way
    assert _evaluated(svc, card) == incorrect <= 5
    # The refusals did not extend the lock: once it runs out, the right passphrase works
    # (the 5th failure locks for 1 s; more time is allowed for a loaded machine).
    deadline = time.monotonic() + 30
    while True:
        r = api.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(RIGHT)})
        if r.status == 200 or time.monotonic() > deadline:
            break
        assert r.code == "PASSPHRASE_LOCKED", r.body
        time.sleep(0.5)
    assert r.status == 200, r.body
    assert _evaluated(svc, card) == incorrect  # the right passphrase is no failure


def test_guessing_burst_does_not_starve_signing(fresh_service, make_api):
    # Costly scrypt (n = 2^15) and one scrypt at a time: 40 evaluated guesses keep the pool
    # busy for seconds, while the active session below keeps signing and storing keys (without
    # the cap, the guesses' scrypt jobs would hold every thread of the pool that store writes
    # use, and the writes would wait behind them).
    svc = fresh_service(overrides={**PATIENT, "scrypt": {"n": 2**15, "max_concurrent": 1}})
    api = make_api(svc)
    card, token = api.new_card(RIGHT)
    value = os.urandom(32)
    key = api.import_key(card, token, C.CKK_GENERIC_SECRET, value, CKA_SIGN=True)
    victims = [
        api.ok(
            api.post(
                "/km/v1/softcards",
                {"name": os.urandom(8).hex(), "passphrase": b64(RIGHT)},
                idem="t-" + os.urandom(8).hex(),
            )
        )["id"]
        for _ in range(8)
    ]
    bodies = [json.dumps({"passphrase": b64(b"guess %d" % i)}).encode() for i in range(5)]
    done: list[float] = []

    def guess_all() -> None:
        with ThreadPoolExecutor(len(victims)) as pool:
            for results in pool.map(
                lambda c: _burst(svc, f"/km/v1/softcards/{c}/activate", bodies), victims
            ):
                assert [code for _, code in results].count("PASSPHRASE_INCORRECT") <= 5
        done.append(time.monotonic())

    t = threading.Thread(target=guess_all)
    t.start()
    try:
        # Wait until the evaluations have started, then sign while they run.
        deadline = time.monotonic() + 120
        while not any(_evaluated(svc, c) for c in victims) and time.monotonic() < deadline:
            time.sleep(0.05)
        signed = 0
        while not done and signed < 20:
            r = api.post(
                "/crypto/v1/sign",
                {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"x")},
                token=token,
            )
            assert len(unb64(api.ok(r)["signature"])) == 32
            if signed % 5 == 0:  # a store write too: it runs on the loop's thread pool
                api.import_key(card, token, C.CKK_GENERIC_SECRET, os.urandom(32), CKA_SIGN=True)
            signed += 1
        assert not done, "the guessing burst ended before signing was tried"
        assert signed == 20
    finally:
        t.join(300)
    assert sum(_evaluated(svc, c) for c in victims) <= 5 * len(victims)


def test_parallel_right_passphrases_all_get_in(fresh_service, make_api):
    """The quota holds attempts back while others are evaluated; it refuses none that are
    right (20 processes logging in at once must all succeed)."""
    svc = fresh_service(workers=2, overrides=PATIENT)
    api = make_api(svc)
    card, _ = api.new_card(RIGHT)
    body = json.dumps({"passphrase": b64(RIGHT)}).encode()
    results = _burst(svc, f"/km/v1/softcards/{card}/activate", [body] * 30)
    assert [status for status, _ in results] == [200] * 30, results
    assert _evaluated(svc, card) == 0
