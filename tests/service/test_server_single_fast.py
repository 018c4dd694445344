"""The single crypto request's short cuts (issue 15, round 6), attacked over real mutual TLS.

- A request in the module's spelling whose bytes after its request id repeat the previous
  request's up to its last value decodes only those two values (fastjson.decoder): every such
  request, refusals included, must be answered byte for byte as when it is decoded in full, with
  the same audit line.
- A body token's claims are cached by its str (App._keyed): the identity and expiry checks
  still run on every request.
- A single keyed request goes from its path straight to the crypto (App._http): a query
  string, another method and the body limits are still refused as before.
- The access lines are written in bounded batches (accesslog.py): every line is there once the
  service has stopped on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import protocol
from tests.support.chunked import post_in_pieces
from tests.support.people import PASS, Who
from tests.support.service import Api, Resp, Service, b64


def module_body(rid: str, token: str, fields: list[tuple[str, str]]) -> bytes:
    """A request as the module writes it (client/wire.py, client/request_ids.py): compact,
    the request id first, then the token, then the operation's fields."""
    parts = [f'"{protocol.REQUEST_ID_FIELD}":"{rid}"', f'"{protocol.TOKEN_FIELD}":"{token}"']
    parts += [f'"{k}":"{v}"' for k, v in fields]
    return ("{" + ",".join(parts) + "}").encode()


def fields_of(w: Who, op: str) -> list[tuple[str, str]]:
    if op in ("sign", "verify"):
        out = [("key", w.mac), ("mechanism", "CKM_SHA256_HMAC"), ("data", b64(b"data"))]
        if op == "verify":
            out.append(("signature", b64(bytes(32))))  # a wrong MAC: SIGNATURE_INVALID
        return out
    return [
        ("key", w.aes),
        ("mechanism", "CKM_AES_CBC"),
        ("iv", b64(bytes(16))),
        ("data", b64(bytes(32))),
    ]


def post(api: Api, op: str, raw: bytes) -> Resp:
    return api.request("POST", protocol.ENDPOINT_BY_OP[op].path, raw)


def audit_lines(svc: Service, rid: str) -> list[dict[str, Any]]:
    path = svc.dir / "log" / "audit.log"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in x.items() if k != "time"} for x in lines if x["request"] == rid]


def variants(token: str, fields: list[tuple[str, str]]) -> dict[str, bytes]:
    """Requests that share the primed request's bytes between the request id and the last
    value, or nearly: each must get the answer its full decoding gives."""
    last_name, last = fields[-1]
    head = fields[:-1]

    def with_last(value: str) -> bytes:
        return module_body("rq-" + uuid.uuid4().hex[:8], token, [*head, (last_name, value)])

    good = module_body("rq-" + uuid.uuid4().hex[:8], token, fields)
    return {
        "valid": good,
        "rid with a space": module_body("a b", token, fields),
        "rid too long": module_body("r" * 65, token, fields),
        "empty rid": module_body("", token, fields),
        "rid with an escape": module_body("ab\\u0041", token, fields),
        "rid with a quote": module_body('ab\\"', token, fields),
        "non-ASCII rid": module_body("caf\u00e9", token, fields),
        "non-canonical base64": with_last(last[:-2] + "F="),
        "not base64": with_last("!!!!"),
        "escaped last value": with_last("\\u0041AAA"),
        "empty last value": with_last(""),
        "trailing bytes": good + b" ",
        "a second closing brace": good + b"}",
        "the last value unterminated": good[:-2],
    }


# Variants the protocol accepts (an escape is a character like any other; JSON allows whitespace
# after the object; empty data is data).
ACCEPTED = ("rid with an escape", "escaped last value", "empty last value", "trailing bytes")


@pytest.mark.parametrize("op", ["sign", "verify", "encrypt", "decrypt"])
def test_repeated_request_answers_as_decoded_in_full(
    people: dict[str, Who], service: Service, op: str
) -> None:
    a = people["alice"]
    fields = fields_of(a, op)
    # A second token of the same card: a request with it has other bytes after its request id,
    # so the one after it is decoded in full.
    other = a.api.activate(a.card, PASS)
    for name, raw in variants(a.token, fields).items():
        answers = []
        for primer in (a.token, other):
            primed = post(a.api, op, module_body("p-" + uuid.uuid4().hex[:8], primer, fields))
            assert primed.status == (422 if op == "verify" else 200), primed.body  # (a wrong MAC)
            r = post(a.api, op, raw)
            answers.append((r.status, r.body, r.headers["content-length"]))
        assert answers[0] == answers[1], name
        if name == "valid":
            assert answers[0][0] == (422 if op == "verify" else 200), answers[0]
        elif name not in ACCEPTED:
            assert answers[0][0] == 400, (name, answers[0])


def test_repeated_request_refusals_audit_alike(people: dict[str, Who], service: Service) -> None:
    """A refusal on the repeated path has the audit line of the same refusal decoded in full;
    another identity's repeat of alice's bytes is refused as a forged token."""
    a, b = people["alice"], people["bob"]
    fields = fields_of(a, "sign")
    other = a.api.activate(a.card, PASS)
    rid = "rq-" + uuid.uuid4().hex[:12]
    raw = module_body(rid, a.token, fields)
    got = []
    for primer in (a.token, other):
        # alice's request primes bob's worker too: one worker (the shared service).
        assert post(a.api, "sign", module_body("p1", primer, fields)).status == 200
        r = post(b.api, "sign", raw)
        got.append((r.status, r.body))
    assert got[0] == got[1]
    assert got[0][0] == 401 and json.loads(got[0][1])["code"] == "NOT_ACTIVATED"
    lines = audit_lines(service, rid)
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert (lines[0]["client"], lines[0]["op"], lines[0]["code"]) == (
        b.name,
        "sign",
        "NOT_ACTIVATED",
    )
    # A malformed last value on the repeated path: the same BAD_REQUEST and audit line.
    rid2 = "rq-" + uuid.uuid4().hex[:12]
    bad = module_body(rid2, a.token, [*fields[:-1], ("data", "AAF=")])
    got = []
    for primer in (a.token, other):
        assert post(a.api, "sign", module_body("p2", primer, fields)).status == 200
        # (a body refused before its request id is read is audited under the header's)
        r = a.api.request(
            "POST", protocol.ENDPOINT_BY_OP["sign"].path, bad, headers={"X-Request-Id": rid2}
        )
        got.append((r.status, r.body))
    assert got[0] == got[1] and got[0][0] == 400
    lines = audit_lines(service, rid2)
    assert len(lines) == 2 and lines[0] == lines[1], lines


