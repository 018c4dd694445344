"""`make demo`, the README's first command, runs green and is repeatable."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_twice(tmp_path):
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-m", "pkcs11ws.demo"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "FAILED" not in r.stdout
        last = r.stdout.strip().splitlines()[-1]
        assert last.startswith("summary: ") and last.split()[1] == last.split()[3], last
        assert "pkcs11-tool: data object write/read" in r.stdout
