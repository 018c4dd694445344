"""Group commit settings side by side: module-c (p11bench -> libpkcs11ws.so -> key service)
HMAC-SHA256 sign of 64 B at chosen thread counts, once per setting per repetition, the settings
taking turns as `make bench`'s sweep does (A B C, then C B A: bench/procs.py in_turn), so a
shared machine's drift hits them alike and no setting always runs first. Not part of `make
bench`; it is how BATCHINFLIGHT/BATCHSIZE defaults were chosen (bench/results/profile-issue15.md).

Run: python -m bench.groupab [--threads 2,8] [--reps 3] [--seconds 4] [--warmup 1]
         [--setting NAME:KEY=VALUE,KEY=VALUE ...]
A setting's keys are client configuration keys (PKCS11WS_ + key in the environment), e.g.
`--setting in1:BATCHINFLIGHT=1 --setting in2:BATCHINFLIGHT=2`; a setting with no keys is the
default configuration, and the same setting under two names is an A/A control (how far two
runs of one thing differ on this machine). `--seconds 2.5 --warmup 0.3` is the sweep's point.
Prints, per setting and thread count, the medians of ops/s, client and service CPU per
operation, calls per request (the service's access log: crypto requests in the measured window)
and the client's context switches per operation; then, per other setting, its repetitions'
paired differences from the first setting (median, and in how many repetitions it was higher).

--ir [--n1 100 --n2 400]: instead of timed runs, executed instructions (valgrind's callgrind),
which a loaded machine does not change: per setting, the client's per C_Sign (p11bench under
callgrind doing n1 and then n2 signatures, bench/instructions.py) and the key service's per
request (the service under callgrind, counted while p11bench in that setting does n1 and then
n2 signatures, bench/service_ir.py's way); each is (Ir(n2) - Ir(n1)) / (n2 - n1), so start-up,
login and the TLS handshake cancel out. At one thread this is how group commit on and off were
shown to do the same work (bench/results/profile-issue15-onoff.md). valgrind runs one thread at
a time: above one thread the figures are those of that mix of lone calls and batches.
Each service window also holds its p11bench's start (C_Initialize, login: ~107M Ir on the
service in all), which varies by up to ~5M Ir from one process to the next: keep n2 - n1 at
the default 300 or more (at 40, one setting once read 35.7k for ~171k per signature).

--together: the first two settings' p11bench processes run at the same time (--threads each,
pinned to the client CPU, the one started first alternating), so a drift of the machine hits
both at once; prints their paired differences in client CPU per operation, p50 and operations.
The two share the client CPU and the service, so this compares the settings' own cost, not
their latency alone (their p50s move together); `--setting on: --setting on2:` is the A/A.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import instructions, service_ir
from bench.lab import Lab
from bench.procs import default_placement, in_turn
from bench.runner import Point, run_point
from bench.services import TOKEN_LABEL, KeyService


def _setting(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition(":")
    env = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        env["PKCS11WS_" + key.strip().upper()] = value.strip()
    return name, env


def _row(name: str, threads: int, rs: list[dict[str, Any]]) -> str:
    def med(key: str) -> float:
        return statistics.median(float(r.get(key, 0.0)) for r in rs)

    per = []
    for r in rs:
        reqs = sum((r.get("requests") or {}).values())
        per.append(r["ops"] / reqs if reqs else 0.0)
    spread = " ".join(f"{r['ops_per_s']:.0f}" for r in rs)
    return (
        f"| {name} | {threads} | {med('ops_per_s'):,.0f} ({spread}) | {med('cpu_us_per_op'):.1f}"
        f" | {med('server_cpu_us_per_op'):.1f} | {statistics.median(per):.2f}"
        f" | {med('csw_per_op'):.1f} | {med('p50_us'):.0f} | {med('other_cpu_pct'):.0f} |"
    )


_PAIRED = (("p50_us", "p50 us"), ("cpu_us_per_op", "client CPU us/op"),
           ("server_cpu_us_per_op", "service CPU us/op"), ("ops_per_s", "ops/s"))  # fmt: skip


def _paired(
    first: str, others: list[str], threads: list[int], results: dict[tuple[str, int], Any]
) -> str:
    """Per other setting and thread count: first's value minus the other's, repetition by
    repetition (each pair ran next to each other), as the median and the count of repetitions
    where first's was higher."""
    head = " | ".join(label for _, label in _PAIRED)
    lines = [f"| {first} minus | threads | {head} |", "|---|---|" + "---|" * len(_PAIRED)]
    for t in threads:
        for other in others:
            a, b = results[(first, t)], results[(other, t)]
            cells = []
            for key, _ in _PAIRED:
                d = [
                    float(x.get(key, 0.0)) - float(y.get(key, 0.0))
                    for x, y in zip(a, b, strict=True)
                ]
                cells.append(f"{statistics.median(d):+.1f} ({sum(v > 0 for v in d)}/{len(d)})")
            lines.append(f"| {other} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _service_window(lab: Lab, svc: KeyService, out: Path, env: dict[str, str], n: int,
                    threads: int) -> int:  # fmt: skip
    """Ir of the service (under callgrind, writing dumps to out*) while one p11bench process
    with env signs n times."""
    before = set(out.parent.glob(out.name + "*"))
    service_ir._ctl(svc.pid, "-z")
    cmd = [str(lab.bins["p11bench"]), "--module", lab.module, "--token", TOKEN_LABEL, "--op",
           "sign64", "--threads", str(threads), "--seconds", "1", "--warmup", "0", "--count",
           str(n)]  # fmt: skip
    r = subprocess.run(
        cmd,
        env={**os.environ, **lab.module_env(svc.port), **env},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"p11bench failed: {r.stderr[-1500:]}")
    service_ir._ctl(svc.pid, "-d")
    deadline = time.monotonic() + 120
    while True:
        for f in sorted(set(out.parent.glob(out.name + "*")) - before):
            m = service_ir._TOTALS.search(f.read_text(errors="replace"))
            if m is not None:
                return int(m.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"callgrind (pid {svc.pid}) wrote no dump {out}.N within 120 s of -d"
            )
        time.sleep(0.5)


