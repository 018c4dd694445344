"""Connection hygiene of the key service, tried from outside over real sockets and mutual TLS.

A TCP connection that never starts TLS, a TLS connection that never sends a request, and a
request whose headers dribble in byte by byte are all closed by the service; established
connections are capped (the next one is closed and logged, the existing ones keep working);
oversized header blocks and too many header lines get 431; bodies must be UTF-8 JSON without
duplicate keys. A client in steady use, even one uploading its body slowly, keeps its
kept-alive connection. Times are only bounded loosely (a loaded machine is slow).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import time

import pytest

from tests.support.service import b64, new_idem

LIMITS = {
    "handshake_timeout": 2,
    "keep_alive_timeout": 3,
    "header_timeout": 3,
    "max_header_bytes": 16384,
    "max_headers": 100,
}
CLOSE_WITHIN = 60.0  # generous: the service closes after a few seconds


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from tests.support.service import start_service

    s = start_service(tmp_path_factory.mktemp("conn"), overrides={"connections": LIMITS})
    try:
        yield s
    finally:
        s.stop()


def _ctx(svc) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(svc.ca))
    ctx.load_cert_chain(str(svc.cert), str(svc.key))
    return ctx


def _tls(svc) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", svc.port), timeout=CLOSE_WITHIN)
    return _ctx(svc).wrap_socket(raw, server_hostname="localhost")


def _closed_by_peer(sock: socket.socket, timeout: float = CLOSE_WITHIN) -> bool:
    """True when the peer closes (EOF or reset) within timeout, with nothing sent meanwhile."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(CLOSE_WITHIN)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def _poll(sock: ssl.SSLSocket, wait: float) -> bytes | None:
    """Application data the peer sent within wait seconds: b"" at EOF or reset, None if
    nothing (TLS 1.3 session tickets make the socket readable without any data)."""
    if not select.select([sock], [], [], wait)[0] and not sock.pending():
        return None
    sock.settimeout(0.2)
    try:
        return sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    except (TimeoutError, ssl.SSLWantReadError):
        return None
    except ssl.SSLError:
        return b""
    finally:
        sock.settimeout(CLOSE_WITHIN)


