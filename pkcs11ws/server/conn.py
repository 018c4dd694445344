"""Connection hygiene of the key service: uvicorn's httptools protocol with limits, one TLS
record per answer, and a complete request run at once.

What a client may hold without doing useful work is bounded (server.yaml `connections:`):
- the TLS handshake: `handshake_timeout` (the listening server's ssl_handshake_timeout, set by
  cli.event_loop's create_server);
- an idle connection, before its first request or between requests: `keep_alive_timeout`
  (uvicorn arms its timer only after a response; here it also runs from when the connection
  is made, so a client that completes the handshake and sends nothing is closed too). uvicorn
  cancels its timer at each read and arms a new one after each answer; here one timer serves
  the connection's life, noting when it went idle (timeout_keep_alive_handler);
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

A whole request runs at once (issue 15, round 8): uvicorn starts each request's ASGI cycle as a
new task when its headers are parsed, and the task's first step runs on a later turn of the
loop. Here the start waits until the bytes of that read are parsed (the task would not have
run before then anyway); if the request is complete by then (its body in hand, no 100 Continue
expected, not queued behind another answer), its cycle's run_asgi runs at once, in the context
a task would have had; if the app has to wait (a thread, a blocking store), the rest goes on in
a task (_Rest), as uvicorn would have run it. Such a request's receive and send are _Lean's: the
steps of uvicorn's cycle for a complete request answered with a content-length (the same cycle
state, the head and body in one write), falling back to the cycle's own for anything else.
uvicorn still parses (httptools), owns the connection and each request's cycle (keep-alive,
pipelining, flow control, shutdown, timeouts), and runs every other request as before; the app
sees the same ASGI messages. No task, no scheduled step and no event wait per request: with the
lean receive/send and the one keep-alive timer, ~35k of ~250k instructions per single request
(bench/results/profile-issue15-r8-service.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Generator, Iterable
from typing import Any, Final, cast

import httptools
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

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
_start_task: Final = HttpToolsProtocol._start_asgi_task
# What _Lean reads and sets of uvicorn's RequestResponseCycle (its private state, as of uvicorn
# 0.55): checked once on a cycle of this uvicorn; if any is missing, every request runs as
# uvicorn runs it (LEAN is False; tests/unit/test_server_conn_lean.py fails so that it is noticed).
_CYCLE_STATE: Final = (
    "scope", "transport", "flow", "access_log", "default_headers", "message_event",
    "on_response", "disconnected", "keep_alive", "waiting_for_100_continue", "body",
    "more_body", "response_started", "response_complete", "run_asgi", "receive", "send",
)  # fmt: skip


def _fits() -> bool:
    try:
        cycle = RequestResponseCycle(
            scope={},  # type: ignore[typeddict-item]
            transport=None,  # type: ignore[arg-type]
            flow=None,  # type: ignore[arg-type]
            logger=log,
            access_logger=log,
            access_log=False,
            default_headers=[],
            message_event=None,  # type: ignore[arg-type]
            expect_100_continue=False,
            keep_alive=True,
            on_response=lambda: None,
        )
    except TypeError:
        return False
    return all(hasattr(cycle, name) for name in _CYCLE_STATE)


LEAN: Final = _fits()


class _Rest:
    """The rest of a request's coroutine after its first step ran eagerly (_run_now) and
    stopped on `yielded`: a Task awaits this as it would have awaited the coroutine itself."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Any, yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, None, None]:
        coro, yielded = self._coro, self._yielded
        self._coro = self._yielded = None
        while True:
            try:
                yield yielded
            except BaseException as exc:  # (a cancellation: passed on, as a Task would)
                try:
                    yielded = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coro.send(None)
                except StopIteration:
                    return


async def _rest(coro: Any, yielded: Any) -> None:
    await _Rest(coro, yielded)


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

    def whole(self, data: bytes) -> None:
        """A whole answer (_Lean's): leaves at once, after anything held."""
        self.flush()
        self._transport.write(data)

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


