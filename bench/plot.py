"""bench/results/latest.png: one panel per comparison a target makes (so the lines a target
compares are not drawn over the others), each median with the spread of its repetitions
(min-max bands or error bars), plus the load-robust CPU per op, latency and the group commit's
batch sizes.

Panels: (1) issue 15's HMAC target: the module with and without group commit against SoftHSM2
behind p11-kit; (2) the module against our own raw transport and the minimal ASGI floor;
(3) hosts on the same module (C, python-pkcs11, our client without PKCS#11); (4) issue 14:
RSA-2048, ECDSA P-256, AES-GCM for the three modules; (5) client + server CPU per op at the
highest thread count; (6) calls per request (mean batch size) against threads; (7) latency p50
and p99; (8) the batch size distribution of the Python hosts at the highest thread count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import Agg, Key, aggregate

# One look per variant, the same in every panel.
STYLE: dict[str, dict[str, Any]] = {
    "module-c": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "module-c-single": {"color": "tab:cyan", "marker": "s", "linestyle": "--"},
    "python-pkcs11": {"color": "tab:purple", "marker": "v", "linestyle": "-"},
    "pyclient": {"color": "tab:pink", "marker": "^", "linestyle": "-."},
    "pycurl": {"color": "tab:olive", "marker": "D", "linestyle": ":"},
    "libcurl-c": {"color": "tab:green", "marker": "P", "linestyle": "-"},
    "floor-libcurl": {"color": "tab:gray", "marker": "X", "linestyle": "--"},
    "softhsm": {"color": "tab:brown", "marker": "*", "linestyle": ":"},
    "p11kit-softhsm": {"color": "tab:red", "marker": "h", "linestyle": "-"},
}
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("issue 15 target: module / p11-kit remoting >= 1.0x",
     ("module-c", "module-c-single", "p11kit-softhsm")),
    ("module / our raw transport (libcurl-c) >= 0.9x; service / ASGI floor >= 0.7x",
     ("module-c", "module-c-single", "libcurl-c", "pycurl", "floor-libcurl")),
    ("hosts on the same module: python-pkcs11 / C host >= 0.85x",
     ("module-c", "python-pkcs11", "pyclient")),
)  # fmt: skip
ASYM_LABEL = {"rsasign": "RSA-2048 sign", "ecsign": "ECDSA P-256 sign", "gcm4k": "AES-GCM 4 KiB"}


def _style(v: str) -> dict[str, Any]:
    return STYLE.get(v.split("@")[0], {"marker": "o"})


def _throughput(ax: Any, agg: dict[Key, Agg], title: str, variants: tuple[str, ...]) -> None:
    threads = sorted({k[3] for k in agg if k[0] == "sweep"})
    for v in variants:
        pts = sorted((k[3], a) for k, a in agg.items() if k[:3] == ("sweep", v, "sign64"))
        if not pts:
            continue
        xs = [t for t, _ in pts]
        st = _style(v)
        ax.plot(xs, [a.med["ops_per_s"] for _, a in pts], label=v, **st)
        ax.fill_between(xs, [a.ops_range[0] for _, a in pts], [a.ops_range[1] for _, a in pts],
                        color=st.get("color"), alpha=0.15, linewidth=0)  # fmt: skip
    ax.set_xlabel("client threads")
    ax.set_ylabel("ops/s, HMAC-SHA256 sign of 64 B")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads, [str(t) for t in threads])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="median; band: min-max of reps", title_fontsize=7)
    ax.set_title(title, fontsize=10)


def _asym(ax: Any, agg: dict[Key, Agg]) -> None:
    keys = sorted({(k[2], k[3]) for k in agg if k[0] == "asym"},
                  key=lambda ot: (list(ASYM_LABEL).index(ot[0]) if ot[0] in ASYM_LABEL else 9,
                                  ot[1]))  # fmt: skip
    variants = ("module-c", "softhsm", "p11kit-softhsm")
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for j, (op, t) in enumerate(keys):
            a = agg.get(("asym", v, op, t))
            if a is None:
                continue
            med = a.med["ops_per_s"]
            xs.append(j + (i - 1) * width)
            ys.append(med)
            lo.append(med - a.ops_range[0])
            hi.append(a.ops_range[1] - med)
        if xs:
            st = _style(v)
            ax.bar(xs, ys, width=width, color=st.get("color"), label=v, alpha=0.8,
                   yerr=[lo, hi], capsize=3, ecolor="black")  # fmt: skip
    ax.set_xticks(range(len(keys)),
                  [f"{ASYM_LABEL.get(op, op)}\nx{t}" for op, t in keys], fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("ops/s")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, title="median; bar: min-max of reps", title_fontsize=7)
    ax.set_title("issue 14: module / p11-kit >= 0.8x for RSA-2048 and ECDSA P-256 at 8 threads "
                 "(p11-kit 0.24 cannot carry GCM)", fontsize=10)  # fmt: skip


def _cpu(ax: Any, agg: dict[Key, Agg]) -> None:
    hi = max((k[3] for k in agg if k[0] == "sweep"), default=8)
    ahi = max((k[3] for k in agg if k[0] == "asym"), default=8)
    sweep = [k for k in agg if k[0] == "sweep" and k[3] == hi]
    asym = [k for k in agg if k[0] == "asym" and k[3] == ahi and k[1] != "softhsm"]
    order = list(STYLE)
    keys = sorted(sweep, key=lambda k: order.index(k[1]) if k[1] in order else 99)
    keys += sorted(asym, key=lambda k: (k[2], order.index(k[1]) if k[1] in order else 99))
    labels = [f"{k[1]} {k[2]} x{k[3]}" for k in keys]
    cli = [agg[k].med.get("cpu_us_per_op", 0.0) for k in keys]
    srv = [agg[k].med.get("server_cpu_us_per_op", 0.0) for k in keys]
    y = list(range(len(keys)))
    ax.barh(y, cli, color="tab:blue", label="client CPU us/op (getrusage)")
    ax.barh(y, srv, left=cli, color="tab:orange", label="server CPU us/op (/proc, whole tree)")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("CPU us per op (median of reps; load-robust; linear, so the stack adds up)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("CPU per operation: client + server", fontsize=10)


def _batches(ax: Any, agg: dict[Key, Agg]) -> None:
    threads = sorted({k[3] for k in agg if k[0] == "sweep"})
    for v in ("module-c", "python-pkcs11", "pyclient", "module-c-single", "libcurl-c"):
        pts = []
        for t in threads:
            a = agg.get(("sweep", v, "sign64", t))
            cpr = a.calls_per_request() if a else None
            if cpr:
                pts.append((t, cpr))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, **_style(v))
    ahi = max((k[3] for k in agg if k[0] == "asym"), default=8)
    for k, a in agg.items():
        cpr = a.calls_per_request()
        # At the highest thread count only (at 1 thread every op sends 1 call per request).
        if k[0] == "asym" and k[1] == "module-c" and k[3] == ahi and cpr:
            ax.annotate(f"{ASYM_LABEL.get(k[2], k[2])}: {cpr:.2f}", (k[3], cpr), fontsize=7,
                        xytext=(4, 0), textcoords="offset points")  # fmt: skip
            ax.plot([k[3]], [cpr], "k.")
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads, [str(t) for t in threads])
    ax.set_xlabel("client threads")
    ax.set_ylabel("signatures per request (key service access log)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("group commit: mean batch size (sign64; dots: issue 14 ops)", fontsize=10)


def _latency(ax: Any, agg: dict[Key, Agg]) -> None:
    threads = sorted({k[3] for k in agg if k[0] == "sweep"})
    show = list(dict.fromkeys((threads[0], threads[-1]))) if threads else []
    labels, p50, p99, err = [], [], [], []
    for v in STYLE:
        for t in show:
            a = agg.get(("sweep", v, "sign64", t))
            if a:
                labels.append(f"{v} x{t}")
                p50.append(a.med["p50_us"])
                p99.append(a.med["p99_us"])
                err.append((a.med["p50_us"] - a.p50_range[0], a.p50_range[1] - a.med["p50_us"]))
    y = list(range(len(labels)))
    ax.barh([i + 0.2 for i in y], p99, height=0.4, label="p99", color="tab:orange")
    ax.barh([i - 0.2 for i in y], p50, height=0.4, label="p50 (bar: min-max of reps)",
            color="tab:blue", xerr=[[e[0] for e in err], [e[1] for e in err]],
            capsize=2)  # fmt: skip
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency per op (us), HMAC-SHA256 sign of 64 B")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency percentiles", fontsize=10)


def _distribution(ax: Any, agg: dict[Key, Agg]) -> None:
    hi = max((k[3] for k in agg if k[0] == "sweep"), default=8)
    drawn = 0
    for i, v in enumerate(("python-pkcs11", "pyclient")):
        a = agg.get(("sweep", v, "sign64", hi))
        if a is None or not a.batch_sizes:
            continue
        total = sum(a.batch_sizes.values())
        xs = sorted(a.batch_sizes)
        ax.bar([x + (i - 0.5) * 0.4 for x in xs], [a.batch_sizes[x] / total for x in xs],
               width=0.4, label=v, color=_style(v).get("color"))  # fmt: skip
        drawn += 1
    ax.set_xlabel("calls carried by one request")
    ax.set_ylabel("share of requests")
    ax.grid(True, axis="y", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    ax.set_title(f"batch size distribution at {hi} threads (Python hosts read the module's "
                 "counters; the C host: mean only, panel 6)", fontsize=10)  # fmt: skip


def plot(run: dict[str, Any], mach: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(run["results"])
    fig, axes = plt.subplots(4, 2, figsize=(17, 22))
    for ax, (title, variants) in zip(axes.flat[:3], PANELS, strict=True):
        _throughput(ax, agg, title, variants)
    _asym(axes[1, 1], agg)
    _cpu(axes[2, 0], agg)
    _batches(axes[2, 1], agg)
    _latency(axes[3, 0], agg)
    _distribution(axes[3, 1], agg)
    fig.suptitle(
        f"pkcs11ws benchmarks - {mach['date']} - commit {mach['commit']} - "
        f"nproc {mach['nproc']} {mach['cpu']} - clients and servers pinned to one CPU each",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
