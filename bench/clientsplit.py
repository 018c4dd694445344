"""Where the client's CPU goes beyond user instructions (issue 15): module-c (p11bench ->
libpkcs11ws.so) against libcurl-c (curlbench, the module's request from C) on the same key
service, HMAC-SHA256 sign of 64 B, the variants alternating (A B A B ...).

Inside each generator's measured window (its --sync markers): user and system CPU, voluntary
and involuntary context switches and minor page faults (the generator's getrusage), the threads
that ran (/proc/PID/task), and with --syscalls the syscalls per operation by name and the
context switches (kernel tracepoints counted by `perf stat`, enabled for the window only); with
--perf DIR, a `perf record -e cpu-clock` of each window (no hardware counters on this VM).
Prints per variant the medians per operation.

Run: python -m bench.clientsplit [--threads 1] [--reps 5] [--seconds 3] [--syscalls]
         [--env KEY=VALUE ...] (client configuration for module-c: PKCS11WS_ is prefixed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.build import ROOT
from bench.lab import Lab
from bench.procs import CLK_TCK, default_placement
from bench.runner import Point, Variant

SYSCALLS = ("futex", "recvfrom", "poll", "sendto", "getpid", "read", "write", "clock_nanosleep")


def _threads(pid: int) -> dict[int, tuple[float, float, int, int, int]]:
    """Per thread: (user s, system s, voluntary, involuntary switches, minor faults)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (task / "stat").read_text()
            f = stat[stat.rindex(")") + 2 :].split()
            minflt, utime, stime = int(f[7]), int(f[11]), int(f[12])
            vol = invol = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol = int(line.split()[1])
            out[int(task.name)] = (utime / CLK_TCK, stime / CLK_TCK, vol, invol, minflt)
    return out


def _delta(
    a: dict[int, tuple[float, float, int, int, int]],
    b: dict[int, tuple[float, float, int, int, int]],
) -> tuple[list[float], int]:
    tot = [0.0] * 5
    ran = 0
    for tid, v in b.items():
        w = a.get(tid, (0.0, 0.0, 0, 0, 0))
        d = [x - y for x, y in zip(v, w, strict=True)]
        if any(d):
            ran += 1
        tot = [t + x for t, x in zip(tot, d, strict=True)]
    return tot, ran


def _perf_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].isdigit():
            name = f[2].split(":")[-1].removeprefix("sys_enter_")
            counts["all syscalls" if name == "sys_enter" else name] = int(f[0])
    return counts


