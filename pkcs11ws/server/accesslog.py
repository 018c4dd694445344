"""The access log line, one per request, written cheaply.

`logging.info` builds a LogRecord, looks up its caller and formats on every call: a large share
of a crypto request's CPU. When the access logger's output goes where `app.configure_logging`
sends it (one stream or file handler with LOG_FORMAT, no filters), the line is written directly to
that handler's stream, under its lock, byte for byte as logging would have written it. Any other
set-up (tests capturing logs, an embedding application's own handlers) takes the ordinary logging
path. Which of the two applies is looked up again each second (with the time stamp): a logging
set-up changed while serving is followed within a second.
"""

from __future__ import annotations

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


class AccessLog:
    """Writes "METHOD PATH STATUS 0.12ms" lines through the "pkcs11ws.server.access" logger."""

    def __init__(self) -> None:
        self._second = -1
        self._pid = -1
        self._stamp = ""
        self._mid = ""  # " PID INFO NAME: "
        self._handler: logging.StreamHandler[TextIO] | None = None
        self._end = "\n"

    def _target(self) -> logging.StreamHandler[TextIO] | None:
        """The single plain handler the line would reach through logging, else None."""
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
        self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._second = second
        self._pid = _pid
        self._mid = f" {_pid} INFO {NAME}: "
        self._handler = handler = self._target()
        if handler is not None:
            self._end = handler.terminator

    def write(self, method: str, path: str, status: int, ms: float) -> None:
        if not _log.isEnabledFor(logging.INFO):
            return
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
        with handler.lock:  # type: ignore[union-attr]
            try:
                stream.write(line)
                stream.flush()
            except Exception:
                # As logging does: a failing log write must not fail the request.
                handler.handleError(logging.makeLogRecord({"msg": line}))
