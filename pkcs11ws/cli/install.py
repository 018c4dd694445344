"""`python -m pkcs11ws install --prefix DIR`: the WSOP install tree (user guide 2.1), real files.

    DIR/lib/libpkcs11webservices.so   a copy of the module (pkcs11ws/_native/libpkcs11ws.so); it
                                      finds DIR/runtime from its own location (bootstrap.c)
    DIR/bin/ckcheckinst, ckinfo-dynamic, cklist-dynamic, ckmechinfo, softcardtool
                                      sh launchers that run the utility on DIR/runtime, found
                                      from their own location (the tree can be moved)
    DIR/conf/example_pkcs11webservices.cfg   the example configuration, paths moved to DIR
    DIR/log/                          the default log folder
    DIR/runtime/                      a private venv on this interpreter's base Python holding
                                      copies of pkcs11ws and the distributions it requires
                                      (not the [server] extra), byte-compiled

Nothing points back into a source checkout or the environment the command ran from: the tree
needs only the base interpreter (and its libpython) that the runtime venv names. An existing
DIR/conf/pkcs11webservices.cfg is never touched: copy the example to it once, as the guide says.
With --root ROOT the tree is written to ROOT/DIR but made for DIR (what `make dist` packs into
the client tarball, which is then extracted at /).
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

WSOP_PREFIX = "/opt/nfast/webservices/pkcs11"
LIBRARY = "libpkcs11webservices.so"
EXAMPLE = "example_pkcs11webservices.cfg"
CONFIG = "pkcs11webservices.cfg"
RUNTIME = "runtime"
HELP = "lay out the WSOP install tree (lib/, bin/, conf/, log/, runtime/) under --prefix"
# Launcher name -> the module it runs.
TOOLS = {
    "ckcheckinst": "pkcs11ws.cli.ckcheckinst",
    "ckinfo-dynamic": "pkcs11ws.cli.ckinfo",
    "cklist-dynamic": "pkcs11ws.cli.cklist",
    "ckmechinfo": "pkcs11ws.cli.ckmechinfo",
    "softcardtool": "pkcs11ws.cli.softcardtool",
}
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
# What of the pkcs11ws package a runtime needs: sources for Cython and C stay behind.
_PACKAGE_SKIP = re.compile(r".*\.(pyx|pxi|pxd|c|h|html|o)$|^dev-interpreter$")


class InstallError(Exception):
    pass


def package_dir() -> Path:
    import pkcs11ws

    return Path(pkcs11ws.__file__).resolve().parent


def example_source() -> Path:
    """The example configuration: package data in a wheel, conf/ of the source tree otherwise."""
    here = package_dir()
    for path in (here / "_data" / EXAMPLE, here.parent / "conf" / EXAMPLE):
        if path.is_file():
            return path
    raise InstallError(f"{EXAMPLE} is neither in {here / '_data'} nor in {here.parent / 'conf'}")


def launcher(tool: str, module: str) -> str:
    return f"""#!/bin/sh
# {tool}: a pkcs11ws utility, written by `python -m pkcs11ws install`. It runs on the private
# runtime beside this folder (../{RUNTIME}), isolated from PYTHON* variables and the current
# directory, so the install tree can be moved as a whole.
prefix=$(CDPATH= cd -- "$(dirname -- "$(readlink -f -- "$0")")/.." && pwd) || exit 1
if [ -z "${{PKCS11WS_CONFIG:-}}" ]; then
    PKCS11WS_CONFIG=$prefix/conf/{CONFIG}
    PKCS11WS_CONFIG_SOURCE=launcher
    export PKCS11WS_CONFIG PKCS11WS_CONFIG_SOURCE
fi
exec "$prefix/{RUNTIME}/bin/python{PYVER}" -I -m {module} "$@"
"""


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of what dist requires without extras (markers other than `extra` hold here: a
    requirement that is not installed was excluded by its marker or is missing, and is left out
    either way)."""
    names = []
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if m:
            names.append(m.group(1))
    return names


def required_distributions() -> list[metadata.Distribution]:
    """The distributions pkcs11ws needs at run time (transitively), pkcs11ws excluded."""
    seen: dict[str, metadata.Distribution] = {}
    todo = _requirement_names(metadata.distribution("pkcs11ws"))
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        todo += _requirement_names(dist)
    return list(seen.values())


def _copy_distribution(dist: metadata.Distribution, site: Path) -> int:
    """Copy the files of dist that live in its site-packages (not scripts, not bytecode)."""
    n = 0
    for f in dist.files or []:
        src = Path(str(dist.locate_file(f))).resolve()
        if f.parts[0] == ".." or "__pycache__" in f.parts or not src.is_file():
            continue
        dst = site / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        n += 1
    return n