def ir(
    args: argparse.Namespace,
    settings: list[tuple[str, dict[str, str]]],
    threads: list[int],
    lab: Lab,
    work: Path,
    stack: contextlib.ExitStack,
) -> None:
    """--ir: client instructions per C_Sign and service instructions per request, per setting."""
    n1, n2 = args.n1, args.n2
    instructions.instructions(lab, "sign64", n1, work / "cg.w", 1)  # warm: a fresh build's caches
    client: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.reps):
        for t in threads:
            for name, env in in_turn(settings, rep):
                a = instructions.instructions(lab, "sign64", n1, work / "cg.a", t, env)
                b = instructions.instructions(lab, "sign64", n2, work / "cg.b", t, env)
                client.setdefault((name, t), []).append((b - a) / (n2 - n1))
                print(f"rep {rep} {name} x{t}: client {client[(name, t)][-1]:,.0f} Ir per C_Sign",
                      flush=True)  # fmt: skip
    assert lab.service is not None and lab.ksd is not None
    lab.service.stop()
    out = work / "cg.service"
    svc = stack.enter_context(service_ir.callgrind_service(lab, out))
    service_ir._ctl(svc.pid, "-i", "on")
    _service_window(lab, svc, out, {}, 20, 1)  # warm: first-use imports, caches
    service: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.reps):
        for t in threads:
            for name, env in in_turn(settings, rep):
                a = _service_window(lab, svc, out, env, n1, t)
                b = _service_window(lab, svc, out, env, n2, t)
                service.setdefault((name, t), []).append((b - a) / (n2 - n1))
                print(f"rep {rep} {name} x{t}: service {service[(name, t)][-1]:,.0f} Ir per "
                      "signature", flush=True)  # fmt: skip
    print()
    print("| setting | threads | client Ir per C_Sign, median (each rep) | service Ir per "
          "signature, median (each rep) |")  # fmt: skip
    print("|---|---|---|---|")
    for t in threads:
        for name, _ in settings:
            cells = []
            for per in (client[(name, t)], service[(name, t)]):
                each = " ".join(f"{x / 1000:.1f}k" for x in per)
                cells.append(f"{statistics.median(per) / 1000:.1f}k ({each})")
            print(f"| {name} | {t} | " + " | ".join(cells) + " |")