_CLOSE: Final = b"connection: close\r\n"
# Header lists already checked and encoded by _lines, by identity: (the list, a copy to see that
# it has not changed, its lines, its content-length). The app answers with a few constant lists.
_encoded: dict[int, tuple[Any, list[Any], bytes, int | None]] = {}
_ENCODED_MAX: Final = 256


def _lines(headers: Any) -> tuple[bytes, int | None] | None:
    """Response headers as uvicorn's send writes them (lower-case names, "name: value" lines)
    and the content-length among them; None when uvicorn's send must write them itself: an
    invalid name or value (it refuses those), a content-length it cannot read or a second one,
    transfer-encoding or connection (it acts on those). Cached by identity."""
    hit = _encoded.get(id(headers))
    if hit is not None and hit[0] is headers and hit[1] == headers:
        return hit[2], hit[3]
    out: list[bytes] = []
    length: int | None = None
    try:
        for name, value in headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                return None
            name = name.lower()
            if name == b"content-length":
                if length is not None:
                    return None
                length = int(value.decode())
            elif name in (b"transfer-encoding", b"connection"):
                return None
            out += (name, b": ", value, b"\r\n")
    except (TypeError, ValueError):
        return None
    lines = b"".join(out)
    if len(_encoded) >= _ENCODED_MAX:
        _encoded.clear()
    _encoded[id(headers)] = (headers, list(headers), lines, length)
    return lines, length


