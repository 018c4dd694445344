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
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.lab import Lab
from bench.procs import default_placement, in_turn
from bench.runner import Point, run_point


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--setting", action="append", default=[])
    args = ap.parse_args()
    settings = [_setting(s) for s in args.setting] or [("default", {})]
    threads = [int(t) for t in args.threads.split(",")]
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as work:
        lab = Lab(Path(work), default_placement(), stack)
        lab.start_service_only()
        assert lab.service is not None
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