def together(
    args: argparse.Namespace, settings: list[tuple[str, dict[str, str]]], threads: list[int],
    lab: Lab,
) -> list[str]:  # fmt: skip
    """--together: the first two settings run at the same time, repetition by repetition;
    returns the table's rows."""
    assert lab.service is not None
    (a_name, a_env), (b_name, b_env) = settings[0], settings[1]
    cpu = lab.placement.client

    def start(env: dict[str, str], t: int) -> subprocess.Popen[str]:
        cmd = [str(lab.bins["p11bench"]), "--module", lab.module, "--token", TOKEN_LABEL,
               "--op", "sign64", "--threads", str(t), "--seconds", str(args.seconds),
               "--warmup", str(args.warmup)]  # fmt: skip
        assert lab.service is not None
        return subprocess.Popen(
            ["taskset", "-c", cpu, *cmd] if cpu else cmd,
            env={**os.environ, **lab.module_env(lab.service.port), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(p: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = p.communicate(timeout=120 + args.seconds)
        lines = out.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"p11bench failed (exit {p.returncode}): {err[-1500:]}")
        r: dict[str, Any] = json.loads(lines[-1])
        return r

    keys = (("cpu_us_per_op", "client CPU us/op"), ("p50_us", "p50 us"), ("ops", "operations"))
    rows = []
    for t in threads:
        diffs: dict[str, list[float]] = {k: [] for k, _ in keys}
        for rep in range(args.reps):
            if rep % 2 == 0:
                pa = start(a_env, t)
                pb = start(b_env, t)
            else:
                pb = start(b_env, t)
                pa = start(a_env, t)
            ra, rb = result(pa), result(pb)
            for k, _ in keys:
                diffs[k].append(float(ra[k]) - float(rb[k]))
            print(f"rep {rep} x{t}: {a_name} / {b_name}: client {ra['cpu_us_per_op']:.1f} / "
                  f"{rb['cpu_us_per_op']:.1f} us/op, p50 {ra['p50_us']:.1f} / "
                  f"{rb['p50_us']:.1f} us, ops {ra['ops']} / {rb['ops']}", flush=True)  # fmt: skip
        cells = [
            f"{statistics.median(d):+.1f} ({sum(v > 0 for v in d)}/{len(d)})"
            for d in diffs.values()
        ]
        rows.append(f"| {a_name} minus {b_name}, together | {t} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--setting", action="append", default=[])
    ap.add_argument("--ir", action="store_true", help="instructions (callgrind), not timed runs")
    ap.add_argument("--n1", type=int, default=100)
    ap.add_argument("--n2", type=int, default=400)
    ap.add_argument("--together", action="store_true", help="the first two settings at once")
    args = ap.parse_args()
    settings = [_setting(s) for s in args.setting] or [("default", {})]
    threads = [int(t) for t in args.threads.split(",")]
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as work:
        lab = Lab(Path(work), default_placement(), stack)
        lab.start_service_only()
        assert lab.service is not None
        if args.ir:
            ir(args, settings, threads, lab, Path(work), stack)
            return
        if args.together:
            if len(settings) < 2:
                raise SystemExit("--together needs two settings")
            rows = together(args, settings, threads, lab)
            print()
            print("| paired differences: median (reps where the first was higher) | threads"
                  " | client CPU us/op | p50 us | operations |")  # fmt: skip
            print("|---|---|---|---|---|")
            print("\n".join(rows))
            return
        base = lab.module_variant(lab.service)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rep in range(args.reps):
            for t in threads:
                for name, env in in_turn(settings, rep):
                    command = base.command

                    def with_env(p: Point, command: Any = command, env: Any = env) -> Any:
                        cmd, e = command(p)
                        return cmd, {**e, **env}

                    base.command = with_env
                    try:
                        r = run_point(base, Point("sign64", t, args.seconds, args.warmup))
                    finally:
                        base.command = command
                    results.setdefault((name, t), []).append(r)
                    print(
                        f"rep {rep} {name} x{t}: {r['ops_per_s']:.0f} ops/s, client "
                        f"{r['cpu_us_per_op']:.1f} us/op, service "
                        f"{r.get('server_cpu_us_per_op', 0):.1f} us/op, "
                        f"{r.get('csw_per_op', 0):.1f} csw/op, requests {r.get('requests')}",
                        flush=True,
                    )
        print()
        print("| setting | threads | ops/s median (each rep) | client CPU us/op"
              " | service CPU us/op | calls per request | client context switches per op | p50 us"
              " | other CPU % |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for t in threads:
            for name, _ in settings:
                print(_row(name, t, results[(name, t)]))
        if len(settings) > 1:
            print()
            print(_paired(settings[0][0], [n for n, _ in settings[1:]], threads, results))


if __name__ == "__main__":
    main()
