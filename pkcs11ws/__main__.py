"""`python -m pkcs11ws` (also the console script `pkcs11ws`): small commands around the module.

--version     print the package version (the one the utilities' -V and C_GetInfo report)

module-path   print the absolute path of libpkcs11ws.so (for pkcs11-tool --module, p11-kit,
              Java's SunPKCS11 "library =" line, ...)
install       lay out the WSOP install tree under --prefix DIR (pkcs11ws/cli/install.py)
"""

from __future__ import annotations

import argparse
import sys

from pkcs11ws.paths import MODULE_NAME, module_path

__all__ = ["MODULE_NAME", "build_parser", "main", "module_path"]


def _cmd_module_path(args: argparse.Namespace) -> int:
    try:
        print(module_path())
    except FileNotFoundError as e:
        print(f"pkcs11ws: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pkcs11ws import __version__

    ap = argparse.ArgumentParser(prog="pkcs11ws", description=__doc__.splitlines()[0])
    ap.add_argument("-V", "--version", action="version", version=f"pkcs11ws {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("module-path", help="print the absolute path of libpkcs11ws.so")
    p.set_defaults(func=_cmd_module_path)
    from pkcs11ws.cli import install

    p = sub.add_parser("install", help=install.HELP, description=install.HELP)
    install.add_arguments(p)
    p.set_defaults(func=install.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
