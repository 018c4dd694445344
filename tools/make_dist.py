"""`make dist`: the client tarball dist/pkcs11ws-client-<version>-linux-<arch>.tar.gz.

Extracted at / (`tar -xzf FILE -C /`, user guide 2.1) it installs /opt/nfast/webservices/pkcs11/:
lib/libpkcs11webservices.so, bin/ (the five utilities), conf/example_pkcs11webservices.cfg, log/
and runtime/, a venv on Debian's /usr/bin/python3.11 holding pkcs11ws and the wheels it needs
(pycurl built here from source against the system libcurl). The application server needs only
Debian's python3.11, libpython3.11 and libcurl4: no compiler, no PyPI, no checkout. The tarball
holds no conf/pkcs11webservices.cfg, so extracting it again keeps the one in place.

Steps: the sdist of this tree (python -m build --sdist), a build venv on --python (Debian's
interpreter by default), the wheel built from the sdist by that interpreter (pip wheel), then
`PIP_NO_BINARY=pycurl pip install WHEEL` into the venv (the README's install line), then that
venv's `python -m pkcs11ws install --root STAGE --prefix /opt/nfast/webservices/pkcs11`, then tar.
Work files go to build/dist/ (removed and remade on each run). --wheel-out keeps a copy of the
wheel (the packaging tests check and install that one: the Cython core is compiled once).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/nfast/webservices/pkcs11"
DEFAULT_PYTHON = "/usr/bin/python3.11"


def version() -> str:
    text = (ROOT / "pkcs11ws" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not m:
        raise SystemExit("make dist: no __version__ in pkcs11ws/__init__.py")
    return m.group(1)


def tarball_name(ver: str) -> str:
    return f"pkcs11ws-client-{ver}-linux-{platform.machine()}.tar.gz"


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def build(python: str, out_dir: Path, sdist: Path | None, wheel_out: Path | None = None) -> Path:
    ver = version()
    work = ROOT / "build" / "dist"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if sdist is None:
        run([sys.executable, "-m", "build", "--sdist", "--outdir", str(work / "sdist"), str(ROOT)])
        sdist = work / "sdist" / f"pkcs11ws-{ver}.tar.gz"
    if not os.access(python, os.X_OK):
        raise SystemExit(
            f"make dist: {python} is missing (Debian: apt-get install python3.11 "
            "python3.11-dev python3.11-venv)"
        )
    venv = work / "venv"
    run([python, "-m", "venv", str(venv)])
    env = {**os.environ, "PIP_NO_BINARY": "pycurl"}
    env.pop("PYTHONPATH", None)
    pip = str(venv / "bin" / "pip")
    run([pip, "wheel", "-q", "--no-deps", "--wheel-dir", str(work / "wheel"), str(sdist)], env=env)
    (wheel,) = (work / "wheel").glob("pkcs11ws-*.whl")
    run([pip, "install", "-q", str(wheel)], env=env)
    if wheel_out is not None:
        wheel_out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, wheel_out / wheel.name)
    stage = work / "root"
    run(
        [
            str(venv / "bin" / "python"),
            "-I",
            "-m",
            "pkcs11ws",
            "install",
            "--root",
            str(stage),
            "--prefix",
            PREFIX,
        ],
        env=env,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / tarball_name(ver)
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        # Members are opt/nfast/..., so `tar -xzf FILE -C /` installs them at PREFIX.
        tar.add(
            stage / PREFIX.strip("/").split("/")[0],
            arcname=PREFIX.strip("/").split("/")[0],
            filter=_owned_by_root,
        )
    tmp.replace(target)
    print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make dist", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        help=f"the runtime's interpreter, as on the servers (default {DEFAULT_PYTHON})",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (dist/)")
    ap.add_argument("--sdist", type=Path, help="build from this sdist instead of making one")
    ap.add_argument("--wheel-out", type=Path, help="also copy the wheel built to this folder")
    args = ap.parse_args(argv)
    build(args.python, args.out, args.sdist, args.wheel_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
