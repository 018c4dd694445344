"""cklist-dynamic: the objects of each token, with their attributes (WSOP user guide 5).

    cklist-dynamic [--library PATH] [--slot N | --token-label LABEL] [--login]

Every attribute pkcs11ws.constants names is asked for, one at a time (a module answers
CKR_ATTRIBUTE_TYPE_INVALID for those an object does not have: not shown), so values the module
withholds show as <sensitive>. With --login it logs in to each listed token as the user first:
the passphrase is prompted for without echo on a terminal, else one line per token is read from
standard input; it never comes from argv. Without a login only public objects are visible (every
pkcs11ws key and data object is private), and the listing says that --login shows the others.
Exit status 0, 1 when a PKCS#11 call fails, 2 on a usage or load error.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from pkcs11ws import constants as C
from pkcs11ws.cli import ckfmt
from pkcs11ws.cli.ckabi import CKError, Library, Session
from pkcs11ws.cli.ckinfo import library_argument, open_library
from pkcs11ws.cli.common import UsageError, err, pipe_safe, read_passphrase

PROG = "cklist-dynamic"
# Shown first, in this order; then every other named attribute in code order.
_LEADING = (
    C.CKA_CLASS,
    C.CKA_LABEL,
    C.CKA_ID,
    C.CKA_KEY_TYPE,
    C.CKA_CERTIFICATE_TYPE,
    C.CKA_VALUE_LEN,
    C.CKA_TOKEN,
    C.CKA_PRIVATE,
)
ATTRIBUTES = _LEADING + tuple(sorted(set(C.CKA_NAMES) - set(_LEADING)))


def select_slots(lib: Library, slot: int | None, label: str | None) -> list[tuple[int, str]]:
    """(slot, token label) for the tokens to list."""
    present = lib.slots(token_present=True)  # some modules learn their slots only here
    if slot is not None:
        return [(slot, lib.token_info(slot).label)]
    out = [(s, lib.token_info(s).label) for s in present]
    if label is not None:
        out = [(s, lab) for s, lab in out if lab == label]
        if not out:
            raise UsageError(f"no token labelled {label!r}")
    return out


def list_objects(session: Session) -> int:
    n = 0
    for obj in session.find():
        n += 1
        values = [(a, session.attribute(obj, a)) for a in ATTRIBUTES]
        cls = next((v for a, v in values if a == C.CKA_CLASS), None)
        label = next((v for a, v in values if a == C.CKA_LABEL), None)
        head = ckfmt.attribute_value(C.CKA_CLASS, cls) if isinstance(cls, bytes) else "object"
        if isinstance(label, bytes):
            head += " " + ckfmt.attribute_value(C.CKA_LABEL, label)
        print(f"  Object {obj}: {head}")
        for a, v in values:
            if v is not None:
                print(f"    {ckfmt.attribute_name(a):<26}{ckfmt.attribute_value(a, v)}")
    return n


def run(lib: Library, args: argparse.Namespace, stdin: TextIO) -> int:
    tokens = select_slots(lib, args.slot, args.token_label)
    if not tokens:
        print("No tokens.")
    for slot, label in tokens:
        with lib.open_session(slot) as session:
            # The WSOP tool prompts for the passphrase; this one says how to see the rest.
            state = "not logged in: public objects only; private objects need --login"
            if args.login:
                pin = read_passphrase(stdin, f"Passphrase for token {label!r}: ")
                session.login(pin)
                state = "logged in"
            print(f"Slot {slot} token {label!r} ({state})")
            try:
                n = list_objects(session)
            finally:
                if args.login:
                    session.logout()
            print(f"  {n} object(s)")
    return 0


@pipe_safe
def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=PROG, description="List the objects of each token with their attributes."
    )
    library_argument(ap)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--slot", type=int, metavar="N", help="only this slot ID")
    which.add_argument("--token-label", metavar="LABEL", help="only the token with this label")
    ap.add_argument(
        "--login",
        action="store_true",
        help="log in as the user first (the "
        "passphrase is prompted for, or read from standard input)",
    )
    args = ap.parse_args(argv)
    lib = open_library(PROG, args.library)
    if lib is None:
        return 2
    try:
        with lib:
            return run(lib, args, stdin or sys.stdin)
    except UsageError as e:
        sys.stdout.flush()
        err(PROG, str(e))
        return 2
    except CKError as e:
        sys.stdout.flush()
        hint = ""
        if e.rv == C.CKR_PIN_INCORRECT:
            hint = " (wrong passphrase)"
        err(PROG, f"{e}{hint}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
