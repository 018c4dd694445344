"""ckinfo-dynamic: C_GetInfo, then every slot's and token's information (WSOP user guide 5).

    ckinfo-dynamic [--library PATH]

Loads the module through its C ABI (default: our libpkcs11ws.so), so it works on any PKCS#11
module. Exit status 0, 1 when a PKCS#11 call fails, 2 on a usage or load error.
"""

from __future__ import annotations

import argparse
import sys

from pkcs11ws import __version__
from pkcs11ws.cli import ckfmt
from pkcs11ws.cli.ckabi import CKError, Library, LoadError, TokenInfo
from pkcs11ws.cli.common import err, library_or_default, pipe_safe

PROG = "ckinfo-dynamic"


def library_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--library",
        metavar="PATH",
        help="PKCS#11 module to load (default: the pkcs11ws module, "
        "as printed by `python -m pkcs11ws module-path`)",
    )
    ap.add_argument(
        "-V", "--version", action="version", version=f"%(prog)s (pkcs11ws {__version__})"
    )


def open_library(prog: str, path: str | None) -> Library | None:
    """The module of --library (or ours), loaded; None, once the reason is printed, when it
    cannot be (the tool then exits 2)."""
    try:
        return Library(library_or_default(path))
    except (LoadError, FileNotFoundError) as e:
        err(prog, str(e))
        return None


def print_token(t: TokenInfo, indent: str = "    ") -> None:
    rows = [
        ("Label", t.label),
        ("Manufacturer", t.manufacturer),
        ("Model", t.model),
        ("Serial number", t.serial),
        ("Flags", ckfmt.flags(t.flags, ckfmt.TOKEN_FLAGS)),
        (
            "Sessions",
            f"{ckfmt.plain_counter(t.sessions)} open, max {ckfmt.counter(t.max_sessions)}",
        ),
        (
            "R/W sessions",
            f"{ckfmt.plain_counter(t.rw_sessions)} open, max {ckfmt.counter(t.max_rw_sessions)}",
        ),
        ("PIN length", f"{t.min_pin} to {t.max_pin}"),
        (
            "Public memory",
            f"{ckfmt.plain_counter(t.free_public)} free of {ckfmt.plain_counter(t.total_public)}",
        ),
        (
            "Private memory",
            f"{ckfmt.plain_counter(t.free_private)} free of {ckfmt.plain_counter(t.total_private)}",
        ),
        ("Hardware version", t.hardware_version),
        ("Firmware version", t.firmware_version),
        ("UTC time", t.utc_time or "(none)"),
    ]
    for k, v in rows:
        print(f"{indent}{k:<18}{v}")


def run(lib: Library) -> None:
    info = lib.info()
    print(f"Library {lib.path}")
    print(f"  Cryptoki version  {info.cryptoki_version}")
    print(f"  Manufacturer      {info.manufacturer}")
    print(f"  Flags             0x{info.flags:08X}")
    print(f"  Description       {info.description}")
    print(f"  Library version   {info.library_version}")
    print(f"  Function list     {lib.interface_version}")
    slots = lib.slots(token_present=False)
    print(f"{len(slots)} slot(s)")
    for slot in slots:
        si = lib.slot_info(slot)
        print(f"Slot {slot}")
        print(f"  Description       {si.description}")
        print(f"  Manufacturer      {si.manufacturer}")
        print(f"  Flags             {ckfmt.flags(si.flags, ckfmt.SLOT_FLAGS)}")
        print(f"  Hardware version  {si.hardware_version}")
        print(f"  Firmware version  {si.firmware_version}")
        if si.token_present:
            print("  Token")
            print_token(lib.token_info(slot))
        else:
            print("  Token             (not present)")


@pipe_safe
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Print the PKCS#11 module's information and that of every slot and token.",
    )
    library_argument(ap)
    args = ap.parse_args(argv)
    lib = open_library(PROG, args.library)
    if lib is None:
        return 2
    try:
        with lib:
            run(lib)
    except CKError as e:
        sys.stdout.flush()
        err(PROG, str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
