"""A whole request answered at once (conn.py: _run_now and _Lean; issue 15, round 8), tried over
real mutual TLS against uvicorn's own request cycle.

A request whose bytes are all in by the end of a read runs at once with the lean receive/send;
one queued behind another answer (pipelined in the same TLS record), one that expects
`100 Continue`, or one whose body is still arriving runs as uvicorn runs it (a task, the cycle's
own receive and send). Both must look the same from outside: the same answer byte for byte (the
date header aside), the same audit and access lines, answers in request order, keep-alive,
`Connection: close` and HTTP/1.0 closing after the answer, a request that has to wait (a thread)
still answered in order before the ones pipelined behind it, and a client that goes away early
costing the service nothing. (Every other service test goes through the lean path too: it takes
every complete request but HEAD.)
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pkcs11ws import protocol
from tests.support.people import PASS, Who
from tests.support.rawtls import Answer, RecordClient
from tests.support.service import Service, b64, unb64

SIGN = protocol.ENDPOINT_BY_OP["sign"].path
DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")


def _rid() -> str:
    return "lean-" + uuid.uuid4().hex[:12]


def _request(method: str, path: str, body: bytes | None = None, *extra: str) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in extra)
    if body is None:
        return (head + "\r\n").encode()
    return (
        f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _sign_body(w: Who, token: str | None, rid: str, data: bytes = b"lean data") -> bytes:
    doc: dict[str, Any] = {protocol.REQUEST_ID_FIELD: rid}
    if token is not None:
        doc[protocol.TOKEN_FIELD] = token
    doc.update({"key": w.mac, "mechanism": "CKM_SHA256_HMAC", "data": b64(data)})
    return json.dumps(doc, separators=(",", ":")).encode()


def _cases(people: dict[str, Who]) -> dict[str, tuple[bytes, str | None]]:
    """Requests (and the request id their audit lines carry) that go through the app's hot
    paths and its refusals."""
    alice, bob = people["alice"], people["bob"]
    out: dict[str, tuple[bytes, str | None]] = {}
    rid = _rid()
    out["sign"] = (_request("POST", SIGN, _sign_body(alice, alice.token, rid)), rid)
    rid = _rid()  # another identity's token: refused, with an audit line
    out["foreign token"] = (_request("POST", SIGN, _sign_body(alice, bob.token, rid)), rid)
    rid = _rid()
    out["no token"] = (_request("POST", SIGN, _sign_body(alice, None, rid)), rid)
    out["bad json"] = (_request("POST", SIGN, b'{"key": '), None)
    rid = _rid()
    item = json.loads(_sign_body(alice, alice.token, _rid()))
    del item[protocol.REQUEST_ID_FIELD]
    batch = {protocol.REQUEST_ID_FIELD: rid, "items": [{"op": "sign", "request": item}] * 3}
    out["batch"] = (_request("POST", protocol.BATCH_PATH, json.dumps(batch).encode()), rid)
    out["query"] = (_request("POST", SIGN + "?x=1", _sign_body(alice, alice.token, _rid())), None)
    out["not found"] = (_request("GET", "/no/such/thing"), None)
    out["health"] = (_request("GET", "/health"), None)
    out["wrong method"] = (_request("GET", SIGN), None)
    return out


def _undated(a: Answer) -> bytes:
    out, n = DATE.subn(b"\r\ndate: -\r\n", a.raw)
    assert n == 1, a.raw[:300]  # uvicorn's date header, once
    return out


def _audit(svc: Service, rid: str) -> list[dict[str, Any]]:
    path = svc.dir / "log" / "audit.log"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in x.items() if k != "time"} for x in lines if x["request"] == rid]


def _access(svc: Service) -> list[str]:
    """The access lines' "METHOD PATH STATUS" (time stamp, PID and milliseconds dropped)."""
    svc.served("")  # waits for the held lines
    out = []
    for ln in svc.log_text().splitlines():
        if "pkcs11ws.server.access:" in ln:
            out.append(ln.split("pkcs11ws.server.access: ", 1)[1].rsplit(" ", 1)[0])
    return out


@pytest.fixture
def rc(service: Service, people: dict[str, Who]) -> Iterator[RecordClient]:
    c = RecordClient(service, people["alice"].api.ctx)  # alice's certificate
    try:
        yield c
    finally:
        c.close()


def test_lean_answers_are_uvicorns_byte_for_byte(service, people, rc):
    # Two copies of a request in one TLS record: the first runs at once (lean), the second is
    # queued behind its answer and runs as uvicorn runs it, in a task with the cycle's own
    # receive and send. Everything a client or an auditor sees must be the same.
    for name, (req, rid) in _cases(people).items():
        before = len(_access(service))
        rc.send(req + req)
        first, second = rc.answers(2)
        assert first.status == second.status, name
        assert _undated(first) == _undated(second), name
        if rid is not None and first.status >= 300:
            lines = _audit(service, rid)
            assert len(lines) == 2 and lines[0] == lines[1], (name, lines)
        access = _access(service)[before:]
        assert len(access) == 2 and access[0] == access[1], (name, access)
    # The expected answers, so that the two are not merely equally wrong.
    cases = _cases(people)
    statuses = {}
    for name, (req, _) in cases.items():
        statuses[name] = rc.ask(req).status
    assert statuses == {
        "sign": 200,
        "foreign token": 401,
        "no token": 401,
        "bad json": 400,
        "batch": 200,
        "query": 400,
        "not found": 404,
        "health": 200,
        "wrong method": 405,
    }


