"""`python -m pkcs11ws install --prefix DIR`: the WSOP install layout (user guide 2.1).

    DIR/lib/libpkcs11webservices.so   symlink to the built module (pkcs11ws/_native/libpkcs11ws.so)
    DIR/bin/ckcheckinst, ckinfo-dynamic, cklist-dynamic, ckmechinfo, softcardtool
                                      launchers: exec this Python with the tool's module
    DIR/conf/example_pkcs11webservices.cfg   the example configuration, paths moved to DIR
    DIR/log/                          the default log folder

The library is a symlink because the loader finds the pkcs11ws package from its own resolved
path (dladdr + realpath); a copy outside the package only works for an editable install, where
the build recorded the source tree (--copy makes one anyway). The launchers hold the absolute
path of the interpreter that ran the install (written now, never committed) and default
PKCS11WS_CONFIG to DIR/conf/pkcs11webservices.cfg when it is unset. An existing
DIR/conf/pkcs11webservices.cfg is never touched: copy the example to it once, as the guide says.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

WSOP_PREFIX = "/opt/nfast/webservices/pkcs11"
LIBRARY = "libpkcs11webservices.so"
EXAMPLE = "example_pkcs11webservices.cfg"
CONFIG = "pkcs11webservices.cfg"
HELP = "lay out the WSOP install tree (lib/, bin/, conf/, log/) under --prefix"
# Launcher name -> the module it runs.
TOOLS = {
    "ckcheckinst": "pkcs11ws.tools.ckcheckinst",
    "ckinfo-dynamic": "pkcs11ws.tools.ckinfo",
    "cklist-dynamic": "pkcs11ws.tools.cklist",
    "ckmechinfo": "pkcs11ws.tools.ckmechinfo",
    "softcardtool": "pkcs11ws.tools.softcardtool",
}


class InstallError(Exception):
    pass


def example_source() -> Path:
    """conf/example_pkcs11webservices.cfg of the source tree the package runs from."""
    import pkcs11ws

    path = Path(pkcs11ws.__file__).resolve().parent.parent / "conf" / EXAMPLE
    if not path.is_file():
        raise InstallError(f"{path} not found: run the install from a source checkout "
                           "(pip install -e .)")  # fmt: skip
    return path


def launcher(tool: str, module: str, prefix: Path, python: str) -> str:
    cfg = shlex.quote(str(prefix / "conf" / CONFIG))
    return f"""#!/bin/sh
# {tool}: written by `python -m pkcs11ws install --prefix {prefix}`.
# Runs the pkcs11ws utility with the Python environment it was installed from.
if [ -z "${{PKCS11WS_CONFIG:-}}" ]; then
    PKCS11WS_CONFIG={cfg}
    PKCS11WS_CONFIG_SOURCE=launcher
    export PKCS11WS_CONFIG PKCS11WS_CONFIG_SOURCE
fi
exec {shlex.quote(python)} -m {module} "$@"
"""


def _replace_link(link: Path, target: str, copy: bool) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    if copy:
        shutil.copy2(target, link)
    else:
        link.symlink_to(target)


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


def install(prefix: Path, copy: bool = False, python: str | None = None) -> list[str]:
    """Lay out the tree; returns what was done, one line each."""
    from pkcs11ws.__main__ import module_path

    prefix = prefix.expanduser().absolute()
    python = python or sys.executable
    try:
        module = module_path()
    except FileNotFoundError as e:
        raise InstallError(str(e)) from None
    example = example_source()
    done = []
    for sub in ("lib", "bin", "conf", "log"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    lib = prefix / "lib" / LIBRARY
    _replace_link(lib, module, copy)
    done.append(f"{lib} -> {module}" if not copy else f"{lib} (copy of {module})")
    for tool, mod in TOOLS.items():
        path = prefix / "bin" / tool
        _write(path, launcher(tool, mod, prefix, python), 0o755)
        done.append(str(path))
    # Settings move to the prefix; comments keep describing the module's built-in defaults.
    lines = example.read_text(encoding="utf-8").splitlines(keepends=True)
    text = "".join(
        ln if ln.lstrip().startswith("#") else ln.replace(WSOP_PREFIX + "/", f"{prefix}/")
        for ln in lines
    )
    conf = prefix / "conf" / EXAMPLE
    _write(conf, text, 0o644)
    done.append(str(conf))
    done.append(str(prefix / "log") + "/")
    return done


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--prefix",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"where to lay out the tree (the WSOP default is {WSOP_PREFIX})",
    )
    ap.add_argument("--copy", action="store_true", help=f"copy the module to lib/{LIBRARY} "
                    "instead of linking it (works only for an editable install)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        done = install(args.prefix, copy=args.copy)
    except (InstallError, OSError) as e:
        print(f"pkcs11ws install: {e}", file=sys.stderr)
        return 1
    for line in done:
        print(f"installed {line}")
    cfg = args.prefix.expanduser().absolute() / "conf" / CONFIG
    if not cfg.exists():
        print(f"next: copy {cfg.with_name(EXAMPLE)} to {cfg}, edit it, then run "
              f"{args.prefix.expanduser().absolute() / 'bin' / 'ckcheckinst'}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pkcs11ws install", description=HELP)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