class _Lean:
    """A whole request's ASGI receive and send for its cycle, when the app runs at once
    (GuardedHttpToolsProtocol._run_now): what uvicorn's RequestResponseCycle.receive and .send
    do for a complete request answered with a content-length, in fewer steps, the answer's head
    and body written together (one TLS record, without _OneRecord holding the head); the same
    cycle's state kept as they keep it, so uvicorn's connection (keep-alive, pipelining,
    shutdown, connection_lost) sees no difference. Anything else (a second receive, a response
    in several parts, headers uvicorn acts on or refuses, its access log on) goes through the
    cycle's own receive and send, with the start of the response if it was held.

    Passed to the cycle's run_asgi as the app: run_asgi's handling of the app's errors stays."""

    __slots__ = ("app", "cycle", "head", "length", "own", "received", "records", "start")

    def __init__(self, app: Any, cycle: Any, records: _OneRecord) -> None:
        self.app = app
        self.cycle = cycle
        self.records = records
        self.received = False
        self.head = b""
        self.length = 0
        self.start: Any = None  # the held http.response.start message
        self.own = True  # False: everything through the cycle's send

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return self.app(scope, self.receive, self.send)

    async def receive(self) -> Any:
        cycle = self.cycle
        if self.received or cycle.disconnected or cycle.response_complete:
            return await cycle.receive()
        # The cycle's receive with its event already set (the whole body is in): the same
        # message and the same state after it.
        self.received = True
        cycle.flow.resume_reading()
        cycle.message_event.clear()
        body = bytes(cycle.body)
        cycle.body = bytearray()
        return {"type": "http.request", "body": body, "more_body": cycle.more_body}

    async def send(self, message: Any) -> None:
        cycle = self.cycle
        if not self.own:
            return await cycle.send(message)  # type: ignore[no-any-return]
        # As the cycle's send begins.
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        start = self.start
        if start is None:
            if (
                message["type"] == "http.response.start"
                and not cycle.response_started
                and not cycle.access_log
                and (mine := _lines(message.get("headers", ()))) is not None
                and (dflt := _lines(cycle.default_headers)) is not None
                and dflt[1] is None
                and mine[1] is not None
                and (status := STATUS_LINE.get(message["status"])) is not None
            ):
                self.start = message
                cycle.response_started = True
                cycle.waiting_for_100_continue = False
                self.head = b"".join(
                    (status, dflt[0], mine[0], b"" if cycle.keep_alive else _CLOSE, b"\r\n")
                )
                self.length = mine[1]
                return
            self.own = False
            return await cycle.send(message)  # type: ignore[no-any-return]
        body = message.get("body", b"") if message["type"] == "http.response.body" else None
        if body is None or len(body) != self.length or message.get("more_body", False):
            # Not the one body its head announced: the cycle's send writes (or refuses) both.
            self.own = False
            cycle.response_started = False
            await cycle.send(start)
            return await cycle.send(message)  # type: ignore[no-any-return]
        # As the cycle's send ends a response.
        self.records.whole(self.head + body)
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (uvicorn Config `http=`)."""

    _hdr_started: int | None = None  # _tick at the first byte of incomplete headers
    _hdr_bytes = 0
    _reject: bytes | None = None
    _draining = False
    _in_body = False  # between a request's headers and the end of its body
    _feeding = False  # in parser.feed_data: a request's cycle is started after it
    _pending: tuple[Any, Any] | None = None  # that cycle and its app
    _context: contextvars.Context  # the connection's, outside any request
    _idle_since: float | None = None  # loop time it went idle; None: a request is under way
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
        self._context = contextvars.copy_context()
        self._records = _OneRecord(transport)
        self.transport = cast(asyncio.Transport, self._records)
        # Idle before the first request: the keep-alive timeout applies (uvicorn only arms it
        # after a response). This one timer serves the connection's whole life
        # (timeout_keep_alive_handler).
        self._idle_since = self.loop.time()
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
        self._idle_since = None  # (uvicorn cancels its keep-alive timer here)
        self._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._feeding = False
            self._start_pending(False)
            if self._reject is not None:
                self._send_reject()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            self._feeding = False
            self._start_pending(False)
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except BaseException:
            self._feeding = False
            self._start_pending(False)
            raise
        self._feeding = False
        self._start_pending(True)
        if self._hdr_started is not None and self._hdr_bytes > _limits.max_header_bytes:
            self._reject = b"the request headers are over %d bytes" % _limits.max_header_bytes
            self._send_reject()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if self._feeding and LEAN and not cycle.waiting_for_100_continue:
            # Started when this read has been parsed (_start_pending): at once if the whole
            # request has arrived by then, else as a task, as uvicorn starts it. (A request
            # that expects 100 Continue starts now: it is waiting for the app's first read.)
            if self._pending is not None:
                self._start_pending(False)
            self._pending = (cycle, app)
        else:
            # From on_response_complete, inside the previous request's context: a pipelined
            # request's task copies the connection's instead (as one started from a read),
            # or the previous request's id would be its audit lines' too.
            self._context.run(_start_task, self, cycle, app)

    def _start_pending(self, eager: bool) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        cycle, app = pending
        if eager and not cycle.more_body:
            self._run_now(cycle, app)
        else:
            _start_task(self, cycle, app)

    def _run_now(self, cycle: Any, app: Any) -> None:
        """A whole request's ASGI cycle, run at once instead of in a new task (in the context a
        task would have had); if it has to wait for something, the rest goes on in a task."""
        if cycle.scope["method"] != "HEAD":  # (uvicorn's send writes no body then)
            app = _Lean(app, cycle, self._records)
        coro = cycle.run_asgi(app)
        fresh = getattr(self.config, "reset_contextvars", False)  # (uvicorn's option, as there)
        ctx = contextvars.Context() if fresh else contextvars.copy_context()
        try:
            yielded = ctx.run(coro.send, None)
        except StopIteration:
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # run_asgi catches the app's: only its own failure
            self.loop.call_exception_handler(
                {"message": "an ASGI request cycle failed", "exception": exc, "protocol": self}
            )
            return
        task = self.loop.create_task(_rest(coro, yielded), context=ctx)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

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
        # uvicorn's, but for the keep-alive timer: it cancels its timer and arms a new one
        # after each answer; here the connection's one timer stays and the time it went idle
        # is noted (timeout_keep_alive_handler).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()

    def timeout_keep_alive_handler(self) -> None:
        """Closes the connection once it has been idle for the keep-alive timeout (since its
        last answer, or since it was made), else looks again when that could be: busy (a
        request being received or answered), a whole timeout from now."""
        if self.transport.is_closing():
            return
        since = self._idle_since
        wait: float = self.timeout_keep_alive
        if since is not None:
            wait += since - self.loop.time()
            if wait <= 0:
                self.transport.close()
                return
        self.timeout_keep_alive_task = self.loop.call_later(wait, self.timeout_keep_alive_handler)
