"""The keyed requests' direct paths (server/direct.py), attacked over real mutual TLS.

- A single request in the module's spelling whose bytes after its request id repeat the
  previous request's up to its trailing values is answered from that request's decoded head,
  an HMAC sign or verify in C. Each request is sent twice: right after a request with the same
  token (the direct path) and right after one with another token of the same card (decoded in
  full): the answers must be the same bytes and each refusal must have the same audit line.
- A batch whose items all repeat the previous batch's first item up to their trailing values
  (fastjson.one_run) is answered from one verdict, its HMAC items in C. Each batch is sent twice
  in the module's spelling (the first primes the head, the second takes the direct path) and
  once spaced out (the generic decoder): the same answers, and each refused item its audit line.

Between requests the state changes as an attacker would have it: another identity's
connection, a revoked grant, an ended session, a destroyed key and a new key in its place.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

from pkcs11ws import protocol
from pkcs11ws.server import fastjson
from tests.support.people import HMAC_VALUE, PASS, Who
from tests.support.service import Api, Service, b64, issue_client, new_idem

CARDS = "/km/v1/softcards"
MECH = "CKM_SHA256_HMAC"


def module_body(rid: str, token: str, fields: list[tuple[str, str]]) -> bytes:
    """A request as the module writes it: compact, request id, token, then its fields."""
    body = {protocol.REQUEST_ID_FIELD: rid, protocol.TOKEN_FIELD: token, **dict(fields)}
    return json.dumps(body, separators=(",", ":")).encode()


def sign_fields(key: str, data: bytes) -> list[tuple[str, str]]:
    return [("key", key), ("mechanism", MECH), ("data", b64(data))]


def verify_fields(key: str, data: bytes, mac: bytes) -> list[tuple[str, str]]:
    return [*sign_fields(key, data), ("signature", b64(mac))]


def audit_lines(svc: Service, rid: str) -> list[dict[str, Any]]:
    path = svc.dir / "log" / "audit.log"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in x.items() if k != "time"} for x in lines if x["request"] == rid]


def post(api: Api, op: str, raw: bytes) -> tuple[int, bytes]:
    r = api.request("POST", protocol.ENDPOINT_BY_OP[op].path, raw)
    return r.status, r.body


def both(
    svc: Service, api: Api, op: str, token: str, other: str, fields: list[tuple[str, str]]
) -> tuple[int, bytes]:
    """op's answer on the direct path (primed by a request with token) and decoded in full
    (primed with other): equal, and so are their audit lines (one per refusal)."""
    rid = "sd-" + uuid.uuid4().hex[:12]
    got = []
    for primer in (token, other):
        # The same request with the primer's token: decoded in full, its head kept (its
        # answer does not matter here).
        post(api, op, module_body("p-" + uuid.uuid4().hex[:8], primer, fields))
        got.append(post(api, op, module_body(rid, token, fields)))
    assert got[0] == got[1], got
    lines = audit_lines(svc, rid)
    assert len(lines) == (2 if got[0][0] >= 300 else 0), lines
    assert not lines or lines[0] == lines[1]
    return got[0]


def code(answer: tuple[int, bytes]) -> object:
    return answer[0] if answer[0] < 300 else json.loads(answer[1])["code"]


def test_direct_hmac_signs_and_verifies_as_the_full_path(
    people: dict[str, Who], service: Service
) -> None:
    a = people["alice"]
    other = a.api.activate(a.card, PASS)
    for data in (b"", b"x", bytes(range(64)), b"y" * 1000):
        mac = hmac.digest(HMAC_VALUE, data, "sha256")
        got = both(service, a.api, "sign", a.token, other, sign_fields(a.mac, data))
        assert got == (200, b'{"signature":"' + base64.b64encode(mac) + b'"}')
        got = both(service, a.api, "verify", a.token, other, verify_fields(a.mac, data, mac))
        assert got == (200, b'{"valid":true}')
    data = b"checked"
    mac = hmac.digest(HMAC_VALUE, data, "sha256")
    wrong = {
        "one bit off": bytes([mac[0] ^ 1]) + mac[1:],
        "truncated": mac[:16],
        "too long": mac + b"\x00",
        "empty": b"",
        "another data's": hmac.digest(HMAC_VALUE, b"other", "sha256"),
        "another key's": hmac.digest(b"k" * 32, data, "sha256"),
    }
    codes = {}
    for name, sig in wrong.items():
        codes[name] = code(
            both(service, a.api, "verify", a.token, other, verify_fields(a.mac, data, sig))
        )
    assert codes == {
        "one bit off": "SIGNATURE_INVALID",
        "truncated": "SIGNATURE_LEN_RANGE",
        "too long": "SIGNATURE_LEN_RANGE",
        "empty": "SIGNATURE_LEN_RANGE",
        "another data's": "SIGNATURE_INVALID",
        "another key's": "SIGNATURE_INVALID",
    }
    # Another key of the same head's spelling (an AES key cannot HMAC), a missing key.
    assert code(both(service, a.api, "sign", a.token, other, sign_fields(a.aes, data))) == (
        "KEY_TYPE_INCONSISTENT"
    )
    missing = str(uuid.uuid4())
    assert code(both(service, a.api, "sign", a.token, other, sign_fields(missing, data))) == (
        "KEY_NOT_FOUND"
    )


def test_direct_path_odd_bodies_answer_as_the_generic_decoder(
    people: dict[str, Who], service: Service
) -> None:
    """Bodies that repeat a primed head up to its trailing values and then differ: each is
    answered as when it is decoded in full (most refused as BAD_REQUEST)."""
    a = people["alice"]
    other = a.api.activate(a.card, PASS)
    mac = hmac.digest(HMAC_VALUE, b"data", "sha256")
    good = module_body("odd-1", a.token, verify_fields(a.mac, b"data", mac))
    end = b'","signature":"' + b64(mac).encode() + b'"}'
    assert good.endswith(end)
    head = good[: -len(end) - len(b64(b"data"))]
    odd = {
        "duplicate signature": good[:-1] + b',"signature":"' + b64(mac).encode() + b'"}',
        "duplicate data": head + b'ZGF0YQ==","data":"ZGF0YQ==' + end,
        "unknown field": good[:-1] + b',"extra":"x"}',
        "mac_length as a huge number": good[:-1] + b',"mac_length":' + b"9" * 400 + b"}",
        "mac_length over 64 bits": good[:-1] + b',"mac_length":18446744073709551616}',
        "mac_length as a string": good[:-1] + b',"mac_length":"32"}',
        "signature as a number": head + b'ZGF0YQ==","signature":1}',
        "data as null": head[:-1] + b'null,"signature":"' + b64(mac).encode() + b'"}',
        "non-canonical data": head + b"ZGF0YR==" + end,
        "non-canonical signature": head + b"ZGF0YQ==" + end[:-4] + b'x="}',
        "escaped data": head + b"\\u005aGF0YQ==" + end,
        "whitespace at the end": good + b"\n",
        "a second object": good + b"{}",
        "a space inside": head + b'ZGF0YQ==", "signature":"' + b64(mac).encode() + b'"}',
    }
    for name, raw in odd.items():
        got = []
        for primer in (a.token, other):
            assert (
                post(a.api, "verify", module_body("p", primer, verify_fields(a.mac, b"data", mac)))[
                    0
                ]
                == 200
            )
            got.append(
                post(
                    a.api, "verify", raw.replace(b"odd-1", b"odd-" + uuid.uuid4().hex[:8].encode())
                )
            )
        assert got[0] == got[1], (name, got)
        # (JSON allows an escape for any character, and whitespace between tokens)
        if name in ("escaped data", "whitespace at the end", "a space inside"):
            assert got[0] == (200, b'{"valid":true}'), name
        else:
            assert got[0][0] == 400, (name, got[0])


def test_direct_path_after_a_grant_revoked_a_key_destroyed_and_replaced(
    people: dict[str, Who], service: Service, tmp_path: Path
) -> None:
    """The direct path keeps no verdict across a change: each request right after one is
    refused (or answered with the new key) as the full path answers it, with its audit line."""
    a = people["alice"]
    name = f"erin-{uuid.uuid4().hex[:8]}"
    d = issue_client(service, name, tmp_path)
    erin = Api(service, d / "client.pem", d / "client.key")
    try:
        assert erin.get(CARDS).status == 200
        grant = f"{CARDS}/{a.card}/grants/{name}"
        assert a.api.request("PUT", grant).status == 200
        token = erin.activate(a.card, PASS)
        data = b"granted"
        mac = hmac.digest(HMAC_VALUE, data, "sha256")
        fields = sign_fields(a.mac, data)
        want = (200, b'{"signature":"' + base64.b64encode(mac) + b'"}')

        def again(
            api: Api, op: str, tok: str, f: list[tuple[str, str]]
        ) -> tuple[int, bytes, list[Any]]:
            post(api, op, module_body("warm", tok, f))  # primes the head (any answer)
            rid = "sd-" + uuid.uuid4().hex[:12]
            status, body = post(api, op, module_body(rid, tok, f))
            return status, body, audit_lines(service, rid)

        assert again(erin, "sign", token, fields)[:2] == want
        # erin's token on alice's connection: refused, audited under alice's identity.
        status, body, lines = again(a.api, "sign", token, fields)
        assert (status, json.loads(body)["code"]) == (401, "NOT_ACTIVATED")
        assert [(x["client"], x["code"]) for x in lines] == [(a.name, "NOT_ACTIVATED")]
        # The grant revoked between two requests of erin's.
        assert post(erin, "sign", module_body("warm", token, fields))[:2] == want
        assert a.api.request("DELETE", grant).status == 200
        status, body, lines = again(erin, "sign", token, fields)
        assert (status, json.loads(body)["code"]) == (401, "NOT_ACTIVATED"), body
        assert [(x["client"], x["code"]) for x in lines] == [(name, "NOT_ACTIVATED")]
        # The key destroyed between two of alice's, then a new value imported in its place.
        spare = a.api.import_key(a.card, a.token, 0x2B, HMAC_VALUE)
        spare_fields = sign_fields(spare, data)
        assert post(a.api, "sign", module_body("warm", a.token, spare_fields)) == want
        path = f"{CARDS}/{a.card}/objects/{spare}"
        assert a.api.delete(path, token=a.token, idem=new_idem()).status == 200
        status, body, lines = again(a.api, "sign", a.token, spare_fields)
        assert (status, json.loads(body)["code"]) == (404, "KEY_NOT_FOUND")
        assert [x["handle"] for x in lines] == [spare]
        value = bytes(reversed(HMAC_VALUE))
        new = a.api.import_key(a.card, a.token, 0x2B, value)
        new_mac = hmac.digest(value, data, "sha256")
        assert post(a.api, "sign", module_body("warm", a.token, sign_fields(new, data)))[1] == (
            b'{"signature":"' + base64.b64encode(new_mac) + b'"}'
        )
        status, body, lines = again(a.api, "verify", a.token, verify_fields(new, data, mac))
        assert (status, json.loads(body)["code"]) == (422, "SIGNATURE_INVALID")  # the old MAC
        assert len(lines) == 1 and lines[0]["code"] == "SIGNATURE_INVALID"
        # A session ended between two requests.
        fresh = a.api.activate(a.card, PASS)
        assert post(a.api, "sign", module_body("warm", fresh, fields)) == want
        assert a.api.post(f"{CARDS}/{a.card}/deactivate", token=fresh).status == 200
        status, body, lines = again(a.api, "sign", fresh, fields)
        assert (status, json.loads(body)["code"]) == (401, "NOT_ACTIVATED")
        assert len(lines) == 1
    finally:
        erin.close()


def batch_raw(rid: str, items: list[dict[str, Any]], compact: bool = True) -> bytes:
    body = {protocol.REQUEST_ID_FIELD: rid, "items": items}
    return json.dumps(body, separators=(",", ":") if compact else (", ", ": ")).encode()


def item(op: str, token: str, fields: list[tuple[str, str]]) -> dict[str, Any]:
    """A batch item in the module's spelling: its token in its request."""
    return {"op": op, "request": {protocol.TOKEN_FIELD: token, **dict(fields)}}