def _send_until_answered(sock: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send payload in pieces, stopping as soon as the service answers (it refuses early and
    closes: sending on would only reset the connection and lose the answer)."""
    for i in range(0, len(payload), 8192):
        got = _poll(sock, 0)
        if got is not None:
            return got + _read_response(sock)
        try:
            sock.sendall(payload[i : i + 8192])
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            break
    return _read_response(sock)


def test_tcp_connection_without_tls_is_dropped(svc):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=CLOSE_WITHIN) as s:
        assert _closed_by_peer(s)
    assert time.monotonic() - t0 >= 1.0  # the handshake timeout (2 s), not an instant refusal


def test_idle_tls_connection_is_closed(svc):
    t0 = time.monotonic()
    with _tls(svc) as s:
        assert _closed_by_peer(s)
    assert time.monotonic() - t0 >= 2.0


def test_slow_headers_are_reaped(svc):
    with _tls(svc) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < CLOSE_WITHIN:
            try:
                s.sendall(b"X")  # one byte of a header line every half second
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                closed = True
                break
            got = _poll(s, 0.5)
            if got is not None:
                closed = got == b""
                break
        assert closed
        assert time.monotonic() - t0 >= 2.0  # after header_timeout (3 s), not at once


def test_steady_client_keeps_its_connection_even_with_a_slow_body(svc):
    conn = http.client.HTTPSConnection("127.0.0.1", svc.port, context=_ctx(svc), timeout=60)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None
    sock = conn.sock
    # Requests one second apart, for longer than the keep-alive and header timeouts.
    for _ in range(5):
        time.sleep(1.0)
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and conn.sock is sock
    # A body sent slowly (over more than header_timeout and keep_alive_timeout): the request
    # is in progress, so no limit may close it.
    body = json.dumps({"name": "slow" + new_idem()[2:14], "passphrase": b64(b"slow upload")})
    head = (
        "POST /km/v1/softcards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {new_idem()}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode())
    for i in range(0, len(body), len(body) // 5 + 1):
        time.sleep(1.0)
        sock.sendall(body[i : i + len(body) // 5 + 1].encode())
    r = conn.response_class(sock, method="POST")
    r.begin()
    assert r.status == 200, r.read()
    r.read()
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    assert r.status == 200 and conn.sock is sock
    conn.close()


def test_header_block_over_the_limit_gets_431(svc):
    with _tls(svc) as s:
        big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        answer = _send_until_answered(s, big)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"over 16384 bytes" in answer


@pytest.mark.parametrize("count", [10000, 101])
def test_too_many_header_lines_get_431(svc, count):
    with _tls(svc) as s:
        many = b"GET /health HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(count))
        answer = _send_until_answered(s, many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    # 101 short lines fit the byte limit: the count refuses them. 10,000 (about 90 KB) are
    # refused by whichever limit is hit first: bytes while they arrive, or the count when a
    # single read held them all.
    reasons = [b"more than 100 header lines"] + ([b"over 16384 bytes"] if count > 101 else [])
    assert any(r in answer for r in reasons), answer


def test_normal_headers_still_pass(svc, make_api):
    api = make_api(svc)
    r = api.get("/health", headers={f"X-Pad-{i}": "v" * 100 for i in range(90)})
    assert r.status == 200  # 90 headers, about 10 KB: under both limits


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"name": "u16", "passphrase": b64(b"utf-16 body")}).encode("utf-16"),
        json.dumps({"name": "u16", "passphrase": b64(b"utf-16 body")}).encode("utf-16-le"),
        b"\xef\xbb\xbf" + json.dumps({"name": "bom", "passphrase": b64(b"utf-8 bom ")}).encode(),
        b'{"name": "caf\xe9", "passphrase": "cGFzc3BocmFzZQ=="}',  # Latin-1, not UTF-8
    ],
)
def test_body_must_be_utf8(svc, make_api, body):
    api = make_api(svc)
    r = api.post("/km/v1/softcards", body, idem=new_idem())
    assert (r.status, r.code) == (400, "BAD_REQUEST"), r.body


def test_duplicate_keys_are_refused(svc, make_api):
    api = make_api(svc)
    p = b64(b"duplicate keys")
    body = b'{"name": "first", "name": "second", "passphrase": "' + p.encode() + b'"}'
    r = api.post("/km/v1/softcards", body, idem=new_idem())
    assert (r.status, r.code) == (400, "BAD_REQUEST") and "duplicate key" in r.json["message"]
    nested = b'{"name": "n1", "passphrase": "' + p.encode() + b'", "x": {"a": 1, "a": 2}}'
    r = api.post("/km/v1/softcards", nested, idem=new_idem())
    assert r.code == "BAD_REQUEST" and "duplicate key 'a'" in r.json["message"]
    # A batch's items are parsed with their batch: the same strictness reaches inside them
    # (a duplicate inside one item refuses the whole batch, as any bad body).
    item = b'{"op": "random", "request": {"length": 1, "length": 64}}'
    r = api.post("/crypto/v1/batch", b'{"items": [' + item + b"]}")
    assert r.code == "BAD_REQUEST" and "duplicate key 'length'" in r.json["message"], r.body
    r = api.post("/crypto/v1/batch", '{"items": []}'.encode("utf-16"))
    assert (r.status, r.code) == (400, "BAD_REQUEST"), r.body  # UTF-8 only
    ok = api.post("/crypto/v1/batch", b'{"items": [{"op": "random", "request": {"length": 1}}]}')
    assert ok.status == 200, ok.body


def test_connection_cap(fresh_service, make_api):
    s = fresh_service(overrides={"connections": {"max": 4, "keep_alive_timeout": 120}})
    apis = [make_api(s) for _ in range(4)]
    for a in apis:
        assert a.get("/health").status == 200  # four kept-alive connections
    refused = http.client.HTTPSConnection("127.0.0.1", s.port, context=_ctx(s), timeout=60)
    with pytest.raises((OSError, http.client.HTTPException)):
        refused.request("GET", "/health")
        refused.getresponse().read()
    refused.close()
    for a in apis:  # the connections already there keep working, on the same sockets
        sock = a.conn.sock
        assert a.get("/health").status == 200 and a.conn.sock is sock
    deadline = time.monotonic() + 30
    while "connection limit (4) reached" not in s.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "connection limit (4) reached: closed 1 new connection(s)" in s.log_text()
    apis[0].close()  # a freed place is usable again
    time.sleep(0.5)
    fresh = make_api(s)
    assert fresh.get("/health").status == 200


def test_kept_alive_connection_idle_after_its_answers_is_closed(svc):
    # The keep-alive timeout counts from the last answer (conn.py keeps one timer per
    # connection and notes when it went idle): asked every second for longer than the timeout,
    # the connection stays; left idle, it is closed, not at once.
    with _tls(svc) as s:
        for _ in range(5):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            got = None
            while got is None:  # (a TLS 1.3 session ticket wakes the socket with no data)
                got = _poll(s, CLOSE_WITHIN)
            assert got.startswith(b"HTTP/1.1 200 "), got
            time.sleep(1.0)
        t0 = time.monotonic()
        assert _closed_by_peer(s)
        assert time.monotonic() - t0 >= 1.0  # keep_alive_timeout (3 s) after the last answer
