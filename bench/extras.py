"""Measurements that are not a throughput point:

- start-up: wall time and peak RSS of `pkcs11-tool --module M -L` (GNU time's %M),
  for our module and for SoftHSM2, alternated, median of several runs;
- the request counter: requests the key service logs (its access log lines) for N x
  C_Sign(buf) against N x [C_Sign(NULL) then C_Sign(buf)], and for python-pkcs11 (which always
  makes the length query first);
- thread churn (issue 16): python-pkcs11 signing on 4 fixed threads against 4 slots that start
  a new thread (with its own session) every 100 signatures: ops/s and the TLS connections the
  module opened in the window (0 expected: a new thread takes an idle pooled handle).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.build import ROOT
from bench.lab import SIGN_LOG_LINE, Lab
from bench.procs import in_turn, pinned
from bench.services import TOKEN_LABEL


def _run_timed(cmd: list[str], env: dict[str, str], gnu_time: str) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS in KiB, exit code, stdout and stderr) of one child.

    The peak RSS comes from GNU time (%M), not from wait4() here: a child forked from this
    Python process starts with our page-table high-water mark, which exec() keeps, so its
    ru_maxrss would never read below this process's own size."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        full = [gnu_time, "-f", "%M", "-o", rss_file.name, *cmd]
        t0 = time.perf_counter()
        r = subprocess.run(full, capture_output=True, text=True, env=env, timeout=120)
        wall = time.perf_counter() - t0
        text = rss_file.read().strip().splitlines()
    rss = int(text[-1]) if text and text[-1].isdigit() else 0
    return wall, rss, r.returncode, r.stdout + r.stderr


def startup(lab: Lab, runs: int, progress: Any = None) -> list[dict[str, Any]]:
    tool = shutil.which("pkcs11-tool")
    gnu_time = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    if tool is None or gnu_time is None:
        lab.notes.append("start-up not measured: needs pkcs11-tool (opensc) and /usr/bin/time")
        return []
    subjects: list[tuple[str, str, dict[str, str]]] = [
        ("libpkcs11ws", lab.module, lab.module_env())
    ]
    if lab.hsm is not None:
        subjects.append(("softhsm", lab.hsm.module, lab.hsm.env()))
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name, _, _ in subjects}
    for i in range(runs):
        for name, module, env in in_turn(subjects, i):
            cmd = pinned([tool, "--module", module, "-L"], lab.placement.client)
            wall, rss, rc, out = _run_timed(cmd, {**os.environ, **env}, gnu_time)
            if rc != 0 or TOKEN_LABEL not in out:
                raise RuntimeError(f"pkcs11-tool -L on {module} failed (exit {rc}):\n{out}")
            samples[name].append((wall, rss))
            if progress:
                progress(f"start-up {name} run {i + 1}/{runs}: {wall * 1e3:.1f} ms, {rss} KiB")
    return [
        {
            "subject": name,
            "runs": len(s),
            "wall_ms": statistics.median(w for w, _ in s) * 1e3,
            "wall_ms_min": min(w for w, _ in s) * 1e3,
            "rss_kib": statistics.median(r for _, r in s),
        }
        for name, s in samples.items()
    ]


def _count_requests(lab: Lab, cmd: list[str], env: dict[str, str]) -> int:
    assert lab.service is not None
    before = lab.service.count_log(SIGN_LOG_LINE)
    r = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr.strip()[-500:]}")
    time.sleep(0.5)  # the service writes its access line just after sending the answer
    return lab.service.count_log(SIGN_LOG_LINE) - before


def request_counter(lab: Lab, n: int) -> list[dict[str, Any]]:
    exe = str(lab.bins["p11bench"])
    base = [
        exe,
        "--module",
        lab.module,
        "--token",
        TOKEN_LABEL,
        "--op",
        "sign64",
        "--threads",
        "1",
        "--count",
        str(n),
    ]
    out = []
    for label, extra in (("C_Sign(buf)", []), ("C_Sign(NULL) + C_Sign(buf)", ["--null-query"])):
        got = _count_requests(lab, base + extra, lab.module_env())
        out.append({"host": "p11bench (C)", "calls": label, "signatures": n, "requests": got})
    py = [
        sys.executable,
        "-m",
        "bench.pyhosts",
        "pkcs11",
        "--module",
        lab.module,
        "--token",
        TOKEN_LABEL,
        "--threads",
        "1",
        "--count",
        str(n),
    ]
    got = _count_requests(lab, py, {**lab.module_env(), "PYTHONPATH": str(ROOT)})
    out.append(
        {
            "host": "python-pkcs11",
            "calls": "C_Sign(NULL) + C_Sign(buf) (its own way)",
            "signatures": n,
            "requests": got,
        }
    )
    return out


def thread_churn(lab: Lab, seconds: float, reps: int, threads: int = 4,
                 per_thread: int = 100) -> list[dict[str, Any]]:  # fmt: skip
    """Fixed threads vs a new thread every per_thread signatures (python-pkcs11 host), alternated;
    the medians of reps runs each."""
    base = [sys.executable, "-m", "bench.pyhosts", "pkcs11", "--module", lab.module, "--token",
            TOKEN_LABEL, "--threads", str(threads), "--seconds", str(seconds), "--warmup",
            "0.3"]  # fmt: skip
    env = {**os.environ, **lab.module_env(), "PYTHONPATH": str(ROOT)}
    runs: dict[int, list[dict[str, Any]]] = {0: [], per_thread: []}
    for rep in range(reps):
        for churn in in_turn(list(runs), rep):
            cmd = pinned(base + (["--churn", str(churn)] if churn else []), lab.placement.client)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
            if r.returncode != 0 or not r.stdout.strip():
                raise RuntimeError(f"pyhosts churn {churn} failed: {r.stderr.strip()[-500:]}")
            runs[churn].append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = []
    for churn, rs in runs.items():
        out.append(
            {
                "host": "python-pkcs11",
                "threads": threads,
                "new_thread_every": churn,
                "ops_per_s": statistics.median(x["ops_per_s"] for x in rs),
                "p50_us": statistics.median(x["p50_us"] for x in rs),
                "threads_started": statistics.median(x.get("threads_started", 0) for x in rs),
                "module_connects": max(x.get("module_connects", -1) for x in rs),
                "errors": sum(x["errors"] for x in rs),
            }
        )
    return out
