"""The by-hand bench tools (bench/request_ir.py, bench/service_ir.py, bench/profile.py) fail
with a reason on stderr rather than silently. Nothing here runs valgrind or times anything:
the measured runs are for the tools themselves, on a quiet box.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_request_ir_outside_callgrind_says_no_marker_was_seen(tmp_path):
    # The measured part alone (what `python -m bench.request_ir` runs under callgrind): it
    # builds the in-process app, runs the case, then finds no dump and must say why, naming
    # the marker functions, instead of ending with rc 1 and no word (round 8's failure).
    r = _tool("bench.request_ir", "--inner", str(tmp_path), "-n", "2", "--cases", "floor")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "case floor (the dump before it): callgrind wrote no dump" in r.stderr, r.stderr
    assert "--zero-before=getppid --dump-before=getgid" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_request_ir_and_service_ir_refuse_an_unknown_case_before_starting():
    from bench import request_ir

    r = _tool("bench.request_ir", "--cases", "hmac,nope")
    assert r.returncode == 2
    assert "unknown cases ['nope']" in r.stderr and ", ".join(request_ir.CASES) in r.stderr
    r = _tool("bench.service_ir", "--cases", "floor,nope")
    assert r.returncode == 2
    assert "unknown cases ['nope']" in r.stderr and "hmac-m" in r.stderr


def test_profile_names_the_samples_without_a_python_frame(tmp_path):
    # py-spy's raw format writes a sample taken in C or Cython code called from C (the core's
    # fast path) as an empty stack: it is counted under a name, not as an empty line.
    from bench import profile

    raw = tmp_path / "client.txt"
    raw.write_text("main (a.py:1);sign (pkcs11ws/client/api.py:9) 3\n 5\n")
    text = profile.summarize(raw)
    assert "client.txt: 8 samples" in text
    assert f" 62.5%  {profile.NO_FRAME}" in text
    assert " 37.5%  sign (pkcs11ws/client/api.py:9)" in text
