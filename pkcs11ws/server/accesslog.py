"""The access log line, one per request, written cheaply.

`logging.info` builds a LogRecord, looks up its caller and formats on every call: a large share
of a crypto request's CPU. When the access logger's output goes where `worker.configure_logging`
sends it (one stream or file handler with LOG_FORMAT, no filters), the line is written directly to
that handler's stream, under its lock, byte for byte as logging would have written it. Any other
set-up (tests capturing logs, an embedding application's own handlers) takes the ordinary logging
path. Which of the two applies is looked up again each second (with the time stamp): a logging
set-up changed while serving (a handler, a level) is followed within a second.

Bounded buffering (as nginx's `access_log ... buffer= flush=`): on an event loop, the lines of
the direct path are gathered and written together at most FLUSH_SECONDS after the first of them,
or at once when HELD_MAX characters wait; the write and flush system call (~14k instructions, most
of a line's cost) is then paid once for all of them. A line keeps its own time stamp (when its
request ended). The app flushes at shutdown (SIGTERM or a clean stop: lifespan shutdown) and on
SIGHUP (reload); an abruptly killed worker (SIGKILL) loses at most FLUSH_SECONDS of access lines.
Access lines only: audit lines (audit.py) and the error log are written at once, so an access
line may reach a shared log file after an error line of a later request. Off an event loop
(nothing would flush later), and on the ordinary logging path, each line is written at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Final, TextIO

LOG_FORMAT: Final = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
NAME: Final = "pkcs11ws.server.access"

_log = logging.getLogger(NAME)
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)  # the line's PID, without a system call per line
_MILLIS: Final = tuple(f"{i:03d}" for i in range(1000))
FLUSH_SECONDS: Final = 0.05
HELD_MAX: Final = 64 * 1024


class AccessLog:
    """Writes "METHOD PATH STATUS 0.12ms" lines through the "pkcs11ws.server.access" logger."""

    def __init__(self) -> None:
        self._second = -1
        self._pid = -1
        self._stamp = ""
        self._mid = ""  # " PID INFO NAME: "
        self._handler: logging.StreamHandler[TextIO] | None = None
        self._end = "\n"
        self._held: list[str] = []  # lines for _handler not yet written
        self._held_size = 0
        self._timer: asyncio.TimerHandle | None = None

    def _target(self) -> logging.StreamHandler[TextIO] | None:
        """The single plain handler the line would reach through logging, else None (also
        when INFO is off: the logging path then drops the line)."""
        if not _log.isEnabledFor(logging.INFO):
            return None
        found: logging.Handler | None = None
        c: logging.Logger | None = _log
        while c is not None:
            if c.filters or c.disabled:
                return None
            for h in c.handlers:
                if found is not None:
                    return None
                found = h
            if not c.propagate:
                break
            c = c.parent
        if type(found) not in (logging.StreamHandler, logging.FileHandler):
            return None
        assert isinstance(found, logging.StreamHandler)
        f = found.formatter
        if (
            found.filters
            or found.level > logging.INFO
            or found.stream is None
            or type(f) is not logging.Formatter
            or type(f._style) is not logging.PercentStyle
            or f._fmt != LOG_FORMAT
            or f.datefmt is not None
            or f.converter is not time.localtime
        ):
            return None
        return found

    def _refresh(self, second: int) -> None:
        """Once a second (and in a new process): the time stamp and the target handler."""
        if self._pid in (-1, _pid):
            self.flush()  # the held lines go where they were meant for, before any change
        else:  # a forked child: the held lines are its parent's to write
            self._held, self._held_size, self._timer = [], 0, None
        self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._second = second
        self._pid = _pid
        self._mid = f" {_pid} INFO {NAME}: "
        self._handler = handler = self._target()
        if handler is not None:
            self._end = handler.terminator

    def write(self, method: str, path: str, status: int, ms: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second or _pid != self._pid:
            self._refresh(second)
        handler = self._handler
        stream = handler.stream if handler is not None else None
        if handler is None or stream is None:
            _log.info("%s %s %d %.2fms", method, path, status, ms)
            return
        # One f-string: the same text as LOG_FORMAT with "%s %s %d %.2fms" (an int prints as
        # %d does, .2f as %.2f; the milliseconds' %03d from a table).
        line = (
            f"{self._stamp},{_MILLIS[int((now - second) * 1000)]}{self._mid}"
            f"{method} {path} {status} {ms:.2f}ms{self._end}"
        )
        held = self._held
        held.append(line)
        self._held_size += len(line)
        if len(held) == 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop to flush later
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)
        elif self._held_size >= HELD_MAX:
            self.flush()

    def flush(self) -> None:
        """Write the held lines now (the timer, shutdown, reload, a change of target)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = self._held
        if not held:
            return
        self._held = []
        self._held_size = 0
        handler = self._handler
        stream = handler.stream if handler is not None else None
        text = "".join(held)
        if handler is None or stream is None:  # (only held for a handler with a stream)
            return
        with handler.lock:  # type: ignore[union-attr]
            try:
                stream.write(text)
                stream.flush()
            except Exception:
                # As logging does: a failing log write must not fail the request.
                handler.handleError(logging.makeLogRecord({"msg": text}))