def test_expect_100_continue_takes_uvicorns_cycle_with_the_same_answer(people, rc):
    alice = people["alice"]
    body = _sign_body(alice, alice.token, _rid())
    lean = rc.ask(_request("POST", SIGN, body))
    head = _request("POST", SIGN, body, "Expect: 100-continue")[: -len(body)]
    rc.send(head)
    (interim,) = rc.answers(1)  # the app asked for the body: the cycle's receive sent this
    assert interim.status == 100
    answer = rc.ask(body)
    assert answer.status == 200 and _undated(answer) == _undated(lean)


def test_body_in_a_later_record_is_answered_the_same(people, rc):
    # The headers arrive in one read, the body in a later one: the request runs as uvicorn's
    # task, receiving its body when it comes.
    alice = people["alice"]
    body = _sign_body(alice, alice.token, _rid())
    lean = rc.ask(_request("POST", SIGN, body))
    req = _request("POST", SIGN, body)
    rc.send(req[:-10])
    time.sleep(0.3)
    rc.send(req[-10:])
    (slow,) = rc.answers(1)
    assert _undated(slow) == _undated(lean)


def test_chunked_body_in_one_record(people, rc):
    alice = people["alice"]
    body = _sign_body(alice, alice.token, _rid())
    plain = rc.ask(_request("POST", SIGN, body))
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:20], body[20:])) + b"0\r\n\r\n"
    head = f"POST {SIGN} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    answer = rc.ask(head + chunks)
    assert answer.status == 200 and _undated(answer) == _undated(plain)


@pytest.mark.parametrize("spelling", ["Connection: close", "HTTP/1.0"])
def test_a_closing_request_gets_its_answer_then_the_end(people, rc, spelling):
    alice = people["alice"]
    body = _sign_body(alice, alice.token, _rid())
    kept = rc.ask(_request("POST", SIGN, body))
    if spelling == "HTTP/1.0":
        req = _request("POST", SIGN, body).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    else:
        req = _request("POST", SIGN, body, spelling)
    # A second request after it in the same record is never answered.
    a = rc.ask(req + _request("GET", "/health"))
    assert a.status == 200 and a.headers["connection"] == "close"
    assert a.body == kept.body
    # uvicorn's rule: the close header after the app's own, before the blank line.
    assert _undated(a) == _undated(kept).replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
    assert rc.closed()


def test_a_request_that_waits_keeps_the_order_of_those_behind_it(service, people, rc):
    # Activation runs its passphrase check in a thread: the request starts at once, stops, and
    # goes on in a task; the signs pipelined behind it must wait for its answer.
    alice = people["alice"]
    activate = _request(
        "POST",
        f"/km/v1/softcards/{alice.card}/activate",
        json.dumps({"passphrase": b64(PASS)}).encode(),
    )
    signs = [_sign_body(alice, alice.token, _rid(), bytes([i])) for i in range(3)]
    rc.send(activate + b"".join(_request("POST", SIGN, b) for b in signs) + activate)
    got = rc.answers(5)
    assert [a.status for a in got] == [200] * 5
    assert "token" in json.loads(got[0].body) and "token" in json.loads(got[4].body)
    for i, a in enumerate(got[1:4]):
        assert json.loads(a.body).keys() == {"signature"}
        # each answer is its own request's: the MAC of bytes([i])
        again = rc.ask(_request("POST", SIGN, signs[i]))
        assert again.body == a.body
    assert len({a.body for a in got[1:4]}) == 3


def test_a_client_that_leaves_early_costs_nothing(service, people):
    alice = people["alice"]
    reqs = b"".join(
        _request("POST", SIGN, _sign_body(alice, alice.token, _rid(), bytes([i % 256])))
        for i in range(60)
    )
    for how in ("close", "reset"):
        c = RecordClient(service, alice.api.ctx)
        c.send(reqs)
        if how == "reset":  # RST instead of FIN: the service's writes fail
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    # A truncated body: the request waits for bytes that never come, then its client leaves.
    c = RecordClient(service, alice.api.ctx)
    body = _sign_body(alice, alice.token, _rid())
    c.send(_request("POST", SIGN, body)[:-5])
    c.close()
    time.sleep(0.5)
    c = RecordClient(service, alice.api.ctx)
    try:
        a = c.ask(_request("POST", SIGN, _sign_body(alice, alice.token, _rid())))
        assert a.status == 200 and len(unb64(json.loads(a.body)["signature"])) == 32
    finally:
        c.close()
    log = service.log_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log


def test_a_request_id_stays_with_its_request(service, people, rc):
    # Each request runs in a context of its own, as in its own task: the request id one sets
    # (for its audit lines) is not the next one's.
    alice = people["alice"]
    rid = _rid()
    ok = _request("POST", SIGN, _sign_body(alice, alice.token, rid))
    refused = _request("POST", SIGN, b'{"key": ')  # audited, with no request id of its own
    rc.send(ok)
    rc.answers(1)
    rc.send(refused + ok + refused)  # the second refusal is queued: uvicorn's task
    assert [a.status for a in rc.answers(3)] == [400, 200, 400]
    assert rc.ask(refused).status == 400
    assert _audit(service, rid) == [], _audit(service, rid)


def test_a_client_that_does_not_read_still_gets_every_answer_in_order(rc):
    # Requests one after another whose answers (~87 KB each, ~3.5 MB in all) the client leaves
    # unread while it sends: they wait in the transport and the kernel's buffers (whether
    # uvicorn pauses writing depends on how large the kernel lets those grow: a start that finds
    # writing paused waits for the drain as uvicorn's send does). Read at last, every answer is
    # there, in order.
    sizes = [65536 - i for i in range(40)]
    for n in sizes:
        rc.send(_request("POST", "/crypto/v1/random", json.dumps({"length": n}).encode()))
    got = rc.answers(len(sizes))
    assert [a.status for a in got] == [200] * len(sizes)
    assert [len(unb64(json.loads(a.body)["data"])) for a in got] == sizes
