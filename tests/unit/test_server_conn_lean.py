"""conn.py's lean request path, in process: it is on with the installed uvicorn (its request
cycle still has the state _Lean keeps), and _lines writes response headers as uvicorn's send
writes them, leaving to that send every header it acts on or refuses."""

from __future__ import annotations

import pytest

from pkcs11ws.server import conn


def test_the_lean_path_fits_the_installed_uvicorn():
    # False means a uvicorn upgrade changed its request cycle: every request then runs as
    # uvicorn runs it (correct, slower): look at _CYCLE_STATE and _Lean before accepting that.
    assert conn.LEAN


def test_lines_are_uvicorns():
    headers = [(b"Content-Type", b"application/json"), (b"content-length", b"12")]
    assert conn._lines(headers) == (
        b"content-type: application/json\r\ncontent-length: 12\r\n",
        12,
    )
    assert conn._lines([(b"date", b"Mon, 07 Dec 2026 21:00:00 GMT")]) == (
        b"date: Mon, 07 Dec 2026 21:00:00 GMT\r\n",
        None,
    )


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"1"), (b"content-length", b"2")],  # uvicorn takes the first
        [(b"content-length", b"x")],  # uvicorn's int() refuses it
        [(b"transfer-encoding", b"chunked")],
        [(b"Connection", b"close")],  # uvicorn then closes after the answer
        [(b"x-bad name", b"v")],  # invalid name
        [(b"x-ok", b"line\r\nInjected: 1")],  # invalid value
        [(b"x-ok", "text")],  # not bytes
    ],
)
def test_headers_uvicorn_acts_on_or_refuses_are_left_to_it(headers):
    assert conn._lines(headers) is None


def test_a_changed_list_is_encoded_again():
    headers = [(b"content-length", b"3")]
    assert conn._lines(headers) == (b"content-length: 3\r\n", 3)
    headers.append((b"connection", b"close"))  # the same list object, now with a header
    assert conn._lines(headers) is None
    headers[1] = (b"x-a", b"b")
    assert conn._lines(headers) == (b"content-length: 3\r\nx-a: b\r\n", 3)
