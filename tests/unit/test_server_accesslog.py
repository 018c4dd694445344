"""The fast access-log writer: byte for byte what logging would write, the fall-back, and the
bounded buffering on an event loop."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator

import pytest

from pkcs11ws.server.accesslog import FLUSH_SECONDS, HELD_MAX, LOG_FORMAT, NAME, AccessLog


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    top = logging.getLogger("pkcs11ws")
    saved = (top.handlers[:], top.level, top.propagate)
    top.handlers[:] = [handler]
    top.setLevel(logging.INFO)
    top.propagate = False
    try:
        yield out
    finally:
        top.handlers[:], top.level, top.propagate = saved[0], saved[1], saved[2]


def _direct() -> None:
    """Only the stream's handler (pytest adds its capture handlers for the test's call, which
    send the line down the ordinary logging path, unbuffered)."""
    top = logging.getLogger("pkcs11ws")
    top.handlers[:] = top.handlers[:1]


@pytest.mark.parametrize("now", [1795000000.0, 1795000000.999, 1795000123.0504])
def test_same_line_as_logging(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, now: float
) -> None:
    _direct()  # (else pytest's capture handlers put both lines on the logging path)
    monkeypatch.setattr(time, "time", lambda: now)
    AccessLog().write("POST", "/crypto/v1/sign", 200, 0.123456)
    fast = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    logging.getLogger(NAME).info("%s %s %d %.2fms", "POST", "/crypto/v1/sign", 200, 0.123456)
    assert fast == stream.getvalue()
    assert fast.endswith(" INFO pkcs11ws.server.access: POST /crypto/v1/sign 200 0.12ms\n")


def test_other_handlers_take_the_logging_path(stream: io.StringIO) -> None:
    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    extra = Capture()
    logging.getLogger(NAME).addHandler(extra)
    try:
        AccessLog().write("GET", "/health", 200, 1.0)
    finally:
        logging.getLogger(NAME).removeHandler(extra)
    assert seen == ["GET /health 200 1.00ms"]
    assert stream.getvalue().endswith("GET /health 200 1.00ms\n")


def test_disabled_level_writes_nothing(stream: io.StringIO) -> None:
    logging.getLogger("pkcs11ws").setLevel(logging.WARNING)
    AccessLog().write("GET", "/health", 200, 1.0)
    assert stream.getvalue() == ""


def test_lines_on_a_loop_are_held_then_written_in_order(stream: io.StringIO) -> None:
    """On an event loop the lines wait for one write (at most FLUSH_SECONDS, the loop's own
    timer), each with its own text; off a loop each is written at once (the tests above)."""
    _direct()

    async def serve() -> tuple[str, str]:
        log = AccessLog()
        log.write("GET", "/a", 200, 1.0)
        log.write("POST", "/b", 404, 2.5)
        held = stream.getvalue()
        await asyncio.sleep(FLUSH_SECONDS * 4)  # the flush timer is due first
        return held, stream.getvalue()

    held, written = asyncio.run(serve())
    assert held == ""
    lines = written.splitlines()
    assert [x.split(": ", 1)[1] for x in lines] == ["GET /a 200 1.00ms", "POST /b 404 2.50ms"]


def test_held_lines_are_written_by_flush_and_past_the_bound(stream: io.StringIO) -> None:
    _direct()

    async def serve() -> list[int]:
        log = AccessLog()
        counts = []
        log.write("GET", "/x", 200, 1.0)
        counts.append(stream.getvalue().count("\n"))
        log.flush()  # shutdown, reload
        counts.append(stream.getvalue().count("\n"))
        long_path = "/" + "p" * 1000
        n = 0
        while stream.getvalue().count("\n") == counts[-1]:
            log.write("GET", long_path, 200, 1.0)
            n += 1
            assert n <= HELD_MAX // 1000 + 1  # written once HELD_MAX characters wait
        counts.append(stream.getvalue().count("\n"))
        log.flush()
        return counts

    counts = asyncio.run(serve())
    assert counts[:2] == [0, 1]
    assert counts[2] > 1


def test_level_change_is_followed_within_a_second(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The level is looked up with the target, once a second: a line of the next second after
    INFO was turned off is dropped, and one after it was turned on again is written."""
    _direct()
    now = [1795000000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    log = AccessLog()
    log.write("GET", "/a", 200, 1.0)
    top = logging.getLogger("pkcs11ws")
    top.setLevel(logging.WARNING)
    now[0] += 1.0
    log.write("GET", "/b", 200, 1.0)
    top.setLevel(logging.INFO)
    now[0] += 1.0
    log.write("GET", "/c", 200, 1.0)
    assert [x.split(": ", 1)[1] for x in stream.getvalue().splitlines()] == [
        "GET /a 200 1.00ms",
        "GET /c 200 1.00ms",
    ]
