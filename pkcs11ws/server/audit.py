"""The audit trail: one JSON line per state change and per refused request (DIR/log/audit.log).

Other parts of the service call one function, kept small and stable:

    audit.record(op="activate", client="app1", card=card_id, handle=None,
                 outcome="refused", code="PASSPHRASE_INCORRECT")

A line holds: time (UTC, ISO 8601 with milliseconds), request (the X-Request-Id the client sent,
or null), client (the identity name, or null when none is known: a refused handshake), op, card,
handle, outcome ("ok", "refused" or "failed"), code (a protocol error code, or a TLS reason) and,
for refused handshakes and unknown certificates, the certificate fingerprint; for grants, the
identity granted ("target"). Never a secret: the
arguments are identifiers and codes; callers pass no bodies, passphrases or tokens.

Every worker process appends to the same file with O_APPEND and one write() per line, so lines of
several workers never interleave. The request id travels in a context variable set once per
request by the pipeline, so code deep in a handler (or in a thread it started with
asyncio.to_thread) need not pass it along.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from pathlib import Path
from typing import Final

REQUEST_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "pkcs11ws_request_id", default=None
)

_lock = threading.Lock()
_fd: int | None = None
_path: Path | None = None


def configure(path: Path | None) -> None:
    """Open (or with None, close) the audit file of this process. Created 0600, appended to."""
    global _fd, _path
    with _lock:
        if _fd is not None:
            os.close(_fd)
            _fd = None
        _path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def reopen() -> None:
    """Reopen the file (after log rotation moved it away): a reload hook."""
    configure(_path)


def _stamp(now: float) -> str:
    ms = int((now - int(now)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z"


def record(
    op: str,
    *,
    client: str | None = None,
    card: str | None = None,
    handle: str | None = None,
    outcome: str = "ok",
    code: str | None = None,
    request_id: str | None = None,
    fingerprint: str | None = None,
    target: str | None = None,
) -> None:
    """Append one audit line. request_id defaults to the current request's."""
    fd = _fd
    if fd is None:
        return
    line = {
        "time": _stamp(time.time()),
        "request": request_id if request_id is not None else REQUEST_ID.get(),
        "client": client,
        "op": op,
        "card": card,
        "handle": handle,
        "outcome": outcome,
        "code": code,
    }
    if fingerprint is not None:
        line["fingerprint"] = fingerprint
    if target is not None:
        line["target"] = target  # the identity a grant names
    data = (json.dumps(line, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")
    try:
        os.write(fd, data)
    except OSError:
        # As logging does: a failing audit write must not fail the request; say it once where
        # the operator looks.
        import logging

        logging.getLogger("pkcs11ws.server").exception("cannot write the audit line")
