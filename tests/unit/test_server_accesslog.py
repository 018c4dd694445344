"""The fast access-log writer: byte for byte what logging would write, and the fall-back."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import pytest

from pkcs11ws.server.accesslog import LOG_FORMAT, NAME, AccessLog


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


@pytest.mark.parametrize("now", [1795000000.0, 1795000000.999, 1795000123.0504])
def test_same_line_as_logging(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, now: float
) -> None:
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
