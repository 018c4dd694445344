"""A worker process's set-up: logging, the tie to its supervisor, and the uvicorn factory.

`create_app()` reads the config path from PKCS11WS_SERVER_CONFIG so that each worker process
builds its own app.App (and its own store connections) on the shared store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pkcs11ws.server import audit, conn, reload
from pkcs11ws.server import settings as settings_mod
from pkcs11ws.server.accesslog import LOG_FORMAT
from pkcs11ws.server.app import App
from pkcs11ws.server.settings import Settings


def configure_logging(s: Settings) -> None:
    handler: logging.Handler
    if s.log_file is not None:
        s.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(s.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.FileHandler(s.log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("pkcs11ws", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(s.log_level)
        logger.propagate = False


def die_with_supervisor(supervisor: int) -> None:
    """In a --workers N worker: be killed when the supervisor dies, however it dies.

    Without this a `kill -9` of the supervisor left the workers serving with PPID 1, holding the
    port, so a restart failed with "Address already in use". SIGKILL: the supervisor is gone
    abruptly, nothing is left to wait for the worker's drain (a normal SIGTERM of the supervisor
    stops its workers itself, before it exits). The PPID check closes the window in which the
    supervisor died before the prctl.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != supervisor:
        os._exit(1)


def create_app() -> App:
    """uvicorn factory (one call per worker process): config path from PKCS11WS_SERVER_CONFIG."""
    supervisor = os.environ.get(settings_mod.SUPERVISOR_ENV)
    if supervisor and int(supervisor) != os.getpid():
        die_with_supervisor(int(supervisor))
    path = os.environ.get(settings_mod.CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{settings_mod.CONFIG_ENV} is not set")
    s = settings_mod.load(Path(path))
    os.umask(0o077)  # whatever this process creates later (logs, database files) is owner-only
    configure_logging(s)
    conn.configure(s)
    audit.configure(s.audit_log)
    # Until lifespan start-up installs the reload handler, SIGHUP must not kill this worker.
    reload.ignore_sighup()
    return App(s)
