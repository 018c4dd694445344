"""What the packaging tests (tests/cli/test_packaging_*.py) share: the sdist and wheel of this tree
and the client tarball, each built once per test session (the builds take minutes), and
environments that cannot see this checkout.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 1200  # a loaded 2-core machine compiles the Cython core in a few minutes


@functools.cache
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pkcs11ws-packaging-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@functools.cache
def sdist_and_wheel() -> tuple[Path, Path]:
    """`python -m build`: the sdist, then the wheel built from that sdist."""
    out = workdir() / "build"
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    (sdist,) = out.glob("pkcs11ws-*.tar.gz")
    (wheel,) = out.glob("pkcs11ws-*.whl")
    return sdist, wheel


@functools.cache
def client_tarball() -> Path:
    """`make dist` (tools/make_dist.py) from the session's sdist."""
    sdist, _ = sdist_and_wheel()
    out = workdir() / "dist"
    _run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_dist.py"),
            "--sdist",
            str(sdist),
            "--out",
            str(out),
        ]
    )
    (tarball,) = out.glob("pkcs11ws-client-*-linux-*.tar.gz")
    return tarball


def outside_env(**extra: str) -> dict[str, str]:
    """A minimal environment: PATH=/usr/bin:/bin, no PYTHON* or PKCS11WS_* variables."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(workdir()), "LANG": "C.UTF-8", **extra}
