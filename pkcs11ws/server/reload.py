"""SIGHUP: reload what can change without a restart, in every worker process.

Other parts register a function with `reload.register(fn)` (no arguments; it re-reads its own
files and must not raise for a bad file: log and keep the previous state). On SIGHUP each worker
runs every registered function on its event loop, in registration order.

Process wiring: `serve` ignores SIGHUP before uvicorn starts (the default action would kill the
service); each worker installs the handler on its loop at lifespan start-up; with --workers N the
supervisor forwards SIGHUP to its workers instead of replacing them (uvicorn's default), so kept
connections stay open and see the new state on their next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("pkcs11ws.server")
_hooks: Final[list[Callable[[], Any]]] = []


def register(fn: Callable[[], Any]) -> None:
    if fn not in _hooks:
        _hooks.append(fn)


def unregister(fn: Callable[[], Any]) -> None:
    if fn in _hooks:
        _hooks.remove(fn)


def run_hooks() -> None:
    for fn in list(_hooks):
        try:
            fn()
        except Exception:
            log.exception("reload hook %s failed; its previous state stays", fn)
    log.info("reloaded (SIGHUP): %d hook(s)", len(_hooks))
    from pkcs11ws.server import audit

    audit.record(op="reload", client=None, outcome="ok")


def ignore_sighup() -> None:
    """Until a worker installs its handler, a SIGHUP must not kill the process."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def install(loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGHUP, run_hooks)


def forward_to_workers(supervisor: object) -> None:
    """Replacement of uvicorn's Multiprocess.handle_hup: pass SIGHUP on to every worker."""
    import os

    for process in getattr(supervisor, "processes", []):
        pid = process.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
    log.info("SIGHUP forwarded to the workers")