def run(variant: Variant, point: Point, strace: bool, perf: Path | None = None) -> dict[str, Any]:
    cmd, extra = variant.command(point)
    errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed below; its tail explains a failure)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=errors,
        stdin=subprocess.PIPE,
        env={**os.environ, **extra},
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdin is not None
    t0: dict[int, tuple[float, float, int, int, int]] = {}
    t1: dict[int, tuple[float, float, int, int, int]] = {}
    tracer: subprocess.Popen[bytes] | None = None
    sampler: subprocess.Popen[bytes] | None = None
    tmp = Path(tempfile.mkdtemp())
    trace_file, ctl, ack = tmp / "perf.csv", tmp / "ctl", tmp / "ack"
    result: dict[str, Any] = {}
    if strace:
        # Kernel tracepoints counted by perf (no slow-down to speak of, unlike strace),
        # enabled for the measured window only through perf's control fifo.
        os.mkfifo(ctl)
        os.mkfifo(ack)
        events = ",".join(["raw_syscalls:sys_enter", "sched:sched_switch",
                           *(f"syscalls:sys_enter_{n}" for n in SYSCALLS)])  # fmt: skip
        tracer = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-D", "-1", f"--control=fifo:{ctl},{ack}", "-e", events,
             "-o", str(trace_file), "-p", str(proc.pid)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    ctl_w = open(ctl, "w") if strace else None  # noqa: SIM115
    ack_r = open(ack) if strace else None  # noqa: SIM115

    def control(what: str) -> None:
        if ctl_w is not None and ack_r is not None:
            ctl_w.write(what + "\n")
            ctl_w.flush()
            ack_r.readline()

    for raw in proc.stdout:
        line = raw.decode().strip()
        if line == "#measure-start":
            if perf is not None:
                sampler = subprocess.Popen(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", "10000", "-p",
                     str(proc.pid), "-o", str(perf)],
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            t0 = _threads(proc.pid)
            control("enable")
        elif line == "#measure-stop":
            control("disable")
            t1 = _threads(proc.pid)
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)
                sampler.wait()
        elif line.startswith("{"):
            result = json.loads(line)
            continue
        else:
            continue
        proc.stdin.write(b"\n")
        proc.stdin.flush()
    proc.stdin.close()
    proc.wait()
    errors.seek(0)
    said = errors.read().decode(errors="replace").strip()
    errors.close()
    if proc.returncode != 0 or not result:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
        raise RuntimeError(
            f"{variant.name}: the generator failed (exit {proc.returncode}, "
            f"{'no' if not result else 'a'} result line): {said[-1500:] or '(no output)'}"
        )
    ops = int(result.get("ops", 0)) or 1
    _, ran = _delta(t0, t1)
    row: dict[str, Any] = {
        "ops": ops,
        "ops_per_s": float(result.get("ops_per_s", 0)),
        "user_us": float(result["user_s"]) * 1e6 / ops,
        "sys_us": float(result["sys_s"]) * 1e6 / ops,
        "vcsw": int(result["vcsw"]) / ops,
        "icsw": int(result["ivcsw"]) / ops,
        "faults": int(result["minflt"]) / ops,
        "threads_ran": ran,
        "p50_us": float(result.get("p50_us", 0)),
    }
    if tracer is not None:
        tracer.send_signal(signal.SIGINT)
        tracer.wait()
        counts = _perf_counts(trace_file.read_text())
        row["syscalls"] = {k: v / ops for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    if ctl_w is not None and ack_r is not None:
        ctl_w.close()
        ack_r.close()
    shutil.rmtree(tmp)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--syscalls", action="store_true")
    ap.add_argument("--perf", type=Path, help="DIR: perf record -e cpu-clock of each window")
    ap.add_argument("--no-curl", action="store_true", help="module-c rows only")
    ap.add_argument("--env", action="append", default=[], help="module-c setting KEY=VALUE")
    ap.add_argument(
        "--setting", action="append", default=[], help="NAME:KEY=VALUE,... a module-c variant"
    )
    args = ap.parse_args()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as work:
        lab = Lab(Path(work), default_placement(), stack)
        lab.start_service_only()
        assert lab.service is not None
        variants: list[tuple[str, Variant, dict[str, str]]] = []
        base = lab.module_variant(lab.service)
        settings = args.setting or ["module-c:" + ",".join(args.env)]
        for s in settings:
            name, _, pairs = s.partition(":")
            env = {}
            for pair in filter(None, pairs.split(",")):
                k, _, v = pair.partition("=")
                # "env.NAME": a raw environment variable; else a client configuration key
                env[k[4:] if k.startswith("env.") else "PKCS11WS_" + k.upper()] = v
            variants.append((name, base, env))
        if not args.no_curl:
            variants.append(("libcurl-c", lab.libcurl_variant(lab.service), {}))
        point = Point("sign64", args.threads, args.seconds, args.warmup)
        rows: dict[str, list[dict[str, Any]]] = {}
        for rep in range(args.reps):
            for name, v, env in variants:
                command = v.command

                def with_env(p: Point, command: Any = command, env: Any = env) -> Any:
                    c, e = command(p)
                    return c, {**e, **env}

                data = args.perf / f"{name}-{rep}.data" if args.perf else None
                r = run(Variant(name, "", with_env), point, args.syscalls, data)
                rows.setdefault(name, []).append(r)
                sc = r.get("syscalls", {})
                print(f"rep {rep} {name}: {r['ops_per_s']:.0f} ops/s user {r['user_us']:.1f} "
                      f"sys {r['sys_us']:.1f} us/op vcsw {r['vcsw']:.2f} icsw {r['icsw']:.2f} "
                      f"flt {r['faults']:.2f} threads {r['threads_ran']}"
                      + (" " + " ".join(f"{k} {n:.2f}" for k, n in list(sc.items())[:10])
                         if sc else ""), flush=True)  # fmt: skip
        print(f"\nthreads {args.threads}, medians of {args.reps}, us/op and per op")
        print("| variant | ops/s | user us | sys us | vol csw | invol csw | faults | p50 us |")
        print("|---|---|---|---|---|---|---|---|")
        for name, rs in rows.items():

            def med(k: str, rs: list[dict[str, Any]] = rs) -> float:
                return statistics.median(float(r[k]) for r in rs)

            print(f"| {name} | {med('ops_per_s'):,.0f} | {med('user_us'):.1f} | "
                  f"{med('sys_us'):.1f} | {med('vcsw'):.2f} | {med('icsw'):.2f} | "
                  f"{med('faults'):.2f} | {med('p50_us'):.0f} |")  # fmt: skip
            if args.syscalls:
                keys = sorted({k for r in rs for k in r.get("syscalls", {})})
                calls = {k: statistics.median(r["syscalls"].get(k, 0.0) for r in rs) for k in keys}
                top = sorted(calls.items(), key=lambda kv: -kv[1])
                print("  syscalls/op: " + ", ".join(f"{k} {n:.2f}" for k, n in top if n >= 0.01)
                      )  # fmt: skip


if __name__ == "__main__":
    main()
