"""Turns a run's results into bench/results/latest.md (tables, the target ratios with met / not
met, the group commit's requests and why the module can outrun our own raw transport), headed
with the date, the machine (nproc, CPU model) and the git commit. The plot is bench/plot.py's.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bench.build import ROOT

Key = tuple[str, str, str, int]  # phase, variant, op, threads
METRICS = ("ops_per_s", "p50_us", "p99_us", "cpu_us_per_op", "server_cpu_us_per_op",
           "other_cpu_pct", "tcp_accepted")  # fmt: skip


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    try:
        import pycurl

        curl = str(pycurl.version)
    except ImportError:
        curl = "?"
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "python": platform.python_version(),
        "curl": curl,
    }


@dataclass
class Agg:
    """Medians over the repetitions of one (phase, variant, op, threads)."""

    n: int
    med: dict[str, float]
    new_conns: int
    connects_window: int
    errors: int
    ops_range: tuple[float, float] = (0.0, 0.0)  # lowest and highest ops/s of the repetitions
    batch_sizes: dict[int, int] | None = None  # requests by calls carried, summed over reps
    p50_range: tuple[float, float] = (0.0, 0.0)
    ops_total: int = 0  # operations in the measured windows, summed over the repetitions
    secs_total: float = 0.0
    requests: dict[str, int] | None = None  # key service requests by endpoint (access log)

    @property
    def crypto_requests(self) -> int:
        return sum((self.requests or {}).values())

    def calls_per_request(self) -> float | None:
        n = self.crypto_requests
        return self.ops_total / n if n else None


def aggregate(results: Iterable[dict[str, Any]]) -> dict[Key, Agg]:
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if "failed" not in r:
            groups[(r["phase"], r["variant"], r["op"], int(r["threads"]))].append(r)
    out = {}
    for k, rs in groups.items():
        med = {m: statistics.median(r[m] for r in rs) for m in METRICS if all(m in r for r in rs)}
        out[k] = Agg(
            len(rs),
            med,
            sum(int(r.get("new_connections", 0)) for r in rs),
            sum(int(r.get("connects_window", 0)) for r in rs),
            sum(int(r.get("errors", 0)) for r in rs),
            (min(r.get("ops_per_s", 0.0) for r in rs), max(r.get("ops_per_s", 0.0) for r in rs)),
            _sum_sizes(rs),
            (min(r.get("p50_us", 0.0) for r in rs), max(r.get("p50_us", 0.0) for r in rs)),
            sum(int(r.get("ops", 0)) for r in rs),
            sum(float(r.get("seconds", 0.0)) for r in rs),
            _sum_requests(rs),
        )
    return out


def _sum_requests(rs: list[dict[str, Any]]) -> dict[str, int] | None:
    if not any(r.get("requests") for r in rs):
        return None
    out: dict[str, int] = defaultdict(int)
    for r in rs:
        for name, k in r.get("requests", {}).items():
            out[name] += int(k)
    return dict(sorted(out.items()))


def _sum_sizes(rs: list[dict[str, Any]]) -> dict[int, int] | None:
    if not any(r.get("batch_sizes") for r in rs):
        return None
    out: dict[int, int] = defaultdict(int)
    for r in rs:
        for n, k in r.get("batch_sizes", {}).items():
            out[int(n)] += int(k)
    return dict(sorted(out.items()))


def size_summary(sizes: dict[int, int]) -> str:
    """A batch size distribution in one cell: requests, calls per request, the histogram."""
    reqs = sum(sizes.values())
    calls = sum(n * k for n, k in sizes.items())
    if not reqs:
        return "-"
    hist = " ".join(f"{n}:{k}" for n, k in sizes.items())
    return f"{reqs:,} requests, {calls / reqs:.2f} calls/request ({hist})"


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _us(x: float | None) -> str:
    """Microseconds with enough digits for sub-microsecond calls."""
    if x is None:
        return "-"
    return _f(x, 3 if abs(x) < 10 else 1)


@dataclass
class Target:
    name: str
    measured: str
    value: float | None
    threshold: str
    ok: bool | None


def sweep_targets(hi: int) -> list[tuple[str, str, str, int, str, str, float]]:
    """The sign64 sweep's targets, one row each: (name, variant, over variant, threads, metric,
    op, limit); a target is the variant's median metric over the other's (issue 15's last)."""
    return [
        ("1-thread C_Sign p50 latency: module (C host) / raw libcurl",
         "module-c", "libcurl-c", 1, "p50_us", "<=", 1.15),
        (f"{hi}-thread C_Sign throughput: module (C host) / raw libcurl",
         "module-c", "libcurl-c", hi, "ops_per_s", ">=", 0.9),
        (f"key service sign, {hi} client threads / minimal ASGI HMAC floor (libcurl C)",
         "libcurl-c", "floor-libcurl", hi, "ops_per_s", ">=", 0.7),
        (f"{hi}-thread throughput: module / p11-kit remoting of SoftHSM2",
         "module-c", "p11kit-softhsm", hi, "ops_per_s", ">=", 0.75),
        ("1-thread p50 latency: module / p11-kit remoting of SoftHSM2",
         "module-c", "p11kit-softhsm", 1, "p50_us", "<=", 1.5),
        (f"issue 15: {hi}-thread throughput: module / p11-kit remoting of SoftHSM2",
         "module-c", "p11kit-softhsm", hi, "ops_per_s", ">=", 1.0),
        ("issue 15: 1-thread p50: module / libcurl from C to the minimal ASGI HMAC app",
         "module-c", "floor-libcurl", 1, "p50_us", "<=", 1.15),
        (f"issue 15: service CPU per signature at {hi} threads: module / minimal app",
         "module-c", "floor-libcurl", hi, "server_cpu_us_per_op", "<=", 1.0),
        ("issue 15: nothing slower at 1 thread: module p50 with / without group commit",
         "module-c", "module-c-single", 1, "p50_us", "<=", 1.0),
    ]  # fmt: skip


def targets(agg: dict[Key, Agg], run: dict[str, Any]) -> list[Target]:
    def m(variant: str, threads: int, metric: str, phase: str = "sweep") -> float | None:
        a = agg.get((phase, variant, "sign64", threads))
        return a.med.get(metric) if a else None

    def ratio(
        name: str,
        a: float | None,
        b: float | None,
        what: str,
        op: str,
        limit: float,
    ) -> Target:
        if a is None or b is None or not b:
            return Target(name, "not measured", None, f"{op} {limit}", None)
        r = a / b
        ok = r <= limit if op == "<=" else r >= limit
        return Target(name, f"{what}: {_f(a)} / {_f(b)}", r, f"{op} {limit}", ok)

    hi = max((k[3] for k in agg if k[0] == "sweep"), default=8)
    unit = {"p50_us": "us", "ops_per_s": "ops/s", "server_cpu_us_per_op": "us"}
    out = [
        ratio(name, m(a, t, metric), m(b, t, metric), unit[metric], op, limit)
        for name, a, b, t, metric, op, limit in sweep_targets(hi)
    ]
    # Issue 14: private-key signatures, and the same ratio from CPU per op (load-robust: client
    # and server each have a CPU, so an op's ceiling is 1e6 / the larger of the two).
    ahi = max((k[3] for k in agg if k[0] == "asym"), default=8)
    for op, what in (("rsasign", "RSA-2048 sign"), ("ecsign", "ECDSA P-256 sign")):
        ours = agg.get(("asym", "module-c", op, ahi))
        kit = agg.get(("asym", "p11kit-softhsm", op, ahi))
        out.append(
            ratio(
                f"issue 14: {ahi}-thread {what}, module / p11-kit SoftHSM2",
                ours.med.get("ops_per_s") if ours else None,
                kit.med.get("ops_per_s") if kit else None,
                "ops/s",
                ">=",
                0.8,
            )
        )
        out.append(
            ratio(
                f"issue 14: {ahi}-thread {what}, the same from CPU per op (1e6 / max(client, "
                "server) us)",
                ceiling(ours) if ours else None,
                ceiling(kit) if kit else None,
                "ops/s ceiling",
                ">=",
                0.8,
            )
        )
    for t in sorted({1, hi}):
        out.append(
            ratio(
                f"{t}-thread throughput: python-pkcs11 host / C host (same module)",
                m("python-pkcs11", t, "ops_per_s"),
                m("module-c", t, "ops_per_s"),
                "ops/s",
                ">=",
                0.85,
            )
        )
    mod = [a for k, a in agg.items() if k[1].startswith("module-c")]
    cur = [a for k, a in agg.items() if k[1].startswith("libcurl-c")]
    if mod:
        n = sum(a.new_conns for a in mod)
        out.append(
            Target(
                "steady state: new TLS connections by the module (server side, all module-c runs)",
                f"{n} in {sum(a.n for a in mod)} runs",
                float(n),
                "== 0",
                n == 0,
            )
        )
    if cur:
        n = sum(a.connects_window for a in cur)
        out.append(
            Target(
                "steady state: CURLINFO_NUM_CONNECTS in curlbench (all libcurl-c runs)",
                f"{n} in {sum(a.n for a in cur)} runs",
                float(n),
                "== 0",
                n == 0,
            )
        )
    st = {s["subject"]: s for s in run.get("startup", [])}
    if "libpkcs11ws" in st and "softhsm" in st:
        a, b = st["libpkcs11ws"], st["softhsm"]
        out.append(
            ratio(
                "start-up pkcs11-tool -L wall: module / SoftHSM2",
                a["wall_ms"],
                b["wall_ms"],
                "ms",
                "<=",
                3.0,
            )
        )
        out.append(
            ratio(
                "start-up pkcs11-tool -L peak RSS: module / SoftHSM2",
                a["rss_kib"],
                b["rss_kib"],
                "KiB",
                "<=",
                2.5,
            )
        )
    cnt = run.get("counter", [])
    c_rows = [c for c in cnt if c["host"].startswith("p11bench")]
    if len(c_rows) == 2:
        plain, nulls = c_rows
        ok = plain["requests"] == nulls["requests"] == plain["signatures"]
        out.append(
            Target(
                "length query costs no request: requests for N x [C_Sign(NULL), "
                "C_Sign] / N x C_Sign",
                f"{nulls['requests']} / {plain['requests']} (N = {plain['signatures']})",
                nulls["requests"] / max(1, plain["requests"]),
                "== 1",
                ok,
            )
        )
    return out


def per_rep_section(run: dict[str, Any]) -> list[str]:
    """Issue 15's sweep targets repetition by repetition: within a repetition the two variants
    ran seconds apart, so a drift of the machine between repetitions shows here as a spread of
    values, and the ratio of medians above can be read against it."""
    hi = max((int(r["threads"]) for r in run["results"] if r["phase"] == "sweep"), default=8)
    val: dict[tuple[str, int, int], dict[str, float]] = defaultdict(dict)
    for r in run["results"]:
        if r["phase"] == "sweep" and r["op"] == "sign64" and "failed" not in r:
            val[(r["variant"], int(r["threads"]), int(r["rep"]))].update(r)
    rows = []
    for name, a, b, t, metric, _, _ in sweep_targets(hi):
        if not name.startswith("issue 15"):
            continue
        reps = sorted({k[2] for k in val if k[1] == t})
        cells = []
        for rep in reps:
            x = val.get((a, t, rep), {}).get(metric)
            y = val.get((b, t, rep), {}).get(metric)
            cells.append(f"{_f(x)} / {_f(y)} = {_f(x / y, 3)}" if x and y else "-")
        rows.append([name.removeprefix("issue 15: "), "; ".join(cells)])
    if not rows:
        return []
    a_a = back_to_back(run, val)
    rows += a_a
    say = (
        " Where the order turns round, one variant runs twice in a row: the A/A rows are those "
        "pairs, the same program and settings seconds apart, so they show how far two runs of "
        "one thing differ here."
        if a_a
        else ""
    )
    return [
        "",
        "Issue 15's targets repetition by repetition (both variants of a pair ran within the same "
        f"repetition; the target is the ratio of the medians above).{say}",
        "",
        *_table(["target", "repetitions 1, 2, ..."], rows),
    ]


def back_to_back(
    run: dict[str, Any], val: dict[tuple[str, int, int], dict[str, Any]]
) -> list[list[str]]:
    """Rows of 1-thread p50 for each variant that ran twice in a row where the sweep's order
    turns round (the last of repetition k is the first of k + 1): later / earlier."""
    order = run.get("variant_order") or []
    if not order:
        return []
    reps = sorted({k[2] for k in val if k[1] == 1})
    pairs: dict[str, list[str]] = defaultdict(list)
    for rep in reps[:-1]:
        name = order[-1] if rep % 2 == 0 else order[0]
        x = val.get((name, 1, rep), {}).get("p50_us")
        y = val.get((name, 1, rep + 1), {}).get("p50_us")
        if x and y:
            pairs[name].append(f"{_f(y)} / {_f(x)} = {_f(y / x, 3)}")
    return [
        [f"A/A: {name} twice in a row, 1-thread p50, later / earlier", "; ".join(cells)]
        for name, cells in pairs.items()
    ]


def ceiling(a: Agg) -> float | None:
    """The ops/s an op's CPU allows when client and server each have a CPU of their own (the
    bench's placement): 1e6 / the larger of client and server CPU us per op. Other processes
    of a shared machine lower the measured ops/s much more than this."""
    c, srv = a.med.get("cpu_us_per_op"), a.med.get("server_cpu_us_per_op", 0.0)
    worst = max(c or 0.0, srv or 0.0)
    return 1e6 / worst if worst > 0 else None


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _rows(agg: dict[Key, Agg], phase: str, order: Callable[[Key], Any]) -> list[list[str]]:
    rows = []
    for k in sorted((k for k in agg if k[0] == phase), key=order):
        a = agg[k]
        med = a.med
        conns = str(a.new_conns) if k[1] not in ("softhsm", "p11kit-softhsm") else "-"
        rows.append(
            [
                k[1],
                k[2],
                str(k[3]),
                _f(med.get("ops_per_s"), 0),
                f"{_f(a.ops_range[0], 0)}-{_f(a.ops_range[1], 0)}",
                _us(med.get("p50_us")),
                _us(med.get("p99_us")),
                _us(med.get("cpu_us_per_op")),
                _us(med.get("server_cpu_us_per_op")),
                conns,
                _f(med.get("other_cpu_pct"), 0),
                str(a.errors),
                str(a.n),
            ]
        )
    return rows


HEAD = [
    "variant",
    "op",
    "threads",
    "ops/s",
    "ops/s min-max",
    "p50 us",
    "p99 us",
    "client CPU us/op",
    "server CPU us/op",
    "new conns",
    "noise CPU %",
    "errors",
    "reps",
]


def markdown(run: dict[str, Any], mach: dict[str, str]) -> str:
    agg = aggregate(run["results"])
    s = run["settings"]
    variant_order = {n: i for i, n in enumerate(run.get("variant_order", []))}
    lines = [
        "# pkcs11ws benchmarks",
        "",
        f"- date: {mach['date']}; git commit: {mach['commit']}",
        f"- machine: nproc {mach['nproc']}, CPU {mach['cpu']}, Linux {mach['kernel']}",
        f"- Python {mach['python']}; {mach['curl']}",
        f"- placement: {run['placement']}",
        f"- {'quick run (BENCH_QUICK=1)' if s['quick'] else 'full run'}: {s['reps']} "
        f"repetition(s) per point ({s.get('sweep_reps') or s['reps']} in the sign64 sweep; "
        "the variants' order turns round every other repetition), "
        f"{s['seconds']} s measured after {s['warmup']} s warm-up "
        f"(other operations {s['other_seconds']} s); medians of the repetitions; "
        f"total {run.get('elapsed_s', 0):.0f} s",
        "- latency percentiles from per-thread log-linear histograms (about 1.6 % buckets) in "
        "the C hosts, exact in the Python hosts; CPU per op from getrusage (client) and "
        "/proc/PID/stat utime+stime of the server's process tree (server); noise CPU %: CPU "
        "used by other processes of the machine during the window, in % of all CPUs "
        "(/proc/stat busy time minus client and server)",
        "",
        "## Targets",
        "",
    ]
    tr = [
        [
            t.name,
            t.measured,
            _f(t.value, 3),
            t.threshold,
            "not measured" if t.ok is None else ("met" if t.ok else "NOT MET"),
        ]
        for t in targets(agg, run)
    ]
    lines += _table(["target", "measured", "ratio", "threshold", "result"], tr)
    lines += per_rep_section(run)

    def vorder(k: Key) -> Any:
        return (k[2], k[3], variant_order.get(k[1], 99), k[1])

    lines += ["", "## HMAC-SHA256 C_Sign of 64 bytes (and its transport floors)", ""]
    lines += [f"- `{n}`: {d}" for n, d in run.get("variant_describe", {}).items()]
    lines += ["", *_table(HEAD, _rows(agg, "sweep", vorder))]
    sized = [(k, a) for k, a in sorted(agg.items(), key=lambda ka: vorder(ka[0]))
             if a.batch_sizes is not None and k[0] == "sweep"]  # fmt: skip
    if sized:
        lines += [
            "",
            "Group commit (Python hosts, where the client's counters are readable): requests "
            "the module sent in the measured windows, by the number of calls each carried "
            "(1: a single request).",
            "",
            *_table(["variant", "threads", "batch sizes"],
                    [[k[1], str(k[3]), size_summary(a.batch_sizes or {})] for k, a in sized]),
        ]  # fmt: skip
    lines += requests_section(agg, vorder)
    lines += transport_section(agg)
    lines += [
        "",
        "## Other operations (our module and its PKCS#11 peers)",
        "",
        "sign4k: HMAC-SHA256 of 4 KiB; verify64: C_Verify of a 64-byte MAC; encrypt4k: "
        "AES-256-CBC C_Encrypt of 4 KiB; decrypt4k: AES-256-CBC-PAD C_Decrypt of 4 KiB; "
        "find: C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal over 100 data objects; "
        "sessinfo: C_GetSessionInfo (the per-call floor without the network); noop: the "
        "harness alone (two clock reads and the loop). Every op includes its *Init call.",
        "",
    ]
    lines += _table(HEAD, _rows(agg, "other", vorder))
    lines += asym_section(agg, vorder)
    if any(k[0] == "churn" for k in agg):
        lines += [
            "",
            "## Thread churn: a new host thread every 100 operations",
            "",
            "`sign64/churn100`: each of the threads ends after 100 C_Sign calls and a new thread "
            "(with a new session) takes its place, as elastic thread pools do; `sign64`: the same "
            "threads for the whole window. new conns: sockets to the service sampled every 0.2 s "
            "(a connection that lives shorter and ends with a reset is missed); accepted: the "
            "kernel's count of TCP connections accepted on the host in the window (exact, but "
            "any other server on the machine adds to it).",
            "",
        ]
        churn_keys = sorted((k for k in agg if k[0] == "churn"), key=lambda k: (k[3], k[2]))
        lines += _table(HEAD, _rows(agg, "churn", lambda k: (k[3], k[2])))
        lines += [""]
        lines += _table(
            ["variant", "op", "threads", "ops/s", "accepted TCP connections (median)"],
            [
                [
                    k[1],
                    k[2],
                    str(k[3]),
                    _f(agg[k].med.get("ops_per_s"), 0),
                    _f(agg[k].med.get("tcp_accepted"), 0),
                ]
                for k in churn_keys
            ],
        )
    lines += ["", "## Key service scaling: 1 and 2 worker processes (nothing pinned)", ""]
    lines += _table(HEAD, _rows(agg, "workers", lambda k: (k[3], k[1])))
    if run.get("startup"):
        lines += ["", "## Start-up: `pkcs11-tool --module M -L`", ""]
        lines += _table(
            ["module", "runs", "median wall ms", "min wall ms", "median peak RSS KiB"],
            [
                [
                    x["subject"],
                    str(x["runs"]),
                    _f(x["wall_ms"]),
                    _f(x["wall_ms_min"]),
                    _f(x["rss_kib"], 0),
                ]
                for x in run["startup"]
            ],
        )
    if run.get("counter"):
        lines += ["", "## Request counter (key service access log lines for /crypto/v1/sign)", ""]
        lines += _table(
            ["host", "calls per signature", "signatures", "requests logged"],
            [
                [c["host"], c["calls"], str(c["signatures"]), str(c["requests"])]
                for c in run["counter"]
            ],
        )
    if run.get("churn_python"):
        lines += ["", "## Thread churn in a Python host (python-pkcs11; 0: fixed threads)", ""]
        lines += _table(
            ["host", "threads", "new thread every N signatures", "ops/s", "p50 us",
             "threads started", "new TLS connections in the window", "errors"],
            [
                [c["host"], str(c["threads"]), str(c["new_thread_every"]), _f(c["ops_per_s"]),
                 _f(c["p50_us"]), _f(c["threads_started"], 0), str(c["module_connects"]),
                 str(c["errors"])]
                for c in run["churn_python"]
            ],
        )  # fmt: skip
    if run.get("store_cpu") or run.get("replicas"):
        from bench import replicas, store_cpu

        lines += ["", "## Stores: SQLite and PostgreSQL, 1 and 2 replicas", ""]
        if run.get("store_cpu"):
            lines += ["Key service CPU per operation, in process (bench/store_cpu.py):", ""]
            lines += [store_cpu.table(run["store_cpu"]), ""]
        if run.get("replicas"):
            lines += ["sign64 through real mutual TLS with curlbench (bench/replicas.py):", ""]
            lines += [replicas.table(run["replicas"])]
    failed = [r for r in run["results"] if "failed" in r]
    notes = list(run.get("notes", []))
    redone = [r for r in run["results"] if r.get("noisy_retries")]
    if redone:
        notes.append(
            f"{len(redone)} point(s) were measured again because other processes of the machine "
            f"used over 10 % of its CPU during them ({sum(r['noisy_retries'] for r in redone)} "
            "extra runs; the noise column shows the run that was kept)"
        )
    notes += [
        f"{r['variant']} {r['op']} x{r['threads']} rep {r['rep'] + 1} failed: "
        f"{r['failed'].splitlines()[-1] if r['failed'] else ''}"
        for r in failed
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


ASYM_OPS = {"rsasign": "RSA-2048 PKCS#1 v1.5 sign (CKM_RSA_PKCS over a SHA-256 DigestInfo)",
            "ecsign": "ECDSA P-256 sign (CKM_ECDSA over a 32-byte hash)",
            "gcm4k": "AES-256-GCM C_Encrypt of 4 KiB (12-byte IV, 128-bit tag)"}  # fmt: skip


def asym_section(agg: dict[Key, Agg], order: Callable[[Key], Any]) -> list[str]:
    """Issue 14's operations: the three modules side by side, and each op's CPU ceiling."""
    keys = sorted((k for k in agg if k[0] == "asym"), key=order)
    if not keys:
        return []
    lines = [
        "",
        "## Issue 14: RSA-2048, ECDSA P-256 and AES-GCM (our module, SoftHSM2, p11-kit)",
        "",
        *[f"- {op}: {what}" for op, what in ASYM_OPS.items()],
        "- same key kinds in every module (generated on the token by C_GenerateKeyPair / "
        "C_GenerateKey); clients on one CPU, servers (key service; p11-kit server with SoftHSM2) "
        "on the other. ceiling: 1e6 / max(client, server CPU us per op), the ops/s this op's CPU "
        "allows with one CPU each (SoftHSM2 in process: its one client CPU) - a load-robust view "
        "of the same comparison, since the machine's other processes cut the measured ops/s.",
        "",
    ]
    rows = _rows(agg, "asym", order)
    for r, k in zip(rows, keys, strict=True):
        r.insert(9, _f(ceiling(agg[k]), 0))
    head = [*HEAD[:9], "ceiling ops/s", *HEAD[9:]]
    lines += _table(head, rows)
    return lines


def requests_section(agg: dict[Key, Agg], order: Callable[[Key], Any]) -> list[str]:
    """Requests the key service logged in the measured windows, for every host (the C host's
    group commit included): calls per request is the mean batch size."""
    keys = sorted((k for k in agg if agg[k].requests and k[0] in ("sweep", "asym")), key=order)
    if not keys:
        return []
    rows = []
    for k in keys:
        a = agg[k]
        secs = a.secs_total or 1.0
        cpr = a.calls_per_request()
        srv = a.med.get("server_cpu_us_per_op")
        rows.append(
            [
                k[1],
                k[2],
                str(k[3]),
                f"{a.ops_total:,}",
                ", ".join(f"{n}: {c:,}" for n, c in (a.requests or {}).items()),
                _f(cpr, 2),
                _f(a.crypto_requests / secs, 0),
                _f(a.ops_total / secs, 0),
                _us(srv * cpr if srv is not None and cpr else None),
            ]
        )
    return [
        "",
        "Requests the key service logged in the measured windows (its access log, every host; "
        "the C host's group commit included): calls per request is the mean batch size, "
        "requests/s and ops/s are over the windows of all repetitions.",
        "",
        *_table(["variant", "op", "threads", "ops", "requests by endpoint", "calls/request",
                 "requests/s", "ops/s", "server CPU us/request"], rows),
        *split_costs(agg),
    ]  # fmt: skip


def split_costs(agg: dict[Key, Agg]) -> list[str]:
    """The service's CPU per request as fixed + per call x calls, from the same module with
    and without group commit at the highest thread count (two points, one line): what larger
    batches could still save, and what only a cheaper per-call path can."""
    hi = max((k[3] for k in agg if k[0] == "sweep"), default=8)
    grp, one = (
        agg.get(("sweep", "module-c", "sign64", hi)),
        agg.get(("sweep", "module-c-single", "sign64", hi)),
    )
    k = grp.calls_per_request() if grp else None
    if not grp or not one or not k or k <= 1.05:
        return []
    s_grp, s_one = grp.med.get("server_cpu_us_per_op"), one.med.get("server_cpu_us_per_op")
    if not s_grp or not s_one:
        return []
    per_call = (s_grp * k - s_one) / (k - 1)
    fixed = s_one - per_call
    return [
        "",
        f"Service CPU per request at {hi} threads, fitted to module-c-single (1 call per "
        f"request, {s_one:,.0f} us) and module-c ({k:.2f} calls per request, {s_grp * k:,.0f} "
        f"us per request): about {fixed:,.0f} us per request plus {per_call:,.0f} us per call "
        "carried (each batch item goes through the whole pipeline: token, authorization, "
        "decoding, the operation, audit). Larger batches can only save the first part; "
        f"however large the batch, a signature costs the service at least about "
        f"{per_call:,.0f} us of CPU.",
    ]


def transport_section(agg: dict[Key, Agg]) -> list[str]:
    """Why the module can exceed our own raw transport (libcurl-c: one signature per request):
    with numbers from this run."""
    out: list[str] = []
    for t in sorted({k[3] for k in agg if k[0] == "sweep"}):
        mod, raw = (
            agg.get(("sweep", "module-c", "sign64", t)),
            agg.get(("sweep", "libcurl-c", "sign64", t)),
        )
        if not mod or not raw or not raw.med.get("ops_per_s"):
            continue
        r = mod.med["ops_per_s"] / raw.med["ops_per_s"]
        if r <= 1.0:
            continue
        m_rps = mod.crypto_requests / (mod.secs_total or 1.0)
        r_rps = raw.crypto_requests / (raw.secs_total or 1.0)
        cpr = mod.calls_per_request()
        m_srv, r_srv = mod.med.get("server_cpu_us_per_op"), raw.med.get("server_cpu_us_per_op")
        text = (
            f"- {t} threads: module-c {_f(mod.med['ops_per_s'], 0)} ops/s against libcurl-c "
            f"{_f(raw.med['ops_per_s'], 0)} ops/s = {r:.2f}x. "
        )
        if cpr:
            text += (
                f"The module sent {m_rps:,.0f} requests/s carrying {cpr:.2f} signatures each on "
                f"average (group commit: `POST /crypto/v1/batch`), libcurl-c "
                f"{r_rps:,.0f} requests/s of one signature each. "
            )
            if m_srv and r_srv:
                text += (
                    f"The service spent {m_srv:,.0f} us of CPU per signature for the module "
                    f"({m_srv * cpr:,.0f} us per request) and {r_srv:,.0f} us per signature "
                    f"(= per request) for libcurl-c: the per-request cost (TLS record, HTTP, "
                    "the pipeline's token and authorization checks, the access log) is shared "
                    "by the calls of a batch. "
                )
            text += (
                f"Per request, the module's transport made {m_rps / r_rps:.2f}x libcurl-c's "
                "rate; the ratio above 1.0 is the batching, not a faster transport."
                if r_rps
                else ""
            )
        else:
            text += "(no access-log counts in this run to split it into requests)"
        out.append(text)
    if not out:
        return []
    return [
        "",
        "### Why the module outruns our own raw transport (libcurl-c) at some thread counts",
        "",
        "libcurl-c sends the module's exact single `POST /crypto/v1/sign` request, one signature "
        "per request, on one connection per thread. The module's group commit (issue 15 item 1) "
        "sends the calls that arrive while a request is in flight together in the next batch "
        "request, so it needs fewer requests per signature:",
        "",
        *out,
    ]
