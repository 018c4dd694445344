"""The activation token in the body of a crypto request (protocol.TOKEN_FIELD), attacked over
real mutual TLS.

The module sends the token of encrypt/decrypt/sign/verify as the body's first field instead of
an `Authorization: Bearer` header (a client formats every header byte). Either place must give
exactly the same verdicts: identity binding, card binding, expiry, revocation, audit. A token
in both places is refused whatever it is; a request with no token anywhere gets the same
NOT_ACTIVATED as before; the header alone keeps working for other clients. The request id may
travel in the body too (protocol.REQUEST_ID_FIELD): it reaches the audit trail as the header's
does, and a batch item's own id is that item's only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import protocol
from tests.support.people import HMAC_VALUE, PASS, Who
from tests.support.service import Api, Resp, Service, b64, unb64

CARDS = "/km/v1/softcards"


def bodies(w: Who) -> dict[str, dict[str, Any]]:
    """A valid request of each keyed crypto endpoint for w's keys (no token)."""
    sig = b64(hmac.digest(HMAC_VALUE, b"data", hashlib.sha256))
    return {
        "sign": {"key": w.mac, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"data")},
        "verify": {"key": w.mac, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"data"),
                   "signature": sig},
        "encrypt": {"key": w.aes, "mechanism": "CKM_AES_CBC", "iv": b64(bytes(16)),
                    "data": b64(bytes(32))},
        "decrypt": {"key": w.aes, "mechanism": "CKM_AES_CBC", "iv": b64(bytes(16)),
                    "data": b64(bytes(32))},
    }  # fmt: skip


KEYED = ("sign", "verify", "encrypt", "decrypt")


