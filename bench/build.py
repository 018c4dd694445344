"""Compiles the C benchmark hosts (p11bench, curlbench) with the system cc into a build folder.

A binary is rebuilt only when its source, the flags or the included project headers changed
(a hash of all of them is kept next to the binary).
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
INCLUDE = ROOT / "include"
DEFAULT_BUILD_DIR = BENCH_DIR / "results" / "raw" / "build"
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-pthread"]


class BuildError(RuntimeError):
    """The compiler or a required library is missing, or the compile failed."""


def _cc() -> str:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("no C compiler (cc) found: install build-essential (make setup does)")


def _curl_flags() -> tuple[list[str], list[str]]:
    pkg = shutil.which("pkg-config")
    if pkg:
        cflags = subprocess.run([pkg, "--cflags", "libcurl"], capture_output=True, text=True)
        libs = subprocess.run([pkg, "--libs", "libcurl"], capture_output=True, text=True)
        if cflags.returncode == 0 and libs.returncode == 0:
            return shlex.split(cflags.stdout), shlex.split(libs.stdout)
    return [], ["-lcurl"]


def _compile(
    src: Path, out: Path, extra_cflags: list[str], libs: list[str], deps: list[Path]
) -> Path:
    cmd = [_cc(), *CFLAGS, *extra_cflags, "-o", str(out), str(src), *libs]
    h = hashlib.sha256(" ".join(cmd).encode())
    for p in (src, *deps):
        h.update(p.read_bytes())
    stamp = out.with_suffix(".hash")
    digest = h.hexdigest()
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"compiling {src.name} failed:\n{r.stderr.strip()}")
    stamp.write_text(digest)
    return out


COMMON_H = BENCH_DIR / "benchcommon.h"  # shared by both hosts


def build_p11bench(build_dir: Path = DEFAULT_BUILD_DIR) -> Path:
    deps = [*sorted(INCLUDE.glob("*.h")), COMMON_H]
    if not (INCLUDE / "pkcs11ws_ck.h").exists():
        raise BuildError(f"{INCLUDE / 'pkcs11ws_ck.h'} is missing")
    return _compile(
        BENCH_DIR / "p11bench.c",
        build_dir / "p11bench",
        ["-I", str(INCLUDE), "-I", str(BENCH_DIR)],
        ["-ldl"],
        deps,
    )


def build_curlbench(build_dir: Path = DEFAULT_BUILD_DIR) -> Path:
    cflags, libs = _curl_flags()
    return _compile(
        BENCH_DIR / "curlbench.c",
        build_dir / "curlbench",
        [*cflags, "-I", str(BENCH_DIR)],
        libs,
        [COMMON_H],
    )


def build_all(build_dir: Path = DEFAULT_BUILD_DIR) -> dict[str, Path]:
    return {"p11bench": build_p11bench(build_dir), "curlbench": build_curlbench(build_dir)}


if __name__ == "__main__":
    for name, path in build_all().items():
        print(f"{name}: {path}")
