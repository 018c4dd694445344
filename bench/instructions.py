"""Client instructions per operation: p11bench (C host -> libpkcs11ws.so -> key service) run
under valgrind's callgrind for N1 and N2 operations; (Ir(N2) - Ir(N1)) / (N2 - N1).

CPU time per op (getrusage, what `make bench` reports) is skewed on a loaded machine; executed
instructions are not, so a hot-path change can be compared before and after even there. Not
part of `make bench` (valgrind is slow: about 20 s per run).

Run: python -m bench.instructions [--op sign64] [--n1 50] [--n2 250] [--runs 3] [--threads 1]
         [--curl] (libcurl-c: curlbench, its token as a header)
         [--keep DIR] (the callgrind files, for callgrind_annotate or a per-function diff)
Prints each run's Ir per op and their median. Runs with an outlier (a reconnection, a slot
refresh) show up as one value far from the others: take the median.
The totals do not need any symbol. In a kept file, Debian's libpython3.11.so (stripped) names
only its exported functions (_PyEval_EvalFrameDefault, PyDict_SetItem, ...): its static ones
are bare offsets (0x...), the same offsets for the same library, so two kept runs still diff.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.lab import Lab
from bench.procs import default_placement
from bench.services import TOKEN_LABEL


def instructions(
    lab: Lab,
    op: str,
    n: int,
    out: Path,
    threads: int = 1,
    extra: dict[str, str] | None = None,
    curl: bool = False,
) -> int:
    """Ir of one p11bench process doing n operations (extra: more environment, e.g. a client
    setting PKCS11WS_BATCHINFLIGHT=0; curl: of curlbench sending the module's sign request
    from C instead, the bench's libcurl-c row)."""
    assert lab.service is not None
    window = ["--threads", str(threads), "--seconds", "1", "--warmup", "0", "--count", str(n)]
    if curl:
        assert lab.ksd is not None and lab.body_file is not None
        url = f"https://127.0.0.1:{lab.service.port}/crypto/v1/sign"
        env = {**os.environ, "BENCH_TOKEN": lab.token}
        gen = [*lab.ksd.curlbench(lab.bins["curlbench"], url, lab.body_file), *window]
    else:
        env = {**os.environ, **lab.module_env(lab.service.port), **(extra or {})}
        gen = [str(lab.bins["p11bench"]), "--module", lab.module, "--token", TOKEN_LABEL]
        gen += ["--op", op, *window]
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *gen]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"{gen[0]} under callgrind failed: {r.stderr[-2000:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="sign64")
    ap.add_argument("--n1", type=int, default=50)
    ap.add_argument("--n2", type=int, default=250)
    ap.add_argument("--runs", type=int, default=3)
    # Several threads: valgrind runs one at a time, so how calls meet in group commit differs
    # from a real run; the figure is the client's instructions per operation for that mix.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curl", action="store_true", help="curlbench (libcurl-c), not p11bench")
    ap.add_argument("--keep", type=Path, help="DIR: keep the callgrind files (callgrind_annotate)")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pkcs11ws-ir-")))
        lab = Lab(work, default_placement(), stack)
        lab.start_service_only(lambda m: print(m, file=sys.stderr))
        per_op = []
        for i in range(args.runs):
            a = instructions(
                lab, args.op, args.n1, work / f"cg.{i}.a", args.threads, None, args.curl
            )
            b = instructions(
                lab, args.op, args.n2, work / f"cg.{i}.b", args.threads, None, args.curl
            )
            per_op.append((b - a) / (args.n2 - args.n1))
            print(f"run {i + 1}: {per_op[-1]:,.0f} Ir per {args.op}", flush=True)
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for part in ("a", "b"):
                    shutil.copy(work / f"cg.{i}.{part}", args.keep / f"cg.{i}.{part}")
        print(f"median: {statistics.median(per_op):,.0f} Ir per {args.op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
