"""One measured point: start a load generator (p11bench, curlbench or bench.pyhosts, run with
--sync), and at its "#measure-start" / "#measure-stop" markers sample the server's CPU (its
whole process tree) and the TCP connections to its port, then answer the marker so the
generator goes on; return the generator's JSON result plus the server-side view: server CPU per
op, the number of connections opened inside the measured window and, for the key service, the
requests its access log shows in that window by endpoint (so calls per request, the group
commit's mean batch size, is known for every host, the C host included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.build import ROOT
from bench.procs import (
    connection_ids,
    cpu_delta,
    new_connections,
    system_busy,
    tcp_passive_opens,
    tree_cpu,
)


@dataclass(frozen=True)
class Point:
    """What to run: an operation, a thread count, a fixed time (or a fixed count)."""

    op: str
    threads: int
    seconds: float
    warmup: float
    count: int = 0
    null_query: bool = False
    churn: int = 0  # a new host thread every `churn` operations (0: fixed threads)

    def window_args(self) -> list[str]:
        """The options every load generator (p11bench, curlbench, bench.pyhosts) takes for this
        point: threads, the timed window (or a fixed count), and --sync (see run_point)."""
        args = ["--threads", str(self.threads), "--seconds", str(self.seconds)]
        args += ["--warmup", str(self.warmup), "--sync"]
        return args + (["--count", str(self.count)] if self.count else [])

    def p11bench_args(self) -> list[str]:
        """p11bench's options for this point, after --module and --token."""
        args = ["--op", self.op, *self.window_args()]
        if self.null_query:
            args.append("--null-query")
        return args + (["--churn", str(self.churn)] if self.churn else [])


@dataclass
class Variant:
    """A way to run a point: how to build the command, and which server it loads."""

    name: str
    describe: str
    command: Callable[[Point], tuple[list[str], dict[str, str]]]
    server_pid: Callable[[], int | None] = lambda: None
    port: int | None = None
    ops: tuple[str, ...] = ("sign64",)
    meta: dict[str, Any] = field(default_factory=dict)
    log: Path | None = None  # the key service's access log, when the variant loads one


_REQUEST = re.compile(rb"POST /crypto/v1/(\w+) ")


def _log_size(log: Path | None) -> int:
    try:
        return log.stat().st_size if log is not None else 0
    except OSError:
        return 0


def requests_in(log: Path, start: int, stop: int) -> dict[str, int]:
    """Crypto requests in the access log between two offsets, by endpoint ("sign", "batch"...).
    A line is written up to accesslog.FLUSH_SECONDS (50 ms) after its answer, so the counted
    window lags the measured one by up to that much: under the steady load of a measured window
    it holds as many requests (off by a few, negligible over a window of thousands)."""
    with log.open("rb") as f:
        f.seek(start)
        chunk = f.read(max(0, stop - start))
    out: dict[str, int] = {}
    for m in _REQUEST.finditer(chunk):
        name = m.group(1).decode()
        out[name] = out.get(name, 0) + 1
    return out


class PointError(RuntimeError):
    """The load generator failed (its stderr tail is in the message)."""


class _Sampler(threading.Thread):
    def __init__(self, port: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.port, self.every = port, every
        self.seen: set[tuple[int, int, int]] = set()
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.every):
            self.seen |= connection_ids(self.port)

    def finish(self) -> set[tuple[int, int, int]]:
        self._stop_evt.set()
        self.join()
        return self.seen | connection_ids(self.port)


def run_point(variant: Variant, point: Point, timeout: float = 120.0) -> dict[str, Any]:
    cmd, extra_env = variant.command(point)
    env = {**os.environ, **extra_env}
    server = variant.server_pid()
    port = variant.port
    result: dict[str, Any] | None = None
    cpu0: dict[int, float] = {}
    cpu1: dict[int, float] = {}
    busy0 = busy1 = 0.0
    accepted0 = accepted1 = None
    before: set[tuple[int, int, int]] = set()
    seen: set[tuple[int, int, int]] = set()
    sampler: _Sampler | None = None
    log0 = log1 = 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.PIPE, env=env, cwd=ROOT
        )

        def ack() -> None:
            # A generator run with --sync waits for this line before it moves on.
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.write(b"\n")
                proc.stdin.flush()

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if line == "#measure-start":
                    accepted0 = tcp_passive_opens()
                    busy0 = system_busy()
                    if server is not None:
                        cpu0 = tree_cpu(server)
                    if port is not None:
                        before = connection_ids(port)
                        sampler = _Sampler(port)
                        sampler.start()
                    # Last before the generator starts counting (first after it stops), so the
                    # log's window is the generator's, but for the calls in flight at its edges.
                    log0 = _log_size(variant.log)
                    ack()
                elif line == "#measure-stop":
                    log1 = _log_size(variant.log)
                    accepted1 = tcp_passive_opens()
                    busy1 = system_busy()
                    if server is not None:
                        cpu1 = tree_cpu(server)
                    if sampler is not None:
                        seen = sampler.finish()
                        sampler = None
                    ack()
                elif line.startswith("{"):
                    result = json.loads(line)
            rc = proc.wait()
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            watchdog.cancel()
            if proc.poll() is None:
                kill()
                proc.wait()
            if sampler is not None:
                sampler.finish()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    if rc != 0 or result is None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise PointError(f"{variant.name} {point.op} x{point.threads}: exit {rc}\n{tail}")
    result["variant"] = variant.name
    result["op"] = result.get("op", point.op)
    if point.churn:
        result["op"] = f"{result['op']}/churn{point.churn}"
    ops = int(result.get("ops", 0))
    if server is not None and ops:
        result["server_cpu_us_per_op"] = cpu_delta(cpu0, cpu1) * 1e6 / ops
    # CPU that neither the client nor the server used inside the window: other processes on a
    # shared machine (noise), as a percentage of all CPUs.
    server_s = cpu_delta(cpu0, cpu1) if server is not None else 0.0
    other = busy1 - busy0 - float(result.get("user_s", 0)) - float(result.get("sys_s", 0))
    secs = float(result.get("seconds", 0)) or 1.0
    result["other_cpu_pct"] = max(0.0, other - server_s) * 100 / secs / (os.cpu_count() or 1)
    if port is not None:
        result["new_connections"] = new_connections(port, before, seen)
    if accepted0 is not None and accepted1 is not None:
        result["tcp_accepted"] = accepted1 - accepted0
    if variant.log is not None and log1 > log0:
        result["requests"] = requests_in(variant.log, log0, log1)
    if stderr.strip():
        result["stderr_tail"] = stderr.strip()[-300:]
    return result
