"""One TLS record per answer: the service's response head and body leave together.

A client reading the raw TLS stream (an ssl.MemoryBIO client over a plain socket, fed one
record at a time) counts the records that carry application data: an answer that fits one
record comes in one, a large one in as few as its size allows, and nothing else changes: keep-
alive, pipelined requests answered in order, `Connection: close`, HEAD (refused, with no
body), the interim `100 Continue`, and the 400 refusal of a malformed request. The 431
refusals are tried in test_server_connections.py, a 500 in test_server_masterkey.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.rawtls import RecordClient, post
from tests.support.service import Service, unb64

MAX_RECORD = 16384  # TLS plaintext per record
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _random(n: int) -> bytes:
    return post("/crypto/v1/random", {"length": n})


@pytest.fixture
def rc(service: Service) -> Iterator[RecordClient]:
    c = RecordClient(service)
    try:
        yield c
    finally:
        c.close()


def test_answers_come_in_one_record_on_a_kept_alive_connection(rc):
    for req, status in ((HEALTH, 200), (_random(32), 200), (b"GET /no/such HTTP/1.1\r\n\r\n", 404)):
        for _ in range(2):
            a = rc.ask(req)
            assert a.status == status, a.body
            assert json.loads(a.body)
            assert len(rc.records) == 1, rc.records  # head and body together
    assert len(unb64(json.loads(rc.ask(_random(32)).body)["data"])) == 32


def test_pipelined_requests_are_answered_in_order(rc):
    rc.send(HEALTH + _random(7) + b"GET /no/such HTTP/1.1\r\n\r\n" + _random(9) + HEALTH)
    got = rc.answers(5)
    assert [a.status for a in got] == [200, 200, 404, 200, 200]
    assert [len(unb64(json.loads(got[i].body)["data"])) for i in (1, 3)] == [7, 9]
    assert len(rc.records) == 5, rc.records
    assert all(json.loads(a.body) for a in got)


def test_connection_close_answer_then_eof(rc):
    a = rc.ask(post("/crypto/v1/random", {"length": 16}, "Connection: close"))
    assert a.status == 200 and a.headers["connection"] == "close"
    assert len(unb64(json.loads(a.body)["data"])) == 16
    assert len(rc.records) == 1, rc.records
    assert rc.closed()


def test_large_answer_in_as_few_records_as_it_needs(rc):
    rc.send(_random(65536))
    (a,) = rc.answers(1)
    assert a.status == 200 and len(unb64(json.loads(a.body)["data"])) == 65536
    total = sum(rc.records)
    assert len(rc.records) == -(-total // MAX_RECORD), rc.records  # no short record for the head
    assert rc.ask(HEALTH).status == 200 and len(rc.records) == 1  # the connection goes on


def test_head_answer_leaves_without_a_body(rc):
    # HEAD is no method of the API: 405, whose head is sent with no body write after it.
    rc.send(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    (a,) = rc.answers(1, heads_only=1)
    assert a.status == 405 and a.body == b"" and int(a.headers["content-length"]) > 0
    assert len(rc.records) == 1, rc.records
    b = rc.ask(HEALTH)  # nothing of the 405's body was sent: the next answer parses
    assert b.status == 200 and json.loads(b.body)["status"] == "ok"


def test_interim_100_continue_is_sent_before_the_body_comes(rc):
    body = json.dumps({"length": 5}).encode()
    rc.send(
        b"POST /crypto/v1/random HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    (interim,) = rc.answers(1)  # the service sends it with nothing after it, then waits
    assert interim.status == 100
    a = rc.ask(body)
    assert a.status == 200 and len(unb64(json.loads(a.body)["data"])) == 5
    assert len(rc.records) == 1, rc.records


def test_malformed_request_gets_400_then_close(rc):
    assert rc.ask(HEALTH).status == 200
    a = rc.ask(b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n")
    assert a.status == 400 and a.headers["connection"] == "close"
    assert a.body == b"Invalid HTTP request received."
    assert rc.closed()
