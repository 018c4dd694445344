"""Where the time goes: py-spy on the key service and on a C host running our module, while
p11bench signs with N threads. Not part of `make bench` (py-spy needs ptrace).

Run: python -m bench.profile [--threads 8] [--seconds 8] [--out DIR]
Prints the functions with the most samples (self, and inclusive for a few chosen frames) for
both processes and writes the raw collapsed stacks (py-spy --format raw) into DIR.

A sample with no Python frame is shown as NO_FRAME: the thread ran C or Cython code that was
called from C, as the module's core fast path and group commit are (pkcs11ws/_native); py-spy
sees only Python frames, so the C host's 1-thread calls are mostly that. On a stripped
interpreter (Debian's /usr/bin/python3.11) py-spy still works (it finds the interpreter's
exported _PyRuntime), and perf's shares by shared object are unchanged; perf cannot name the
functions inside python3.11 or libpython3.11.so there (no symbol table; install the
interpreter's debug symbols, or use a build with them, for `perf report --sort sym`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.build import BENCH_DIR, build_all
from bench.lab import Lab
from bench.procs import default_placement, pinned, stop_pid
from bench.services import TOKEN_LABEL

# Inclusive shares worth knowing (matched as substrings of "function (file)" frames).
MARKERS = (
    "perform",
    "sign (pkcs11ws/client/api.py",
    "call (pkcs11ws/client/api.py",
    "_http (pkcs11ws/server/app.py",
    "authenticate (pkcs11ws/server/handlers.py",
    "open_token",
    "session_valid",
    "object_get",
    "decrypt_value",
    "_decode",
    "access",
    "emit",
)


NO_FRAME = "(no Python frame: C or Cython code)"


def summarize(raw: Path, top: int = 15) -> str:
    """Self (leaf) and inclusive sample counts from py-spy's collapsed stacks."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";") if stack else [NO_FRAME]
        total += count
        leaf[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return f"{raw.name}: no samples\n"
    out = [f"{raw.name}: {total} samples", "  self:"]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in leaf.most_common(top)]
    out.append("  inclusive (chosen frames):")
    for m in MARKERS:
        c = max((v for f, v in incl.items() if m in f), default=0)
        if c:
            out.append(f"    {100 * c / total:5.1f}%  {m}")
    return "\n".join(out) + "\n"


def perf_dsos(data: Path, top: int = 12) -> str:
    """Share of CPU samples per shared object (interpreter, OpenSSL, kernel, ...) from perf."""
    r = subprocess.run(
        ["perf", "report", "--stdio", "--sort", "dso", "-i", str(data)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return f"{data.name}: perf report failed (exit {r.returncode}): {r.stderr[-300:]}\n"
    rows = [ln.strip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return (
        f"{data.name} (perf, CPU samples by shared object):\n"
        + "\n".join(f"    {row}" for row in rows[:top])
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "raw" / "profile")
    a = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(pyspy, os.X_OK):
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pkcs11ws-prof-")))
        lab = Lab(work, default_placement(), stack)
        lab.bins = build_all()
        lab.start_service_only(print)
        assert lab.service is not None
        cmd = [
            str(lab.bins["p11bench"]),
            "--module",
            lab.module,
            "--token",
            TOKEN_LABEL,
            "--op",
            "sign64",
            "--threads",
            str(a.threads),
            "--seconds",
            str(a.seconds),
            "--warmup",
            "1",
        ]
        host = subprocess.Popen(
            pinned(cmd, lab.placement.client),
            stdout=subprocess.PIPE,
            env={**os.environ, **lab.module_env()},
        )
        try:
            time.sleep(1.5)  # past boot, login and warm-up
            dur = str(max(1, int(a.seconds - 1)))
            spies = [
                (
                    f"py-spy on the {name}",
                    subprocess.Popen(
                        [
                            pyspy,
                            "record",
                            "--pid",
                            str(pid),
                            "--duration",
                            dur,
                            "--rate",
                            str(a.rate),
                            "--format",
                            "raw",
                            "--nonblocking",
                            "-o",
                            str(a.out / f"{name}.txt"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    ),
                )
                for name, pid in (("server", lab.service.pid), ("client", host.pid))
            ]
            perf = shutil.which("perf")
            if perf:
                spies += [
                    (
                        f"perf on the {name}",
                        subprocess.Popen(
                            [
                                perf,
                                "record",
                                "-e",
                                "cpu-clock",
                                "-F",
                                "999",
                                "-p",
                                str(pid),
                                "-o",
                                str(a.out / f"{name}.perf"),
                                "--",
                                "sleep",
                                dur,
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                        ),
                    )
                    for name, pid in (("server", lab.service.pid), ("client", host.pid))
                ]
            for what, spy in spies:
                _, err = spy.communicate(timeout=a.seconds + 60)
                if spy.returncode != 0:
                    print(
                        f"bench.profile: {what} failed (exit {spy.returncode}): "
                        f"{err.decode(errors='replace')[-300:]}",
                        file=sys.stderr,
                    )
            out, _ = host.communicate(timeout=120)
            lines = out.decode(errors="replace").splitlines()
            if host.returncode != 0 or not lines:
                print(f"bench.profile: p11bench failed (exit {host.returncode})", file=sys.stderr)
                return 1
            print(lines[-1])
        finally:
            stop_pid(host)
        for name in ("server", "client"):
            raw = a.out / f"{name}.txt"
            if raw.exists():
                print(summarize(raw))
            if (a.out / f"{name}.perf").exists():
                print(perf_dsos(a.out / f"{name}.perf"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
