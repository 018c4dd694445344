"""`python -m bench` (`make bench`): run the benchmarks, write bench/results/latest.md and
bench/results/latest.png, and keep every raw result line in bench/results/raw/.

Options: --quick (or BENCH_QUICK=1) for a run of about a minute; --out DIR for another results
folder; --report-only FILE to redo the report from a saved raw JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import plan, plot, report
from bench.build import BENCH_DIR

RESULTS = BENCH_DIR / "results"
README = BENCH_DIR.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(md: str, readme: Path = README) -> bool:
    """Put the run's header and target table between the README's bench markers (the rest of
    the tables stay in bench/results/latest.md), so the README always shows the latest run."""
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return False
    head = md.split("\n## ", 2)
    summary = "\n## ".join(head[:2]).split("\n", 1)[1].strip()  # header bullets + targets
    summary = summary.replace("\n## Targets", "\n### Targets (latest run)")
    block = (
        f"{START}\n{summary}\n\nAll tables: [bench/results/latest.md](bench/results/latest.md)."
        f"\n\n![throughput and latency](bench/results/latest.png)\n{END}"
    )
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(before + block + after, encoding="utf-8")
    return True


def write_report(run: dict[str, Any], out: Path) -> tuple[Path, Path]:
    mach = run.setdefault("machine", report.machine())
    md = out / "latest.md"
    png = out / "latest.png"
    md.write_text(report.markdown(run, mach))
    plot.plot(run, mach, png)
    return md, png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=None, help="about a minute")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--report-only", type=Path, help="rewrite the report from a raw JSON file")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        run = json.loads(a.report_only.read_text())
    else:
        run = plan.run_all(plan.settings(a.quick))
        run["machine"] = report.machine()
        raw = a.out / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (raw / f"run-{stamp}.json").write_text(json.dumps(run, indent=1))
    md, png = write_report(run, a.out)
    if (
        a.out == RESULTS
        and not run.get("settings", {}).get("quick")
        and update_readme(md.read_text())
    ):
        print(f"updated the benchmark section of {README}", file=sys.stderr)
    print(md.read_text())
    print(f"wrote {md} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
