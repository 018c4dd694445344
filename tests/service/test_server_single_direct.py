"""The single keyed request's direct path (server/single.py: a request in the module's spelling
whose bytes after its request id repeat the previous request's up to its trailing values is
answered from that request's decoded head, an HMAC sign or verify in C), attacked over real
mutual TLS.

Each request is sent twice: right after a request with the same token (the direct path) and
right after one with another token of the same card (decoded in full): the answers must be the
same bytes and each refusal must have the same audit line. Between requests the state changes
as an attacker would have it: another identity's connection, a revoked grant, an ended
session, a destroyed key and a new key in its place.
"""

from __future__ import annotations

import base64
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

from pkcs11ws import protocol
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
