"""`serve --workers N`: the workers die with their supervisor, and a restart succeeds.

A `kill -9` of the supervisor used to leave the workers serving with PPID 1, holding the port, so
starting the service again failed with "Address already in use". Each worker now asks the kernel
for SIGKILL when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.service import Api, Service


def _children(pid: int) -> list[int]:
    """The worker processes of pid (multiprocessing spawn children), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _healthy(svc: Service, timeout: float) -> bool:
    api = Api(svc)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if api.get("/health").status == 200:
                    return True
            api.close()
            time.sleep(0.1)
        return False
    finally:
        api.close()


def test_workers_die_with_a_killed_supervisor_and_restart_works(fresh_service):
    svc = fresh_service(workers=2)
    workers: list[int] = []
    restarted: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = _children(svc.pid)
            time.sleep(0.1)
        assert len(workers) == 2, workers

        os.kill(svc.pid, signal.SIGKILL)
        svc.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "workers outlived their supervisor"

        # The same command again, same port: it binds and serves.
        with svc.log.open("ab") as out:
            restarted = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pkcs11ws.server.cli",
                    "serve",
                    "--config",
                    str(svc.server_yaml),
                    "--workers",
                    "2",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        assert _healthy(svc, 30), svc.log_text()[-2000:]
        assert restarted.poll() is None
        assert "Address already in use" not in svc.log_text()
    finally:
        for w in workers:  # only if the test failed: never leave them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        if restarted is not None and restarted.poll() is None:
            restarted.send_signal(signal.SIGTERM)
            try:
                restarted.wait(20)
            except subprocess.TimeoutExpired:
                restarted.kill()
                restarted.wait(5)
