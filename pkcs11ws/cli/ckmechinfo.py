"""ckmechinfo: each mechanism of a slot with its flags and minimum/maximum key sizes.

    ckmechinfo [--library PATH] [--slot N]

Without --slot: the first slot with a token (else the first slot). Key sizes are as the module
reports them (bytes for AES and HMAC keys, bits for RSA and EC keys, per the standard).
A pkcs11ws module with no slot (a key service with no softcard yet) has nothing to ask, so its
mechanisms are listed from the table the module itself answers from (pkcs11ws.mechanisms).
Exit status 0, 1 when a PKCS#11 call fails or another module has no slot, 2 on a usage or load
error.
"""

from __future__ import annotations

import argparse
import sys

from pkcs11ws.cli import ckfmt
from pkcs11ws.cli.ckabi import CKError, Library
from pkcs11ws.cli.ckinfo import library_argument, open_library
from pkcs11ws.cli.common import err, pipe_safe

PROG = "ckmechinfo"


def pick_slot(lib: Library, wanted: int | None) -> int | None:
    with_token = lib.slots(token_present=True)  # some modules learn their slots only here
    if wanted is not None:
        return wanted
    if with_token:
        return with_token[0]
    every = lib.slots(token_present=False)
    return every[0] if every else None


HEADER = f"{'Mechanism':<28} {'Code':>10} {'Min key':>8} {'Max key':>8}  Flags"


def _row(code: int, min_key: int, max_key: int, flags: int) -> str:
    return (
        f"{ckfmt.mechanism_name(code):<28} 0x{code:08X} {min_key:>8} {max_key:>8}  "
        f"{ckfmt.flags(flags, ckfmt.MECHANISM_FLAGS)}"
    )


def run(lib: Library, wanted: int | None) -> int:
    slot = pick_slot(lib, wanted)
    if slot is None and lib.info().manufacturer == "pkcs11ws":
        from pkcs11ws import mechanisms

        print(
            f"Mechanisms of {lib.path} (no slot: no softcard on the key service yet; "
            f"from the module's mechanism table): {len(mechanisms.MECHANISMS)}"
        )
        print(HEADER)
        for row in mechanisms.MECHANISMS:
            print(_row(row.code, row.min_key, row.max_key, row.flags))
        return 0
    if slot is None:
        err(
            PROG,
            "the module has no slots (pkcs11ws shows one slot per softcard: create one "
            "with `softcardtool -g --name=NAME`)",
        )
        return 1
    mechs = lib.mechanisms(slot)
    print(f"Mechanisms of slot {slot} of {lib.path}: {len(mechs)}")
    print(HEADER)
    for m in mechs:
        mi = lib.mechanism_info(slot, m)
        print(_row(m, mi.min_key, mi.max_key, mi.flags))
    return 0


@pipe_safe
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="List the mechanisms a PKCS#11 slot supports, with their flags and key sizes.",
    )
    library_argument(ap)
    ap.add_argument(
        "--slot", type=int, metavar="N", help="slot ID (default: the first slot with a token)"
    )
    args = ap.parse_args(argv)
    lib = open_library(PROG, args.library)
    if lib is None:
        return 2
    try:
        with lib:
            return run(lib, args.slot)
    except CKError as e:
        sys.stdout.flush()
        err(PROG, str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
