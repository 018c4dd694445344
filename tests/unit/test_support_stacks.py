"""tests/support/stacks.py: a child that hangs fails the test with its stacks, its output so far
and the log tails asked for; a child that ends is subprocess.run's result."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.stacks import run_or_dump

# -S: no site, so the child reaches the hang well inside the timeout on a loaded machine.
HANG = (
    "import time\n"
    "def hang_here():\n"
    "    time.sleep(600)\n"
    "print('started', flush=True)\n"
    "hang_here()\n"
)


def test_hung_child_fails_with_its_stacks(tmp_path: Path) -> None:
    log = tmp_path / "some.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    with pytest.raises(pytest.fail.Exception) as failed:
        run_or_dump([sys.executable, "-S", "-c", HANG], timeout=5, logs=[log])
    report = str(failed.value)
    assert "did not finish in 5 s" in report
    assert "--- its stdout\nstarted\n" in report
    assert "hang_here" in report  # py-spy's Python frame (py-spy is a dev dependency)
    if shutil.which("gdb"):
        assert "clock_nanosleep" in report  # gdb's C frame under time.sleep
    assert "line 99\n" in report and "line 39\n" not in report  # the last 60 lines only


def test_finished_child_is_returned() -> None:
    r = run_or_dump(
        [sys.executable, "-S", "-c", "import sys; print('out'); sys.exit(3)"], timeout=60
    )
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "")
