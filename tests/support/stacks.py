"""A child process that does not finish in time fails the test with its stacks, not a bare
TimeoutExpired: `run_or_dump` is subprocess.run(capture_output=True, text=True) that, on a
timeout, takes the stacks of every thread of the hung process (py-spy dump --native: Python and C
frames of the threads Python knows; gdb's `thread apply all bt` when gdb is installed: every
thread, also before our module has booted Python) and of the processes named in `also` (the key
service the child was talking to), kills the child and fails with those stacks, its output and
the tails of the `logs` named (the module's log, the service's). A hang seen once in CI then
says where it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

DUMP_TIMEOUT = 60.0  # per tool and process: gdb reading the symbols of a big process is slow
LOG_LINES = 60


def _tool(args: list[str]) -> str:
    try:
        r = subprocess.run(
            args, capture_output=True, text=True, timeout=DUMP_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{args[0]} failed: {e}\n"
    return r.stdout + (f"[{args[0]} exit {r.returncode}] {r.stderr}" if r.returncode else "")


def stacks(pid: int) -> str:
    """The stacks of every thread of `pid`, as text, from each dumper installed."""
    out = []
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if os.path.exists(py_spy):
        out.append(f"--- py-spy dump --native --pid {pid}\n")
        out.append(_tool([py_spy, "dump", "--native", "--pid", str(pid)]))
    gdb = shutil.which("gdb")
    if gdb is not None:
        out.append(f"--- gdb: thread apply all bt, pid {pid}\n")
        bt = _tool(
            [
                gdb,
                "-batch",
                "-nx",
                "-iex",
                "set auto-load off",
                "-p",
                str(pid),
                "-ex",
                "thread apply all bt",
            ]
        )
        # gdb's chatter about symbol files and new threads says nothing about the hang.
        out.append("".join(line + "\n" for line in bt.splitlines() if not line.startswith("[")))
    return "".join(out) or "(neither py-spy nor gdb is installed: no stacks)\n"


def run_or_dump(
    cmd: Sequence[str],
    *,
    timeout: float,
    also: Sequence[tuple[str, int]] = (),
    logs: Sequence[Path] = (),
    **popen: Any,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen); on a
    timeout the test fails with the stacks of the child and of each (name, pid) in `also`, and
    the last lines of each file in `logs`."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
        if hung:  # outside the except clause: the report is the failure, with no traceback chain
            report = [f"{cmd[0]} did not finish in {timeout:g} s: {' '.join(cmd)}\n"]
            report.append(stacks(proc.pid))
            for name, pid in also:
                report.append(f"--- {name} (pid {pid})\n{stacks(pid)}")
            proc.kill()
            out, err = proc.communicate()
            report.append(f"--- its stdout\n{out}\n--- its stderr\n{err}")
            for log in logs:
                lines = log.read_text(errors="replace").splitlines() if log.exists() else []
                report.append(f"--- last lines of {log}\n" + "\n".join(lines[-LOG_LINES:]) + "\n")
            pytest.fail("".join(report), pytrace=False)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
