"""POST /crypto/v1/batch over real mutual TLS: every item answers exactly as its single request.

Each item goes through the same pipeline as the single endpoint (token, identity binding, key
checks, strict decoding, audit), so the tests compare each item's (status, answer) with the
same operation sent alone: byte for byte, successes and refusals alike, including another
identity's token and key. The limits (count and bytes) are refused as a whole, cleanly.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pkcs11ws import protocol
from tests.support.chunked import post_in_pieces
from tests.support.service import Api, Resp, Service, b64, issue_client, unb64

BATCH = protocol.BATCH_PATH
PASS = b"batch passphrase"
HMAC_VALUE = bytes(range(32))
AES_VALUE = bytes(range(16))


class Who:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.card, self.token = api.new_card(PASS)
        self.mac = api.import_key(self.card, self.token, 0x2B, HMAC_VALUE)
        self.aes = api.import_key(self.card, self.token, 0x1F, AES_VALUE)


@pytest.fixture(scope="module")
def keyholders(
    service: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Who]]:
    made: dict[str, Who] = {}
    try:
        for role in ("alice", "bob"):
            d = issue_client(
                service, f"{role}-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp(role)
            )
            made[role] = Who(Api(service, d / "client.pem", d / "client.key"))
        yield made
    finally:
        for w in made.values():
            w.api.close()


def sign_body(key: str, data: bytes = b"data") -> dict[str, Any]:
    return {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(data)}


def item(op: str, token: str | None, request: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"op": op, "request": request}
    if token is not None:
        out["token"] = token
    return out


def single(api: Api, op: str, token: str | None, request: Any) -> Resp:
    ep = protocol.ENDPOINT_BY_OP[op]
    return api.request(ep.method, ep.path, request, token=token)


def batch(api: Api, items: list[dict[str, Any]], **kw: Any) -> list[tuple[int, bytes]]:
    r = api.post(BATCH, {"items": items}, **kw)
    assert r.status == 200, (r.status, r.body)
    results = r.json["results"]
    assert len(results) == len(items)
    # Re-encode each answer as the service does (compact), to compare with a single answer.
    return [(x["status"], json.dumps(x["answer"], separators=(",", ":")).encode()) for x in results]


def same_as_single(api: Api, items: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    got = batch(api, items)
    for it, (status, answer) in zip(items, got, strict=True):
        if it["op"] in protocol.BATCHABLE and it["op"] != "random":
            one = single(api, it["op"], it.get("token"), it["request"])
            assert (status, answer) == (one.status, one.body), it
    return got


def test_mixed_items_each_with_its_own_answer(keyholders: dict[str, Who]) -> None:
    a = keyholders["alice"]
    t = a.token
    mac = hmac.digest(HMAC_VALUE, b"data", hashlib.sha256)
    iv = b64(bytes(16))
    items = [
        item("sign", t, sign_body(a.mac)),
        item("verify", t, {**sign_body(a.mac), "signature": b64(mac)}),
        item("verify", t, {**sign_body(a.mac), "signature": b64(bytes(32))}),  # wrong MAC
        item("sign", t, sign_body(str(uuid.uuid4()))),  # no such key
        item("sign", t, sign_body(a.aes)),  # an AES key cannot HMAC
        item(
            "encrypt",
            t,
            {"key": a.aes, "mechanism": "CKM_AES_CBC", "iv": iv, "data": b64(bytes(32))},
        ),
        item(
            "decrypt",
            t,
            {"key": a.aes, "mechanism": "CKM_AES_CBC", "iv": iv, "data": b64(bytes(15))},
        ),
        item("sign", t, {**sign_body(a.mac), "data": "QUJD===="}),  # non-canonical base64
        item("sign", t, {**sign_body(a.mac), "extra": 1}),  # unknown field
        item("sign", None, sign_body(a.mac)),  # no token
        item("sign", "v1.AAAA" + t[7:], sign_body(a.mac)),  # forged token
        item("random", None, {"length": 24}),
    ]
    got = same_as_single(a.api, items)
    codes = [json.loads(ans).get("code") if st >= 300 else st for st, ans in got]
    assert codes == [
        200,
        200,
        "SIGNATURE_INVALID",
        "KEY_NOT_FOUND",
        "KEY_TYPE_INCONSISTENT",
        200,
        "ENCRYPTED_DATA_LEN_RANGE",
        "BAD_BASE64",
        "UNKNOWN_FIELD",
        "NOT_ACTIVATED",
        "NOT_ACTIVATED",
        200,
    ]
    assert unb64(json.loads(got[0][1])["signature"]) == mac
    assert len(unb64(json.loads(got[-1][1])["data"])) == 24


def test_only_read_only_operations_are_batched(keyholders: dict[str, Who]) -> None:
    a = keyholders["alice"]
    changing = [
        item("generate_key", a.token, {"mechanism": "CKM_AES_KEY_GEN", "attrs": {}}),
        item("delete_object", a.token, {}),
        item("batch", None, {"items": []}),
        item("nonsense", None, {}),
    ]
    before = a.api.ok(a.api.get(f"/km/v1/softcards/{a.card}"))["keys"]
    for status, answer in batch(a.api, [*changing, item("sign", a.token, sign_body(a.mac))])[:4]:
        assert (status, json.loads(answer)["code"]) == (400, "BAD_REQUEST")
    assert a.api.ok(a.api.get(f"/km/v1/softcards/{a.card}"))["keys"] == before


def test_another_identitys_token_and_key_refused_per_item(
    keyholders: dict[str, Who], service: Service
) -> None:
    a, b = keyholders["alice"], keyholders["bob"]
    rid = "batch-" + uuid.uuid4().hex[:12]
    items = [
        item("sign", a.token, sign_body(a.mac)),  # alice's token over bob's connection
        item("sign", b.token, sign_body(a.mac)),  # bob's token, alice's key
        item("sign", b.token, sign_body(str(uuid.uuid4()))),  # a key that does not exist
        item("sign", b.token, sign_body(b.mac)),  # bob's own: fine
    ]
    r = b.api.post(BATCH, {"items": items}, headers={"X-Request-Id": rid})
    got = [(x["status"], x["answer"]) for x in r.json["results"]]
    assert (got[0][0], got[0][1]["code"]) == (401, "NOT_ACTIVATED")
    # Another's key answers exactly as a missing one.
    assert got[1] == got[2] and got[1][1]["code"] == "KEY_NOT_FOUND"
    assert got[3][0] == 200
    # The same as single requests over bob's connection.
    assert (got[0][0], json.dumps(got[0][1], separators=(",", ":")).encode()) == (
        lambda x: (x.status, x.body)
    )(single(b.api, "sign", a.token, sign_body(a.mac)))
    # The refused items are audited, one line each, with bob's identity and the request id.
    lines = [json.loads(x) for x in (service.dir / "log" / "audit.log").read_text().splitlines()]
    mine = [x for x in lines if x.get("request") == rid]
    assert sorted(x["code"] for x in mine) == ["KEY_NOT_FOUND", "KEY_NOT_FOUND", "NOT_ACTIVATED"]
    assert all(x["op"] == "sign" and x["outcome"] == "refused" for x in mine)
    assert a.token not in (service.dir / "log" / "audit.log").read_text()


def test_ended_session_refused_per_item(keyholders: dict[str, Who], service: Service) -> None:
    api = keyholders["alice"].api
    card, token = api.new_card(PASS)
    key = api.import_key(card, token, 0x2B, HMAC_VALUE)
    assert batch(api, [item("sign", token, sign_body(key))])[0][0] == 200
    assert api.post(f"/km/v1/softcards/{card}/deactivate", token=token).status == 200
    (status, answer), ok = batch(
        api, [item("sign", token, sign_body(key)), item("random", None, {"length": 1})]
    )
    assert (status, json.loads(answer)["code"]) == (401, "NOT_ACTIVATED") and ok[0] == 200


def test_limits_count_and_bytes(keyholders: dict[str, Who], service: Service) -> None:
    api = keyholders["alice"].api
    rnd = item("random", None, {"length": 1})
    assert len(batch(api, [rnd] * 64)) == 64  # batch.max_items default
    r = api.post(BATCH, {"items": [rnd] * 65})
    assert (r.status, r.code) == (413, "BATCH_TOO_LARGE")
    # batch.max_bytes (1 MiB by default), though a single request may be up to max_body (8 MiB).
    big = b64(bytes(600 * 1024))
    a = keyholders["alice"]
    two = [item("sign", a.token, sign_body(a.mac, bytes(600 * 1024)))] * 2
    r = api.post(BATCH, {"items": two})
    assert (r.status, r.code) == (413, "BATCH_TOO_LARGE")
    one = single(api, "sign", a.token, {**sign_body(a.mac), "data": big})
    assert one.status == 200
    assert batch(api, two[:1]) == [(200, one.body)]
    # Off-schema batches are refused whole, as any bad body.
    bodies: list[object] = [{"items": {}}, {"items": [{"op": "random"}]}, {"items": [], "x": 1}, []]
    for body in bodies:
        r = api.post(BATCH, body)
        assert r.status == 400 and r.code in ("BAD_REQUEST", "UNKNOWN_FIELD"), body
    assert batch(api, []) == []


def test_batch_path_keeps_the_routes_refusals(keyholders: dict[str, Who], service: Service) -> None:
    """The batch endpoint's direct path (App._http) refuses what the router and _operation
    refused: another method, a query parameter, a declared size over batch.max_bytes; and reads
    a body that comes in pieces as a whole."""
    a = keyholders["alice"]
    r = a.api.request("GET", BATCH)
    assert (r.status, r.code) == (405, "METHOD_NOT_ALLOWED")
    items = [item("sign", a.token, sign_body(a.mac, b"%d" % i)) for i in range(3)]
    for qs in ("?x=true", "?&", "?a"):
        r = a.api.post(BATCH + qs, {"items": items})
        assert (r.status, r.code) == (400, "BAD_REQUEST"), qs
    conn = http.client.HTTPSConnection("127.0.0.1", service.port, context=a.api.ctx, timeout=30)
    try:
        conn.putrequest("POST", BATCH)
        conn.putheader("Content-Length", str(2**40))  # refused before any byte of it is read
        conn.endheaders()
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["code"]) == (413, "BATCH_TOO_LARGE")
    finally:
        conn.close()
    raw = json.dumps({"items": items}).encode()
    whole = batch(a.api, items)
    status, answer = post_in_pieces(service, a.api, BATCH, [raw[:40], raw[40:90], raw[90:]])
    assert status == 200
    assert [(x["status"], x["answer"]) for x in answer["results"]] == [
        (s, json.loads(b)) for s, b in whole
    ]