def in_body(token: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The body with the token as its first field, as the module writes it."""
    return {protocol.TOKEN_FIELD: token, **body}


def send(api: Api, op: str, body: Any, token: str | None = None, rid: str = "") -> Resp:
    ep = protocol.ENDPOINT_BY_OP[op]
    headers = {"X-Request-Id": rid} if rid else None
    return api.request(ep.method, ep.path, body, token=token, headers=headers)


@pytest.mark.parametrize("op", KEYED)
def test_token_in_body_answers_as_the_header(people: dict[str, Who], op: str) -> None:
    a = people["alice"]
    body = bodies(a)[op]
    by_header = send(a.api, op, body, token=a.token)
    assert by_header.status == 200, by_header.body
    by_body = send(a.api, op, in_body(a.token, body))
    assert (by_body.status, by_body.body) == (by_header.status, by_header.body)
    # The module's own spelling (compact, token first: the service's fast decoder) and any
    # other spelling (token last, spaces: the generic strict decoder) are the same request.
    compact = json.dumps(in_body(a.token, body), separators=(",", ":")).encode()
    assert compact.startswith(b'{"token":')
    loose = json.dumps({**body, protocol.TOKEN_FIELD: a.token}, indent=1).encode()
    for raw in (compact, loose):
        r = send(a.api, op, raw)
        assert (r.status, r.body) == (by_header.status, by_header.body)


@pytest.mark.parametrize("op", KEYED)
def test_another_identitys_token_in_body_is_refused(people: dict[str, Who], op: str) -> None:
    """bob holds alice's stolen token and knows her key handles: over his own connection the
    body form gets exactly what the header form gets (NOT_ACTIVATED), and alice's own request
    with the same body works (so the probe reached the check it claims to test)."""
    a, b = people["alice"], people["bob"]
    body = bodies(a)[op]
    header = send(b.api, op, body, token=a.token)
    stolen = send(b.api, op, in_body(a.token, body))
    assert (stolen.status, stolen.code) == (401, "NOT_ACTIVATED")
    assert (stolen.status, stolen.body) == (header.status, header.body)
    assert send(a.api, op, in_body(a.token, body)).status == 200


def test_token_for_another_card_does_not_reach_its_keys(
    people: dict[str, Who], api: Api, service: Service
) -> None:
    """One identity, two softcards: the first card's token in the body does not open the
    second card's key (the same answer as with the header), nor does bob's own token open
    alice's key."""
    a, b = people["alice"], people["bob"]
    other_card, other_token = a.api.new_card(PASS)
    other_mac = a.api.import_key(other_card, other_token, 0x2B, HMAC_VALUE)
    body = {**bodies(a)["sign"], "key": other_mac}
    header = send(a.api, "sign", body, token=a.token)
    crossed = send(a.api, "sign", in_body(a.token, body))
    assert crossed.status == 404 and crossed.code == "KEY_NOT_FOUND"
    assert (crossed.status, crossed.body) == (header.status, header.body)
    assert send(a.api, "sign", in_body(other_token, body)).status == 200
    # bob's own valid token with alice's key handle.
    mine = send(b.api, "sign", in_body(b.token, bodies(a)["sign"]))
    assert (mine.status, mine.code) == (404, "KEY_NOT_FOUND")


@pytest.mark.parametrize("op", KEYED)
def test_token_in_both_places_is_refused(people: dict[str, Who], op: str) -> None:
    """Header and body: refused even when both are the same valid token, and whatever the
    other one is; nothing is signed or decrypted."""
    a, b = people["alice"], people["bob"]
    body = bodies(a)[op]
    for header, inner in ((a.token, a.token), (a.token, b.token), (b.token, a.token)):
        r = send(a.api, op, in_body(inner, body), token=header)
        assert r.status in (400, 401), r.body
        if header == a.token:  # a valid header token: the duplicate itself is the refusal
            assert r.code == "BAD_REQUEST" and "twice" in r.json["message"], r.body
        else:  # bob's token over alice's connection fails first
            assert r.code == "NOT_ACTIVATED"


def test_no_token_anywhere_is_not_activated_as_before(people: dict[str, Who]) -> None:
    a = people["alice"]
    for op in KEYED:
        r = send(a.api, op, bodies(a)[op])
        assert (r.status, r.code) == (401, "NOT_ACTIVATED")
        assert "no activation token" in r.json["message"]


MALFORMED: list[tuple[str, Any, str]] = [
    ("number", 12345, "BAD_REQUEST"),
    ("null", None, "BAD_REQUEST"),
    ("list", ["x"], "BAD_REQUEST"),
    ("empty", "", "NOT_ACTIVATED"),
    ("garbage", "not-a-sealed-token", "NOT_ACTIVATED"),
    ("non-ascii", "t\u00f6ken", "NOT_ACTIVATED"),
    ("lone surrogate", "\ud800", "NOT_ACTIVATED"),
    ("bearer prefix", "Bearer x", "NOT_ACTIVATED"),
    ("over the limit", "A" * (protocol.MAX_TOKEN + 1), "BAD_REQUEST"),
]


@pytest.mark.parametrize(("why", "token", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_token_is_refused_cleanly(
    people: dict[str, Who], why: str, token: Any, code: str
) -> None:
    a = people["alice"]
    r = send(a.api, "sign", in_body(token, bodies(a)["sign"]))
    assert r.code == code, (why, r.status, r.body)
    assert r.status == protocol.ERRORS[code].http


def test_altered_body_token_is_refused(people: dict[str, Who]) -> None:
    """A sealed token with one character changed, truncated, or with spaces around."""
    a = people["alice"]
    t = a.token
    flipped = t[:-3] + ("A" if t[-3] != "A" else "B") + t[-2:]
    for token in (flipped, t[:-4], t[1:]):
        r = send(a.api, "sign", in_body(token, bodies(a)["sign"]))
        assert (r.status, r.code) == (401, "NOT_ACTIVATED"), token


def test_duplicate_token_field_is_refused(people: dict[str, Who]) -> None:
    a = people["alice"]
    b = bodies(a)["sign"]
    raw = (
        f'{{"token":"{a.token}","token":"{people["bob"].token}","key":"{b["key"]}",'
        f'"mechanism":"{b["mechanism"]}","data":"{b["data"]}"}}'
    ).encode()
    r = send(a.api, "sign", raw)
    assert (r.status, r.code) == (400, "BAD_REQUEST") and "duplicate" in r.json["message"]


def test_token_field_only_on_the_crypto_requests(people: dict[str, Who]) -> None:
    """The other endpoints know no such field: their token stays in the header (one in the
    body opens nothing)."""
    a = people["alice"]
    search = f"{CARDS}/{a.card}/objects/search"
    r = a.api.post(search, {"token": a.token, "attrs": {}})
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    r = a.api.post(search, {"token": a.token, "attrs": {}}, token=a.token)
    assert (r.status, r.code) == (400, "UNKNOWN_FIELD")
    r = a.api.post("/crypto/v1/random", {"token": a.token, "length": 8})
    assert (r.status, r.code) == (400, "UNKNOWN_FIELD")


def test_batch_items_with_the_token_in_the_request(people: dict[str, Who]) -> None:
    """A batch item's request may carry the token instead of the item: each such item
    answers as its single request; the item's and the request's token together are refused;
    bob's batch with alice's token in a request gets NOT_ACTIVATED for that item only."""
    a, b = people["alice"], people["bob"]
    items = [{"op": op, "request": in_body(a.token, bodies(a)[op])} for op in KEYED]
    items.append({"op": "sign", "token": a.token, "request": in_body(a.token, bodies(a)["sign"])})
    items.append({"op": "sign", "request": bodies(a)["sign"]})  # no token anywhere
    r = a.api.post(protocol.BATCH_PATH, {"items": items})
    assert r.status == 200, r.body
    got = r.json["results"]
    for op, res in zip(KEYED, got, strict=False):
        one = send(a.api, op, bodies(a)[op], token=a.token)
        assert (res["status"], json.dumps(res["answer"], separators=(",", ":")).encode()) == (
            one.status,
            one.body,
        )
    assert (got[4]["status"], got[4]["answer"]["code"]) == (400, "BAD_REQUEST")
    assert "twice" in got[4]["answer"]["message"]
    assert (got[5]["status"], got[5]["answer"]["code"]) == (401, "NOT_ACTIVATED")
    stolen = b.api.post(
        protocol.BATCH_PATH,
        {"items": [{"op": "sign", "request": in_body(a.token, bodies(a)["sign"])},
                   {"op": "sign", "request": in_body(b.token, bodies(b)["sign"])}]},
    )  # fmt: skip
    assert stolen.status == 200
    s0, s1 = stolen.json["results"]
    assert (s0["status"], s0["answer"]["code"]) == (401, "NOT_ACTIVATED")
    assert s1["status"] == 200
    # A batch item's own token field, malformed: that item's NOT_ACTIVATED, not a failure.
    odd = a.api.post(
        protocol.BATCH_PATH,
        {"items": [{"op": "sign", "token": "\ud800", "request": bodies(a)["sign"]}]},
    )
    assert (odd.status, odd.json["results"][0]["status"]) == (200, 401), odd.body
    assert unb64(s1["answer"]["signature"]) == hmac.digest(HMAC_VALUE, b"data", hashlib.sha256)


def _audit(svc: Service) -> list[dict[str, Any]]:
    path = svc.dir / "log" / "audit.log"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_refusal_is_audited_and_the_token_never_logged(
    people: dict[str, Who], service: Service
) -> None:
    a, b = people["alice"], people["bob"]
    rid = "rid-" + uuid.uuid4().hex[:12]
    r = send(b.api, "sign", in_body(a.token, bodies(a)["sign"]), rid=rid)
    assert r.code == "NOT_ACTIVATED"
    (line,) = [x for x in _audit(service) if x["request"] == rid]
    assert (line["client"], line["op"], line["outcome"], line["code"]) == (
        b.name,
        "sign",
        "refused",
        "NOT_ACTIVATED",
    )
    assert line["handle"] == a.mac
    rid2 = "rid-" + uuid.uuid4().hex[:12]
    r = send(a.api, "sign", in_body(a.token, bodies(a)["sign"]), token=a.token, rid=rid2)
    assert r.code == "BAD_REQUEST"
    (line,) = [x for x in _audit(service) if x["request"] == rid2]
    assert (line["client"], line["op"], line["code"]) == (a.name, "sign", "BAD_REQUEST")
    for log in Path(service.dir / "log").iterdir():
        if log.is_file():
            text = log.read_text(errors="replace")
            assert a.token not in text and b.token not in text, log.name


def test_revoked_and_expired_body_tokens(fresh_service: Any, make_api: Any) -> None:
    """Revocation (deactivate) and expiry end a token in the body as in the header, also once
    its claims are cached by the service."""
    svc = fresh_service(overrides={"activation_ttl": 2})
    api: Api = make_api(svc)
    w = Who(api, "admin")
    t0 = time.monotonic()
    body = bodies(w)["sign"]
    assert send(api, "sign", in_body(w.token, body)).status == 200  # claims now cached
    second = api.activate(w.card, PASS)
    assert send(api, "sign", in_body(second, body)).status == 200
    assert api.post(f"{CARDS}/{w.card}/deactivate", token=second).status == 200
    for how in ("body", "header"):
        r = (
            send(api, "sign", in_body(second, body))
            if how == "body"
            else send(api, "sign", body, token=second)
        )
        assert (r.status, r.code) == (401, "NOT_ACTIVATED"), how
    time.sleep(max(0.0, t0 + 3.1 - time.monotonic()))
    r = send(api, "sign", in_body(w.token, body))
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    assert "expired" in r.json["message"]


# The request id in the body (protocol.REQUEST_ID_FIELD): the module's single crypto requests
# carry theirs as the first field instead of the X-Request-Id header.


def test_body_request_id_reaches_the_audit_trail(people: dict[str, Who], service: Service) -> None:
    a, b = people["alice"], people["bob"]
    rid, header_rid = "body-" + uuid.uuid4().hex[:12], "hdr-" + uuid.uuid4().hex[:12]
    body = {protocol.REQUEST_ID_FIELD: rid, **in_body(a.token, bodies(a)["sign"])}
    assert send(a.api, "sign", body).status == 200  # a good read: no audit line
    r = send(b.api, "sign", body, rid=header_rid)  # refused: audited, the body's id wins
    assert r.code == "NOT_ACTIVATED"
    lines = [x for x in _audit(service) if x["request"] in (rid, header_rid)]
    assert [(x["request"], x["client"], x["code"]) for x in lines] == [
        (rid, b.name, "NOT_ACTIVATED")
    ]


@pytest.mark.parametrize("rid", ["", "a b", "x" * 65, "line\nbreak", "caf\u00e9", 7])
def test_malformed_body_request_id_is_refused(people: dict[str, Who], rid: Any) -> None:
    a = people["alice"]
    body = {protocol.REQUEST_ID_FIELD: rid, **in_body(a.token, bodies(a)["sign"])}
    r = send(a.api, "sign", body)
    assert (r.status, r.code) == (400, "BAD_REQUEST"), r.body


def test_batch_item_request_ids_are_their_own(people: dict[str, Who], service: Service) -> None:
    """An item's own request id is audited for that item only; the others keep the batch's."""
    a, b = people["alice"], people["bob"]
    batch_rid, item_rid = "batch-" + uuid.uuid4().hex[:12], "item-" + uuid.uuid4().hex[:12]
    stolen = in_body(a.token, bodies(a)["sign"])
    items = [
        {"op": "sign", "request": stolen},
        {"op": "sign", "request": {protocol.REQUEST_ID_FIELD: item_rid, **stolen}},
        {"op": "sign", "request": stolen},
    ]
    r = b.api.post(protocol.BATCH_PATH, {"items": items}, headers={"X-Request-Id": batch_rid})
    assert [x["status"] for x in r.json["results"]] == [401, 401, 401]
    lines = [x["request"] for x in _audit(service) if x["request"] in (batch_rid, item_rid)]
    assert lines == [batch_rid, item_rid, batch_rid]
