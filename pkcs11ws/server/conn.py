"""Connection hygiene of the key service: uvicorn's httptools protocol with limits.

What a client may hold without doing useful work is bounded (server.yaml `connections:`):
- the TLS handshake: `handshake_timeout` (the listening server's ssl_handshake_timeout, set by
  cli.event_loop's create_server);
- an idle connection, before its first request or between requests: `keep_alive_timeout`
  (uvicorn arms its timer only after a response; here it is also armed when the connection
  is made, so a client that completes the handshake and sends nothing is closed too);
- a request's headers: at most `max_header_bytes` and `max_headers` (431 beyond), received
  within `header_timeout` of the request's first byte (slow-header clients are closed);
- established connections per worker: `max`; beyond it a new connection is closed at once
  and a warning is logged (at most one line per 10 s, with the count), while the connections
  already there keep being served.
None of these runs while a request is being answered, so a client in steady use never loses
its kept-alive connection to them. The per-request cost is a few attribute updates and one
overridden parser callback (on_headers_complete); the slow-header check is one sweep per
second over the connections, not a timer per request. The header count is checked when the
headers are complete: the byte limit already bounds what they can hold before that.

One TLS record per answer: uvicorn writes a response's status line and headers at
`http.response.start` and its body at `http.response.body`, two transport writes, so two TLS
records and two sends, and the client reads four times instead of two. The connection's
transport is wrapped (_OneRecord) so that a response's head is held until the next write, which
it is joined with (the body the app sends straight after it), or until the response is complete
(a HEAD answer's head has no body: on_response_complete), or the connection closes; any other
write (an interim 100 Continue, which the client waits for; uvicorn's whole 400 answer; the 431
refusal) flushes what is held and leaves at once. The wrapper belongs to the connection, not to
a request: every writer of the connection (a pipelined request's cycle, the refusals, close)
goes through it, so the bytes keep their order. (Holding every write until the end of the
event loop's turn instead cost a scheduled callback per answer.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, Final, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pkcs11ws.server.settings import DEFAULT_CONNECTIONS, Connections, Settings

log = logging.getLogger("pkcs11ws.server")
_limits: Connections = Connections(**DEFAULT_CONNECTIONS)
_REFUSAL_LOG_EVERY: Final = 10.0
_DRAIN_SECONDS: Final = 1.0
_REJECT_431: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def configure(s: Settings) -> None:
    """Called once per worker process (create_app), before any connection."""
    global _limits
    _limits = s.connections


def limits() -> Connections:
    return _limits


class _HeaderLimit(Exception):
    pass


class _Sweeper:
    """Once a second: close connections whose request headers are overdue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        self.loop = loop
        self.connections = connections
        self.refused = 0
        self.last_refusal_log = 0.0
        loop.call_later(1.0, self.sweep)

    def sweep(self) -> None:
        global _tick
        _tick += 1
        deadline = _tick - _limits.header_timeout
        for proto in list(self.connections):
            started = getattr(proto, "_hdr_started", None)
            if started is not None and started < deadline and not proto.transport.is_closing():
                log.info(
                    "closed a connection: request headers incomplete after %d s",
                    _limits.header_timeout,
                )
                proto.transport.close()
        self.loop.call_later(1.0, self.sweep)

    def refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.last_refusal_log >= _REFUSAL_LOG_EVERY:
            log.warning(
                "connection limit (%d) reached: closed %d new connection(s)",
                _limits.max,
                self.refused,
            )
            self.refused = 0
            self.last_refusal_log = now


_sweepers: dict[int, _Sweeper] = {}
# Seconds counted by the sweeper: what a request's headers are timed with (a global read per
# request instead of a clock call; one second of resolution is plenty for a 10 s limit).
_tick = 0
_on_headers_complete: Final = HttpToolsProtocol.on_headers_complete  # without super() per request
_on_message_complete: Final = HttpToolsProtocol.on_message_complete
_on_response_complete: Final = HttpToolsProtocol.on_response_complete


class _OneRecord:
    """The connection's transport, writing a response's head together with what follows it
    (its body) as one write, so one TLS record; anything else is the real transport's."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            # One copy of the body: answers are small (a large one, rare, is split into
            # 16 KB records anyway, the head now in the first).
            self._transport.write(held + data)
        elif data[-4:] == b"\r\n\r\n" and data[9:10] != b"1":
            # A head ("HTTP/1.1 200 ...\r\n\r\n"), not an interim 1xx: held for its body.
            # bytes(): a bytearray could change before it leaves (transports copy them too).
            self._held = data if type(data) is bytes else bytes(data)
        elif data:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:  # asked once per answer: not through __getattr__
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None  # as the transport's own buffer: an abort drops what is unsent
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (uvicorn Config `http=`)."""

    _hdr_started: int | None = None  # _tick at the first byte of incomplete headers
    _hdr_bytes = 0
    _reject: bytes | None = None
    _draining = False
    _in_body = False  # between a request's headers and the end of its body
    _records: _OneRecord

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sweeper = _sweepers.get(id(self.loop))
        if sweeper is None:
            sweeper = _sweepers[id(self.loop)] = _Sweeper(self.loop, self.connections)
        if len(self.connections) >= _limits.max:
            self.transport = transport
            self._draining = True  # whatever still arrives is dropped
            sweeper.refuse()
            transport.close()
            return
        super().connection_made(transport)
        self._records = _OneRecord(transport)
        self.transport = cast(asyncio.Transport, self._records)
        # Idle before the first request: the keep-alive timeout applies (uvicorn only arms it
        # after a response).
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        if not self._in_body:
            # Receiving headers (of this or the next request): count their bytes before the
            # parser has called back (a single huge header is buffered whole inside it), and
            # note when they began (the sweeper closes connections whose headers dawdle).
            # Not the rest of a body still arriving after its request was answered early
            # (e.g. 413): those bytes are no headers.
            if self._hdr_started is None:
                self._hdr_started = _tick
            self._hdr_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._reject is not None:
                self._send_reject()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._hdr_started is not None and self._hdr_bytes > _limits.max_header_bytes:
            self._reject = b"the request headers are over %d bytes" % _limits.max_header_bytes
            self._send_reject()

    def _send_reject(self) -> None:
        assert self._reject is not None
        body = b'{"code":"BAD_REQUEST","message":"%s"}' % self._reject
        log.info("refused a request with status 431: %s", self._reject.decode())
        self._hdr_started = None
        if not self.transport.is_closing():
            self.transport.write(_REJECT_431 % (len(body), body))
            # Closing with the client's bytes still unread would reset the connection and
            # could destroy the answer before the client reads it: discard what still comes
            # for a moment, then close.
            self._draining = True
            self.loop.call_later(_DRAIN_SECONDS, self.transport.close)

    def on_headers_complete(self) -> None:
        if len(self.headers) > _limits.max_headers:
            self._reject = b"more than %d header lines" % _limits.max_headers
            raise _HeaderLimit
        if self._hdr_bytes > _limits.max_header_bytes:
            # Headers and body arrived in one read: compare the headers alone.
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > _limits.max_header_bytes:
                self._reject = b"the request headers are over %d bytes" % _limits.max_header_bytes
                raise _HeaderLimit
        self._hdr_started = None
        self._hdr_bytes = 0
        self._in_body = True
        _on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._in_body = False
        _on_message_complete(self)

    def on_response_complete(self) -> None:
        self._records.flush()  # a head without a body (HEAD) leaves now
        _on_response_complete(self)