def test_cached_body_token_still_bound_to_its_identity(people: dict[str, Who]) -> None:
    """bob's use of alice's token is refused the same way before and after alice's requests
    cached its claims by the token's str."""
    a, b = people["alice"], people["bob"]
    token = a.api.activate(a.card, PASS)  # never used yet: no cache holds it
    fields = fields_of(a, "sign")
    first = post(b.api, "sign", module_body("t1", token, fields))
    assert post(a.api, "sign", module_body("t2", token, fields)).status == 200  # now cached
    again = post(b.api, "sign", module_body("t1", token, fields))
    assert (first.status, first.body) == (again.status, again.body)
    assert first.code == "NOT_ACTIVATED"
    # The header spelling sees the same.
    r = b.api.request(
        "POST",
        protocol.ENDPOINT_BY_OP["sign"].path,
        {k: v for k, v in fields},
        token=token,
    )
    assert (r.status, r.body) == (first.status, first.body)


def test_keyed_endpoint_refuses_a_query_first(people: dict[str, Who]) -> None:
    a = people["alice"]
    path = protocol.ENDPOINT_BY_OP["sign"].path
    fields = fields_of(a, "sign")
    r = a.api.request("POST", path + "?x=true", module_body("q1", a.token, fields))
    assert (r.status, r.json) == (
        400,
        {"code": "BAD_REQUEST", "message": "unknown query parameter 'x'"},
    )
    # Before the token: a request without one is refused for its query, not its token.
    no_token = json.dumps({k: v for k, v in fields}).encode()
    r = a.api.request("POST", path + "?a=%zz&&", no_token)
    assert (r.status, r.json) == (400, {"code": "BAD_REQUEST", "message": "malformed query string"})
    assert a.api.request("POST", path, no_token).code == "NOT_ACTIVATED"


def test_keyed_path_keeps_the_routes_refusals(people: dict[str, Who], service: Service) -> None:
    """The direct path takes only POST on the four keyed paths: another method is refused as
    the router refuses it, and the body limits hold before the body is read or decoded."""
    a = people["alice"]
    path = protocol.ENDPOINT_BY_OP["sign"].path
    r = a.api.request("GET", path)
    assert (r.status, r.json) == (
        405,
        {"code": "METHOD_NOT_ALLOWED", "message": f"GET is not allowed on {path}"},
    )
    conn = http.client.HTTPSConnection("127.0.0.1", service.port, context=a.api.ctx, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Length", "9" * 12)  # refused before any byte of it is read
        conn.endheaders()
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert (status, body["code"]) == (413, "BODY_TOO_LARGE"), body


def test_keyed_body_in_pieces(people: dict[str, Who], service: Service) -> None:
    """The direct path reads a body that comes in several messages as a whole: the same answer
    as in one piece."""
    a = people["alice"]
    path = protocol.ENDPOINT_BY_OP["sign"].path
    raw = module_body("rq-pieces", a.token, fields_of(a, "sign"))
    whole = post(a.api, "sign", raw)
    assert whole.status == 200, whole.body
    third = len(raw) // 3
    got = post_in_pieces(
        service, a.api, path, [raw[:third], raw[third : 2 * third], raw[2 * third :]]
    )
    assert got == (200, whole.json)


def test_keyed_body_in_pieces_over_the_limit(fresh_service: Any, make_api: Any) -> None:
    """Without a Content-Length the direct path counts the pieces against max_body."""
    svc = fresh_service(overrides={"max_body": 2048})
    api = make_api(svc)
    path = protocol.ENDPOINT_BY_OP["sign"].path
    try:
        status, body = post_in_pieces(svc, api, path, [b"x" * 1000] * 3)
        assert (status, body["code"]) == (413, "BODY_TOO_LARGE"), body
        status, body = post_in_pieces(svc, api, path, [b"{", b"}"])  # within it: decoded, refused
        assert (status, body["code"]) == (400, "BAD_REQUEST"), body
    finally:
        api.close()


def test_every_access_line_is_written_by_a_clean_stop(fresh_service: Any, make_api: Any) -> None:
    """Access lines are held up to accesslog.FLUSH_SECONDS: a SIGTERM stop writes them all."""
    svc: Service = fresh_service()
    api: Api = make_api(svc)
    marker = uuid.uuid4().hex
    for i in range(30):
        assert api.get(f"/km/v1/softcards/{marker}{i}").status == 404
    api.close()
    assert svc.stop() == 0
    text = Path(svc.log).read_text()
    lines = [ln for ln in text.splitlines() if "pkcs11ws.server.access" in ln and marker in ln]
    assert [ln.split(marker)[1].split()[0] for ln in lines] == [str(i) for i in range(30)]
    assert all(ln.split()[-2:-1] == ["404"] for ln in lines), lines[:3]