def batch3(svc: Service, api: Api, items: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    """The batch's (status, answer bytes) per item, sent in the module's spelling twice (the
    second repeats the first's head: the direct path's spelling, checked with fastjson itself)
    and spaced out: all three equal, with the same audit lines (one per refused item)."""
    rids = ["db-" + uuid.uuid4().hex[:12] for _ in range(3)]
    raws = [batch_raw(rids[0], items), batch_raw(rids[1], items), batch_raw(rids[2], items, False)]
    assert fastjson.batch(raws[0]) is not None
    one = fastjson.one_run(raws[1])
    assert one is not None and len(one[1][4] or ()) == len(items)
    got = []
    for raw in raws:
        r = api.request("POST", protocol.BATCH_PATH, raw)
        assert r.status == 200, r.body
        got.append([(x["status"], json.dumps(x["answer"], separators=(",", ":")).encode())
                    for x in r.json["results"]])  # fmt: skip
    assert got[0] == got[1] == got[2]
    lines = [audit_lines(svc, rid) for rid in rids]
    for x in (*lines[0], *lines[1], *lines[2]):
        del x["request"]
    assert lines[0] == lines[1] == lines[2]
    assert [x["code"] for x in lines[0]] == [code(a) for a in got[0] if a[0] >= 300]
    return got[0]


def test_direct_batch_answers_as_the_full_path(people: dict[str, Who], service: Service) -> None:
    a, b = people["alice"], people["bob"]
    datas = [b"", b"x", bytes(range(64)), b"y" * 1000, b"x"]
    macs = [hmac.digest(HMAC_VALUE, d, "sha256") for d in datas]
    signs = [item("sign", a.token, sign_fields(a.mac, d)) for d in datas]
    want = [(200, b'{"signature":"' + base64.b64encode(m) + b'"}') for m in macs]
    assert batch3(service, a.api, signs) == want
    verifies = [
        item("verify", a.token, verify_fields(a.mac, d, m))
        for d, m in zip(datas, macs, strict=True)
    ]
    assert batch3(service, a.api, verifies) == [(200, b'{"valid":true}')] * len(datas)
    # Wrong MACs inside the run: each refused alone, with its audit line.
    bad = list(macs)
    bad[1] = bytes([bad[1][0] ^ 1]) + bad[1][1:]
    bad[3] = bad[3][:16]
    bad[4] = hmac.digest(b"k" * 32, datas[4], "sha256")
    wrong = [
        item("verify", a.token, verify_fields(a.mac, d, m)) for d, m in zip(datas, bad, strict=True)
    ]
    assert [code(x) for x in batch3(service, a.api, wrong)] == [
        200, "SIGNATURE_INVALID", 200, "SIGNATURE_LEN_RANGE", "SIGNATURE_INVALID"
    ]  # fmt: skip
    # alice's batch on bob's connection (her token, her key): refused item by item, as bob.
    got = batch3(service, b.api, signs)
    assert [code(x) for x in got] == ["NOT_ACTIVATED"] * len(datas)
    rid = "db-" + uuid.uuid4().hex[:12]
    r = b.api.request("POST", protocol.BATCH_PATH, batch_raw(rid, signs))
    assert r.status == 200
    assert [(x["client"], x["code"]) for x in audit_lines(service, rid)] == (
        [(b.name, "NOT_ACTIVATED")] * len(datas)
    )
    # An AES key, another card's key, a missing key: the verdict refuses the whole run.
    for key, why in ((a.aes, "KEY_TYPE_INCONSISTENT"), (b.mac, "KEY_NOT_FOUND")):
        run = [item("sign", a.token, sign_fields(key, d)) for d in datas[:3]]
        assert [code(x) for x in batch3(service, a.api, run)] == [why] * 3
    # The same runs with the token as each item's (not in its request): the same answers, and
    # alice's on bob's connection refused item by item.
    for items, want_codes in ((signs, [200] * 5), (wrong, [200, "SIGNATURE_INVALID", 200,
                              "SIGNATURE_LEN_RANGE", "SIGNATURE_INVALID"])):  # fmt: skip
        moved = [{"op": x["op"], "token": a.token, "request": {k: v for k, v in
                  x["request"].items() if k != protocol.TOKEN_FIELD}} for x in items]  # fmt: skip
        assert [code(x) for x in batch3(service, a.api, moved)] == want_codes
        assert [code(x) for x in batch3(service, b.api, moved)] == ["NOT_ACTIVATED"] * 5
    # The token in both places in every item: each refused (given twice), never answered.
    twice = [{"op": x["op"], "token": a.token, "request": x["request"]} for x in signs]
    assert [code(x) for x in batch3(service, a.api, twice)] == ["BAD_REQUEST"] * 5
    # More items than batch.max_items (64): the batch is refused whole, both ways.
    many = [item("sign", a.token, sign_fields(a.mac, bytes([i]))) for i in range(65)]
    for _ in range(2):
        r = a.api.request("POST", protocol.BATCH_PATH, batch_raw("db-many", many))
        assert (r.status, r.code) == (413, "BATCH_TOO_LARGE")


def test_direct_batch_after_a_session_ended_a_key_destroyed_and_replaced(
    people: dict[str, Who], service: Service
) -> None:
    a = people["alice"]
    token = a.api.activate(a.card, PASS)
    key = a.api.import_key(a.card, token, 0x2B, HMAC_VALUE)
    datas = [bytes([i]) * 8 for i in range(4)]
    macs = [base64.b64encode(hmac.digest(HMAC_VALUE, d, "sha256")) for d in datas]
    want = [(200, b'{"signature":"' + m + b'"}') for m in macs]
    signs = [item("sign", token, sign_fields(key, d)) for d in datas]
    assert batch3(service, a.api, signs) == want
    path = f"{CARDS}/{a.card}/objects/{key}"
    assert a.api.delete(path, token=token, idem=new_idem()).status == 200
    assert [code(x) for x in batch3(service, a.api, signs)] == ["KEY_NOT_FOUND"] * 4
    value = bytes(reversed(HMAC_VALUE))
    new = a.api.import_key(a.card, token, 0x2B, value)
    raw_macs = [hmac.digest(HMAC_VALUE, d, "sha256") for d in datas]
    old = [
        item("verify", token, verify_fields(new, d, m))
        for d, m in zip(datas, raw_macs, strict=True)
    ]
    assert [code(x) for x in batch3(service, a.api, old)] == ["SIGNATURE_INVALID"] * 4
    assert a.api.post(f"{CARDS}/{a.card}/deactivate", token=token).status == 200
    renewed = [item("sign", token, sign_fields(new, d)) for d in datas]
    assert [code(x) for x in batch3(service, a.api, renewed)] == ["NOT_ACTIVATED"] * 4


def test_direct_batch_odd_bodies_answer_as_the_generic_decoder(
    people: dict[str, Who], service: Service
) -> None:
    """Batches that repeat a primed run's head and then differ in one item: each answered as
    when decoded in full (the whole batch refused, or each item answered in its place)."""
    a = people["alice"]
    signs = [item("sign", a.token, sign_fields(a.mac, bytes([i]))) for i in range(3)]
    good = batch_raw("db-odd", signs)
    last = b'"data":"' + b64(bytes([2])).encode() + b'"}}]}'
    assert good.endswith(last)
    cut = good[: -len(last)]
    odd = {
        "duplicate data": cut + b'"data":"QQ==","data":"QQ=="}}]}',
        "an unknown field": cut + b'"data":"QQ==","extra":"x"}}]}',
        "an item field": cut + b'"data":"QQ=="},"x":1}]}',
        "non-canonical data": cut + b'"data":"QR=="}}]}',
        "a number": cut + b'"data":1}}]}',
        "a huge mac_length": cut + b'"data":"QQ==","mac_length":' + b"9" * 300 + b"}}]}",
        "an escape": cut + b'"data":"\\u0051Q=="}}]}',
        "a space": cut + b'"data": "QQ=="}}]}',
        "trailing bytes": good + b" ",
        "a second batch": good + b"{}",
        "no closing bracket": good[:-2] + b"}",
        "an item token too": good.replace(
            b'{"op":"sign","request"',
            b'{"op":"sign","token":"' + a.token.encode() + b'","request"',
            1,
        ),
        "another op": good.replace(b'"op":"sign"', b'"op":"verify"', 1),
        "a request id twice": good.replace(b'"items"', b'"request_id":"x","items"', 1),
    }
    for name, raw in odd.items():
        got = []
        for _ in range(2):
            assert a.api.request("POST", protocol.BATCH_PATH, good).status == 200  # primes
            r = a.api.request("POST", protocol.BATCH_PATH, raw)
            got.append((r.status, r.body))
        assert got[0] == got[1], name
        spaced = None
        with contextlib.suppress(ValueError):
            spaced = json.dumps(json.loads(raw), separators=(", ", ": ")).encode()
        if spaced is not None and got[0][0] == 200:
            r = a.api.request("POST", protocol.BATCH_PATH, spaced)
            assert (r.status, r.body) == got[0], name
        whole = ("duplicate data", "an item field", "a second batch", "no closing bracket")
        if name in ("an escape", "a space", "trailing bytes"):  # (JSON as JSON reads it)
            assert got[0][0] == 200 and b'"status":4' not in got[0][1], (name, got[0])
        elif name in (*whole, "a request id twice"):
            assert got[0][0] == 400, (name, got[0])
        else:  # one item refused in its place, the others answered
            assert got[0][0] == 200 and got[0][1].count(b'"status":400') == 1, (name, got[0])
