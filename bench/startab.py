"""A/B start-up of `pkcs11-tool --module M -L`: two builds of the module, alternated, and SoftHSM2.

    python -m bench.startab --base OTHER/libpkcs11ws.so [--runs 30] [--callgrind 3] [--hold]
                            [--base-env NAME=VALUE ...]

Starts the key service (one softcard, pinned to the server CPU) and a SoftHSM2 token as the
bench does (bench/lab.py), then runs `pkcs11-tool -L` pinned to the client CPU for this tree's
module, the --base module (e.g. a copy of main's built package) and SoftHSM2 in turn, A B C A B
C..., and prints each one's median, minimum and low quantiles (p10, p25) of wall time and CPU
time (user + system), and the median of this - base per round with a bootstrap interval.
--callgrind N adds the median instruction count of N runs each under valgrind (no pinning).
--base-env adds a variable to the base's environment only (e.g. this tree's module as --base with
SASL_PATH=/nonexistent: what libldap's SASL plug-ins cost a start).
--hold keeps the service up afterwards and prints the environment that reaches it, for
strace/perf by hand (Ctrl-C or SIGTERM ends it and stops the service).
The idle `make bench` (bench/extras.py startup) stays the judge of the target; this is for
comparing one change at a time on a shared, noisy box.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.lab import Lab
from bench.procs import default_placement, pinned
from bench.services import TOKEN_LABEL, SoftHSM


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, int, str]:
    """(wall ms, CPU ms (user + system, from wait4), peak RSS KiB (GNU time's %M), exit code,
    output) of one child run under /usr/bin/time. CPU time is the load-robust figure here:
    on a busy box the wall time is mostly waiting for the client CPU."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        full = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd]
        t0 = time.perf_counter()
        p = subprocess.Popen(
            full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out = p.stdout.read() if p.stdout is not None else ""
        _, status, ru = os.wait4(p.pid, 0)
        wall = (time.perf_counter() - t0) * 1e3
        p.returncode = os.waitstatus_to_exitcode(status)
        text = rss_file.read().strip().splitlines()
    rss = int(text[-1]) if text and text[-1].isdigit() else 0
    return wall, (ru.ru_utime + ru.ru_stime) * 1e3, rss, p.returncode, out


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank): on a loaded box the low quantiles of alternating runs are
    the ones least disturbed by the other processes on the client CPU."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _median_ci(diffs: list[float], rounds: int = 1000) -> tuple[float, float]:
    """A bootstrap 95 % interval of the median of paired differences. Each round ran this and
    the base next to each other, so a difference cancels most of the box's slow drift; on a
    loaded box it is the figure that still tells a change of ~1 ms from noise."""
    rng = random.Random(1)
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds) - 1]


def _callgrind(cmd: list[str], env: dict[str, str]) -> int:
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/cg.out", *cmd],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        m = re.search(r"Collected : (\d+)", r.stderr)
        if r.returncode != 0 or m is None:
            raise RuntimeError(f"callgrind of {cmd} failed:\n{r.stderr[-2000:]}")
        return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the other build's libpkcs11ws.so")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--callgrind", type=int, default=0)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--base-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--no-softhsm", action="store_true")
    args = ap.parse_args()
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        raise SystemExit("needs pkcs11-tool (opensc)")
    placement = default_placement()
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        lab = Lab(Path(work), placement, stack)
        lab.start_service_only(say=lambda s: print(s, flush=True))
        env = {**os.environ, **lab.module_env()}
        extra = dict(kv.split("=", 1) for kv in args.base_env)
        subjects = [("this", lab.module, env), ("base", args.base, {**env, **extra})]
        if not args.no_softhsm:
            hsm = SoftHSM(Path(work) / "softhsm")
            hsm.init_token(lab.bins["p11bench"])
            lab.p11bench_setup(hsm.module, hsm.env())
            subjects.append(("softhsm", hsm.module, {**os.environ, **hsm.env()}))
        for _, module, e in subjects:  # warm-up: .pyc files, page cache
            subprocess.run([tool, "--module", module, "-L"], env=e, capture_output=True)
        walls: dict[str, list[float]] = {name: [] for name, _, _ in subjects}
        cpus: dict[str, list[float]] = {name: [] for name, _, _ in subjects}
        rss: dict[str, list[int]] = {name: [] for name, _, _ in subjects}
        for _ in range(args.runs):
            for name, module, e in subjects:
                cmd = pinned([tool, "--module", module, "-L"], placement.client)
                wall, cpu, kib, rc, out = _run(cmd, e)
                if rc != 0 or TOKEN_LABEL not in out:
                    raise RuntimeError(f"{name}: pkcs11-tool -L failed ({rc}):\n{out}")
                walls[name].append(wall)
                cpus[name].append(cpu)
                rss[name].append(kib)
        load = os.getloadavg()[0]
        print(f"{args.runs} alternating runs each, load {load:.1f}, {placement.describe()}")
        for name, _, _ in subjects:
            w, c = walls[name], cpus[name]
            print(
                f"  {name:8s} wall median {statistics.median(w):6.1f} ms  min {min(w):6.1f}"
                f"  p10 {_quantile(w, 0.1):6.1f}  p25 {_quantile(w, 0.25):6.1f}"
                f"  CPU median {statistics.median(c):6.1f} ms  min {min(c):6.1f}"
                f"  p10 {_quantile(c, 0.1):6.1f}"
                f"  RSS {statistics.median(rss[name]) / 1024:.1f} MB"
            )
        if "softhsm" in walls:
            s = statistics.median(walls["softhsm"])
            for name in ("this", "base"):
                print(f"  {name} / softhsm: {statistics.median(walls[name]) / s:.2f}x")
        for label, series in (("wall", walls), ("CPU", cpus)):
            diffs = [a - b for a, b in zip(series["this"], series["base"], strict=True)]
            low, high = _median_ci(diffs)
            print(
                f"  this - base, {label}: paired median {statistics.median(diffs):+.2f} ms"
                f" (95 % CI {low:+.2f} .. {high:+.2f})"
            )
        for _ in range(args.callgrind and 1):
            for name, module, e in subjects:
                counts = [
                    _callgrind([tool, "--module", module, "-L"], e) for _ in range(args.callgrind)
                ]
                print(f"  {name:8s} instructions {statistics.median(counts) / 1e6:.1f} M")
        if args.hold:
            print("holding; the module's environment:", flush=True)
            for k, v in lab.module_env().items():
                print(f"  export {k}={v}", flush=True)
            # Ctrl-C or SIGTERM (a background job ignores SIGINT) ends it through the with
            # blocks, which stop the service and remove its folder.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


if __name__ == "__main__":
    main()
