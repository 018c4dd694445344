"""The crypto path's verdict cache never outlives a change, whichever process made it.

Each worker keeps the outcome of a crypto request's checks (live session, key row, mechanism,
type, usage: handlers.Service._key) while the store's change mark stays the same. Seen as an
attacker holding a token: once a grant is withdrawn, a key destroyed, a softcard deleted or a
session ended, by another worker or by another replica process on the same store, no worker
serves the next request from what it had cached, single or batched, over real mutual TLS.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import protocol
from tests.support.service import Api, Service, b64, issue_client, new_idem, start_replica

PASS = b"verdict passphrase"
CARDS = "/km/v1/softcards"
SIGN = "/crypto/v1/sign"
HMAC_KEY = 0x2B  # CKK_SHA256_HMAC


def _body(key: str, data: bytes) -> dict[str, Any]:
    return {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(data)}


def _single(api: Api, key: str, token: str, data: bytes) -> tuple[int, str | None]:
    api.close()  # a new connection, which the kernel hands to either worker
    r = api.post(SIGN, _body(key, data), token=token)
    return r.status, r.code


def _batched(api: Api, key: str, token: str, data: bytes) -> tuple[int, str | None]:
    api.close()
    items = [{"op": "sign", "token": token, "request": _body(key, data + b"%d" % i)}
             for i in range(3)]  # fmt: skip
    r = api.post(protocol.BATCH_PATH, {"items": items})
    assert r.status == 200, r.body
    got = {(x["status"], x["answer"].get("code")) for x in r.json["results"]}
    assert len(got) == 1, got  # the same verdict for each item
    return got.pop()


def _answers(svc: Service, path: str, status: int) -> Counter[str]:
    """How many such answers each worker (by PID, from the access log) has given so far."""
    log = svc.log_text()
    return Counter(re.findall(rf" (\d+) INFO pkcs11ws\.server\.access: POST {path} {status} ", log))


def _everywhere(svc: Service, api: Api, key: str, token: str, want: tuple[int, str | None]) -> None:
    """Single and batched signatures on fresh connections answer `want` until both workers
    have answered each kind."""
    for send, path in ((_single, SIGN), (_batched, protocol.BATCH_PATH)):
        status = want[0] if send is _single else 200
        before = _answers(svc, path, status)
        for i in range(80):
            assert send(api, key, token, b"%d" % i) == want, (send.__name__, i)
            if i >= 3 and len(_answers(svc, path, status) - before) >= 2:
                break
        else:
            time.sleep(0.5)  # the last log lines may still be on their way
            got = _answers(svc, path, status) - before  # the PIDs with new answers
            assert len(got) == 2, "the requests did not reach both workers"


@pytest.fixture
def pair(fresh_service: Any) -> Iterator[tuple[Service, Service]]:
    """A service with two workers, and another replica process on the same SQLite store."""
    svc = fresh_service(workers=2)
    other = start_replica(svc)
    try:
        yield svc, other
    finally:
        other.stop()


def test_withdrawn_grant_ends_cached_use_at_once(
    pair: tuple[Service, Service], tmp_path: Path
) -> None:
    svc, other = pair
    alice_dir = issue_client(svc, f"alice{uuid.uuid4().hex[:8]}", tmp_path / "alice")
    bob_name = f"bob{uuid.uuid4().hex[:8]}"
    bob_dir = issue_client(svc, bob_name, tmp_path / "bob")
    alice = Api(svc, alice_dir / "client.pem", alice_dir / "client.key")
    bob = Api(svc, bob_dir / "client.pem", bob_dir / "client.key")
    alice_there = Api(other, alice_dir / "client.pem", alice_dir / "client.key")
    try:
        card, token = alice.new_card(PASS)
        key = alice.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True)
        grant = f"{CARDS}/{card}/grants/{bob_name}"
        assert alice.request("PUT", grant).status == 200
        bob_token = bob.activate(card, PASS)
        _everywhere(svc, bob, key, bob_token, (200, None))  # both workers hold the verdict
        # Withdrawn through the other replica process: its commit is all the workers see.
        assert alice_there.delete(grant).status == 200
        _everywhere(svc, bob, key, bob_token, (401, "NOT_ACTIVATED"))
        # The owner's own activation is untouched.
        _everywhere(svc, alice, key, token, (200, None))
    finally:
        for a in (alice, bob, alice_there):
            a.close()


def test_destroyed_key_deleted_card_and_logout_refused_at_once(
    pair: tuple[Service, Service],
) -> None:
    svc, other = pair
    api, there = Api(svc), Api(other)
    try:
        card, token = api.new_card(PASS)
        key = api.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True)
        spare = api.import_key(card, token, HMAC_KEY, b"s" * 32, CKA_SIGN=True)
        _everywhere(svc, api, key, token, (200, None))
        _everywhere(svc, api, spare, token, (200, None))
        r = there.delete(f"{CARDS}/{card}/objects/{key}", token=token, idem=new_idem())
        assert r.status == 200
        _everywhere(svc, api, key, token, (404, "KEY_NOT_FOUND"))
        _everywhere(svc, api, spare, token, (200, None))
        # A logout, then a new login whose verdicts are cached again.
        assert there.post(f"{CARDS}/{card}/deactivate", token=token).status == 200
        _everywhere(svc, api, spare, token, (401, "NOT_ACTIVATED"))
        fresh = api.activate(card, PASS)
        _everywhere(svc, api, spare, fresh, (200, None))
        r = there.delete(f"{CARDS}/{card}?force=true", idem=new_idem())
        assert r.status == 200, r.body
        _everywhere(svc, api, spare, fresh, (401, "NOT_ACTIVATED"))
    finally:
        api.close()
        there.close()


def test_verdict_is_per_mechanism_and_operation(service: Service, api: Api) -> None:
    """A cached success for one mechanism or operation answers for no other."""
    card, token = api.new_card(PASS)
    key = api.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True, CKA_VERIFY=False)
    for _ in range(3):
        assert api.post(SIGN, _body(key, b"x"), token=token).status == 200
        r = api.post(SIGN, {**_body(key, b"x"), "mechanism": "CKM_AES_CBC"}, token=token)
        assert r.code == "MECHANISM_INVALID"
        r = api.post(SIGN, {**_body(key, b"x"), "mechanism": "CKM_SHA384_HMAC"}, token=token)
        assert r.code == "KEY_TYPE_INCONSISTENT"
        r = api.post("/crypto/v1/verify", {**_body(key, b"x"), "signature": b64(b"s" * 32)},
                     token=token)  # fmt: skip
        assert r.code == "KEY_FUNCTION_NOT_PERMITTED"
        assert json.loads(api.post(SIGN, _body(key, b"y"), token=token).body)["signature"]


def _module_sign(api: Api, key: str, token: str, data: bytes) -> tuple[int, str | None]:
    """A sign in the module's spelling (request id and token first in a compact body: the
    service's direct path) on api's kept connection, so the same worker answers each time."""
    body = {protocol.REQUEST_ID_FIELD: uuid.uuid4().hex, protocol.TOKEN_FIELD: token,
            **_body(key, data)}  # fmt: skip
    r = api.post(SIGN, json.dumps(body, separators=(",", ":")).encode())
    return r.status, r.code


def test_next_request_on_a_kept_connection_sees_another_process_change(
    pair: tuple[Service, Service],
) -> None:
    """The change mark is read afresh for every request that arrives after a change: on one
    kept connection whose worker holds the verdict (requests back to back, in the module's
    spelling), the very next request after the other process's answer is refused."""
    svc, other = pair
    api, there = Api(svc), Api(other)
    try:
        card, token = api.new_card(PASS)
        key = api.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True)
        spare = api.import_key(card, token, HMAC_KEY, b"s" * 32, CKA_SIGN=True)
        for i in range(20):
            assert _module_sign(api, key, token, b"%d" % i) == (200, None)
            assert _module_sign(api, spare, token, b"%d" % i) == (200, None)
        r = there.delete(f"{CARDS}/{card}/objects/{key}", token=token, idem=new_idem())
        assert r.status == 200
        assert _module_sign(api, key, token, b"after") == (404, "KEY_NOT_FOUND")
        assert _module_sign(api, spare, token, b"after") == (200, None)
        assert there.post(f"{CARDS}/{card}/deactivate", token=token).status == 200
        assert _module_sign(api, spare, token, b"after") == (401, "NOT_ACTIVATED")
        # And a change this worker's own process made (another connection, either worker).
        fresh = api.activate(card, PASS)
        for i in range(5):
            assert _module_sign(api, spare, fresh, b"%d" % i) == (200, None)
        side = Api(svc)
        try:
            r = side.delete(f"{CARDS}/{card}/objects/{spare}", token=fresh, idem=new_idem())
            assert r.status == 200
        finally:
            side.close()
        assert _module_sign(api, spare, fresh, b"gone") == (404, "KEY_NOT_FOUND")
    finally:
        api.close()
        there.close()
