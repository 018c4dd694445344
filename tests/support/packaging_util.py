"""What the packaging tests (tests/cli/test_packaging_*.py) share: the sdist, the wheel and the
client tarball of this tree, built once per test session by one run of `make dist`
(tools/make_dist.py), which builds the wheel from the sdist, installs it in the tarball's runtime
and keeps a copy: the Cython core is compiled once per session, not once for the wheel and again
for the tarball. Also environments that cannot see this checkout, and one pip wheel cache for
the session (pip_env).
"""

from __future__ import annotations

import atexit
import functools
import os
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


def pip_env() -> dict[str, str]:
    """What every pip of the packaging tests shares: one wheel cache, empty at the session's
    start, read for --no-binary packages too. pycurl is built from source (against the system
    libcurl) by whichever install comes first, which proves that build on a fresh machine once,
    and the others reuse its wheel: the wheel test's fix line, the README's install block and
    `make dist` each compiled pycurl before. pip 23.0 (Debian's python3.11) reads no cached
    wheel for a --no-binary package unless asked with this feature; pip 23.1+ always does and
    takes the name as a no-op."""
    return {
        "PIP_CACHE_DIR": str(workdir() / "pip-cache"),
        "PIP_USE_FEATURE": "no-binary-enable-wheel-cache",
    }


def _run(cmd: list[str]) -> None:
    env = {**os.environ, **pip_env()}
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, env=env
    )
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@functools.cache
def _built() -> tuple[Path, Path, Path]:
    """(sdist, wheel, tarball): `python -m build --sdist`, then `make dist` from that sdist,
    which builds the wheel from it on Debian's python3.11 (its runtime's interpreter) and
    copies it to the session's build folder with --wheel-out."""
    out = workdir() / "build"
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)])
    (sdist,) = out.glob("pkcs11ws-*.tar.gz")
    dist = workdir() / "dist"
    make_dist = str(ROOT / "tools" / "make_dist.py")
    _run(
        [
            sys.executable,
            make_dist,
            "--sdist",
            str(sdist),
            "--out",
            str(dist),
            "--wheel-out",
            str(out),
        ]
    )
    (wheel,) = out.glob("pkcs11ws-*.whl")
    (tarball,) = dist.glob("pkcs11ws-client-*-linux-*.tar.gz")
    return sdist, wheel, tarball


def sdist_and_wheel() -> tuple[Path, Path]:
    """The sdist and the wheel built from that sdist."""
    sdist, wheel, _ = _built()
    return sdist, wheel


def client_tarball() -> Path:
    """`make dist`'s client tarball, from the session's sdist."""
    return _built()[2]


def outside_env(**extra: str) -> dict[str, str]:
    """A minimal environment: PATH=/usr/bin:/bin, no PYTHON* or PKCS11WS_* variables, the
    session's pip cache."""
    home = {"PATH": "/usr/bin:/bin", "HOME": str(workdir()), "LANG": "C.UTF-8"}
    return {**home, **pip_env(), **extra}