def _copy_package(site: Path) -> None:
    """pkcs11ws itself: copied from where it is imported from (a wheel install or a source
    tree), plus the example configuration as package data."""
    src = package_dir()

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or _PACKAGE_SKIP.match(n)]

    shutil.copytree(src, site / "pkcs11ws", ignore=ignore)
    data = site / "pkcs11ws" / "_data"
    data.mkdir(exist_ok=True)
    if not (data / EXAMPLE).exists():
        shutil.copy2(example_source(), data / EXAMPLE)
    dist = metadata.distribution("pkcs11ws")
    for f in dist.files or []:
        if f.parts[0].endswith(".dist-info") and f.name in ("METADATA", "LICENSE"):
            target = site / f
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(dist.locate_file(f))), target)


def make_runtime(runtime: Path, dest_runtime: Path) -> list[str]:
    """A venv at runtime (to live at dest_runtime) holding pkcs11ws and its requirements."""
    tmp = runtime.with_name(runtime.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    venv.EnvBuilder(symlinks=True, with_pip=False).create(tmp)
    for name in os.listdir(tmp / "bin"):
        if not name.startswith("python"):
            (tmp / "bin" / name).unlink()  # activate scripts: they name the build folder
    cfg = tmp / "pyvenv.cfg"
    lines = cfg.read_text(encoding="utf-8").splitlines()
    cfg.write_text("".join(ln + "\n" for ln in lines if not ln.startswith("command")), "utf-8")
    site = tmp / "lib" / f"python{PYVER}" / "site-packages"
    if not site.is_dir():
        raise InstallError(f"the new venv has no {site}")
    _copy_package(site)
    done = []
    for dist in required_distributions():
        n = _copy_distribution(dist, site)
        done.append(f"{dest_runtime} <- {dist.metadata['Name']} {dist.version} ({n} files)")
    # Bytecode with the paths the files will have once installed.
    ok = compileall.compile_dir(
        str(site), quiet=1, stripdir=str(tmp), prependdir=str(dest_runtime), workers=1
    )
    if not ok:
        raise InstallError(f"byte-compiling {site} failed")
    if runtime.exists():
        old = runtime.with_name(runtime.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        runtime.rename(old)
        tmp.rename(runtime)
        shutil.rmtree(old)
    else:
        tmp.rename(runtime)
    return done


def install(prefix: Path, root: Path | None = None) -> list[str]:
    """Lay out the tree for prefix, written under root (default /); returns what was done."""
    from pkcs11ws.paths import module_path

    prefix = prefix.expanduser().absolute()
    target = prefix if root is None else root.absolute() / prefix.relative_to("/")
    try:
        module = module_path()
    except FileNotFoundError as e:
        raise InstallError(str(e)) from None
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise InstallError(f"{sys.executable} has no shared libpython for the module to load")
    example = example_source()
    from pkcs11ws.errors import InstallationError

    try:  # refuses the PyPI pycurl wheel (pkcs11ws/client/_curl_boot.py): never copy it
        import pkcs11ws.client._curl_boot  # noqa: F401
    except InstallationError as e:
        raise InstallError(e.message) from None
    for sub in ("lib", "bin", "conf", "log"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    done = make_runtime(target / RUNTIME, prefix / RUNTIME)
    lib = target / "lib" / LIBRARY
    tmp = lib.with_name(LIBRARY + ".tmp")
    shutil.copy2(module, tmp)
    tmp.replace(lib)
    done.append(f"{lib} (copy of {module})")
    for tool, mod in TOOLS.items():
        path = target / "bin" / tool
        _write(path, launcher(tool, mod), 0o755)
        done.append(str(path))
    # Settings move to the prefix; comments keep describing the module's built-in defaults.
    lines = example.read_text(encoding="utf-8").splitlines(keepends=True)
    text = "".join(
        ln if ln.lstrip().startswith("#") else ln.replace(WSOP_PREFIX + "/", f"{prefix}/")
        for ln in lines
    )
    conf = target / "conf" / EXAMPLE
    _write(conf, text, 0o644)
    done.append(str(conf))
    done.append(str(target / "log") + "/")
    return done


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--prefix",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"where the tree is used (the WSOP default is {WSOP_PREFIX})",
    )
    ap.add_argument(
        "--root",
        type=Path,
        metavar="ROOT",
        help="write the tree to ROOT/DIR "
        "instead (a staging folder, e.g. for a tarball extracted at /)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        done = install(args.prefix, root=args.root)
    except (InstallError, OSError) as e:
        print(f"pkcs11ws install: {e}", file=sys.stderr)
        return 1
    for line in done:
        print(f"installed {line}")
    prefix = args.prefix.expanduser().absolute()
    cfg = prefix / "conf" / CONFIG
    if args.root is None and not cfg.exists():
        print(
            f"next: copy {cfg.with_name(EXAMPLE)} to {cfg}, edit it, then run "
            f"{prefix / 'bin' / 'ckcheckinst'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pkcs11ws install", description=HELP)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
