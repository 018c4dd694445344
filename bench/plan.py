"""What a benchmark run measures and in which order.

Phases: (1) the sign64 sweep over every variant and thread count; (2) the other operations for
the three PKCS#11 modules (ours, SoftHSM2, SoftHSM2 behind p11-kit); (2a) issue 14's operations
(RSA-2048 and ECDSA P-256 signatures, AES-GCM 4 KiB) for the same three modules at 1 and 8
threads; (2b) thread churn: our module's sign64 with a new host thread every CHURN_OPS
operations, next to the same fixed threads (ops/s and new connections); (3) key service scaling
with 1 and 2 workers (unpinned); (4) start-up; (5) the request counter; (6) the stores: service
CPU per operation on SQLite and PostgreSQL (bench/store_cpu.py), 1 and 2 replicas on PostgreSQL
(bench/replicas.py). Within a phase the variants alternate for each repetition, in an order
that turns round every other repetition (A B C, C B A, A B C, ...), and medians of the
repetitions are reported: a slow drift of a shared machine then hits every variant alike instead
of always favouring the later of two neighbours (the sweep has an even number of repetitions in
a full run, so each variant's mean place in time is the same).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import extras
from bench.lab import Lab
from bench.procs import default_placement, free_port, in_turn
from bench.runner import Point, PointError, Variant, run_point
from bench.services import KeyService


@dataclass(frozen=True)
class Settings:
    quick: bool
    seconds: float  # measured window of a sweep point
    other_seconds: float  # measured window of an other-operation point
    warmup: float
    reps: int
    threads: tuple[int, ...]
    other_threads: tuple[int, ...]
    other_ops: tuple[str, ...]
    worker_threads: tuple[int, ...]
    startup_runs: int
    counter_n: int
    churn_threads: tuple[int, ...] = (1, 8)
    asym_ops: tuple[str, ...] = ("rsasign", "ecsign", "gcm4k")
    asym_threads: tuple[int, ...] = (1, 8)
    sweep_reps: int = 0  # the sign64 sweep's repetitions (0: reps)


def settings(quick: bool | None = None) -> Settings:
    """The full run (about 10 minutes on 2 cores) or BENCH_QUICK=1 (under a minute).
    BENCH_SECONDS and BENCH_REPS override the window and the repetitions."""
    if quick is None:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    if quick:
        s = Settings(
            True,
            0.7,
            0.5,
            0.2,
            1,
            (1, 8),
            (1,),
            ("sign4k", "verify64", "encrypt4k", "decrypt4k", "find", "sessinfo"),
            (8,),
            2,
            50,
            churn_threads=(8,),
            asym_threads=(8,),
        )
    else:
        s = Settings(
            False,
            2.5,
            2.0,
            0.3,
            3,
            (1, 2, 4, 8),
            (1, 8),
            ("sign4k", "verify64", "encrypt4k", "decrypt4k", "find", "sessinfo"),
            (1, 8),
            5,
            200,
            sweep_reps=4,
        )
    if os.environ.get("BENCH_SECONDS"):
        secs = float(os.environ["BENCH_SECONDS"])
        s = Settings(**{**s.__dict__, "seconds": secs, "other_seconds": secs})
    if os.environ.get("BENCH_REPS"):
        n = int(os.environ["BENCH_REPS"])
        s = Settings(**{**s.__dict__, "reps": n, "sweep_reps": n})
    return s


CHURN_OPS = 100  # operations per host thread in the thread-churn phase (issue 16)
NOISY_PCT = 10.0  # CPU % of the machine used by other processes that makes a point redone
MAX_RETRIES = 2


class Progress:
    def __init__(self, total: int, budget: float = 0.0) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.budget = budget  # seconds after which noisy points are no longer redone

    def say(self, msg: str) -> None:
        el = time.monotonic() - self.t0
        print(f"[bench {el:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def point(
        self, phase: str, v: Variant, p: Point, rep: int, r: dict[str, Any] | None, err: str = ""
    ) -> None:
        self.done += 1
        el = time.monotonic() - self.t0
        eta = el / self.done * (self.total - self.done)
        what = (
            f"{r['ops_per_s']:9.0f} ops/s  p50 {r['p50_us']:8.4g} us  p99 {r['p99_us']:8.4g} us"
            if r
            else f"FAILED {err.splitlines()[0]}"
        )
        print(
            f"[bench {el:6.1f}s {self.done:3d}/{self.total} eta {eta:4.0f}s] {phase:7s} "
            f"{p.op:9s} x{p.threads} {v.name:15s} rep {rep + 1}: {what}",
            file=sys.stderr,
            flush=True,
        )


def _run(
    results: list[dict[str, Any]], prog: Progress, phase: str, v: Variant, p: Point, rep: int
) -> None:
    try:
        r = run_point(v, p)
    except PointError as e:
        results.append(
            {
                "phase": phase,
                "variant": v.name,
                "op": p.op,
                "threads": p.threads,
                "rep": rep,
                "failed": str(e),
            }
        )
        prog.point(phase, v, p, rep, None, str(e))
        return
    # A point during which other processes of the (shared) machine used much CPU is measured
    # again, while the run stays within its time budget; the retries are counted and reported.
    retries = 0
    while (
        r.get("other_cpu_pct", 0.0) > NOISY_PCT
        and retries < MAX_RETRIES
        and time.monotonic() - prog.t0 < prog.budget
    ):
        retries += 1
        prog.say(f"  other processes used {r['other_cpu_pct']:.0f}% CPU: measuring again")
        try:
            r = run_point(v, p)
        except PointError:
            break
    r.update(phase=phase, rep=rep, describe=v.describe, noisy_retries=retries)
    results.append(r)
    prog.point(phase, v, p, rep, r)


def run_all(s: Settings, work: Path | None = None) -> dict[str, Any]:
    """Everything; returns {"settings", "placement", "results", "startup", "counter", "notes"}."""
    placement = default_placement()
    out: dict[str, Any] = {"settings": s.__dict__, "placement": placement.describe()}
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pkcs11ws-bench-")))
        lab = Lab(work, placement, stack)
        # A quick run redoes noisy points only in its first 20 s (it stays about 1.5 min on a busy
        # machine); a full run for 12 minutes.
        prog = Progress(0, budget=20.0 if s.quick else 720.0)
        lab.start(prog.say)
        sweep = lab.sweep_variants()
        out["variant_order"] = [v.name for v in sweep]
        out["variant_describe"] = {v.name: v.describe for v in sweep}
        assert lab.service is not None and lab.ksd is not None
        peers = [lab.module_variant(lab.service), *lab.peer_variants()]
        sweep_reps = s.sweep_reps or s.reps
        n_sweep = len(s.threads) * sweep_reps * len(sweep)
        n_other = (
            len(s.other_threads) * s.reps * sum(op in v.ops for op in s.other_ops for v in peers)
        )
        n_other += 1
        n_other += (
            len(s.asym_threads) * s.reps * sum(op in v.ops for op in s.asym_ops for v in peers)
        )
        n_other += len(s.churn_threads) * s.reps * 2
        n_workers = len(s.worker_threads) * s.reps * 4
        prog.total = n_sweep + n_other + n_workers

        for t in s.threads:
            for rep in range(sweep_reps):
                for v in in_turn(sweep, rep):
                    _run(results, prog, "sweep", v, Point("sign64", t, s.seconds, s.warmup), rep)
        # The harness's own cost per op (two clock reads, the loop): once.
        _run(results, prog, "other", peers[0], Point("noop", 1, s.other_seconds, s.warmup), 0)
        for op in s.other_ops:
            for t in s.other_threads:
                for rep in range(s.reps):
                    for v in in_turn([v for v in peers if op in v.ops], rep):
                        _run(
                            results, prog, "other", v, Point(op, t, s.other_seconds, s.warmup), rep
                        )

        # Issue 14: private-key signatures and AES-GCM, the three modules alternating.
        for op in s.asym_ops:
            for t in s.asym_threads:
                for rep in range(s.reps):
                    for v in in_turn([v for v in peers if op in v.ops], rep):
                        point = Point(op, t, s.other_seconds, s.warmup)
                        _run(results, prog, "asym", v, point, rep)

        for t in s.churn_threads:
            for rep in range(s.reps):
                for churn in in_turn((0, CHURN_OPS), rep):
                    point = Point("sign64", t, s.other_seconds, s.warmup, churn=churn)
                    _run(results, prog, "churn", peers[0], point, rep)

        prog.say("starting key services with 1 and 2 workers (unpinned) for the scaling runs")
        assert lab.ksd is not None
        with (
            KeyService(lab.ksd, 1, None, "w1", port=free_port()) as w1,
            KeyService(lab.ksd, 2, None, "w2", port=free_port()) as w2,
        ):
            scaling = [
                lab.libcurl_variant(w1, "@w1", None),
                lab.libcurl_variant(w2, "@w2", None),
                lab.module_variant(w1, "@w1", None),
                lab.module_variant(w2, "@w2", None),
            ]
            for t in s.worker_threads:
                for rep in range(s.reps):
                    for v in in_turn(scaling, rep):
                        _run(
                            results,
                            prog,
                            "workers",
                            v,
                            Point("sign64", t, s.seconds, s.warmup),
                            rep,
                        )

        prog.say("start-up: pkcs11-tool -L")
        try:
            out["startup"] = extras.startup(lab, s.startup_runs, prog.say)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            lab.notes.append(f"start-up measurement failed: {e}")
        prog.say("request counter: C_Sign(NULL) length query vs plain C_Sign")
        try:
            out["counter"] = extras.request_counter(lab, s.counter_n)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            lab.notes.append(f"request counter failed: {e}")
        # After the counter (extras.thread_churn): thread churn in a Python host, python-pkcs11.
        prog.say("thread churn: python-pkcs11, fixed threads vs a new thread every 100 signatures")
        try:
            out["churn_python"] = extras.thread_churn(lab, s.seconds, s.reps)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            lab.notes.append(f"thread churn failed: {e}")
        prog.say("stores: service CPU per operation on SQLite and PostgreSQL; 1 and 2 replicas")
        try:
            from bench import replicas, store_cpu

            out["store_cpu"] = store_cpu.run(500 if s.quick else 3000)
            out["replicas"] = replicas.run(8, 1.0 if s.quick else s.seconds)
        except (RuntimeError, OSError, subprocess.SubprocessError, ImportError,
                AssertionError) as e:  # fmt: skip
            # A failed phase is a note in the report, not a run without a report.
            lab.notes.append(f"store measurements failed: {e!r}")
        out["notes"] = lab.notes
        out["elapsed_s"] = time.monotonic() - prog.t0
    out["results"] = results
    return out
