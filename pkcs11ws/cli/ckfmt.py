"""How the ck* utilities print PKCS#11 values: names, flags, attribute values, counters.

Names come from pkcs11ws.constants (the one place for CK* numbers); a number it does not name
prints in hex (CKM_0x00001234), so every module's values still show. An attribute's value is
shown by the attribute schema: its wire kind (protocol.ATTRIBUTES) and how it reads
(attributes.SHOWN_AS: text, a date, constants of a family). Flag words are decoded per
structure, because the same bit means different things in slot, token and mechanism flags.
"""

from __future__ import annotations

import functools
from typing import Final

from pkcs11ws import attributes, protocol
from pkcs11ws import constants as C
from pkcs11ws.cli.ckabi import Sensitive, bytes_ulong

SLOT_FLAGS: Final = ("CKF_TOKEN_PRESENT", "CKF_REMOVABLE_DEVICE", "CKF_HW_SLOT")
TOKEN_FLAGS: Final = (
    "CKF_RNG",
    "CKF_WRITE_PROTECTED",
    "CKF_LOGIN_REQUIRED",
    "CKF_USER_PIN_INITIALIZED",
    "CKF_TOKEN_INITIALIZED",
)
MECHANISM_FLAGS: Final = (
    "CKF_HW",
    "CKF_ENCRYPT",
    "CKF_DECRYPT",
    "CKF_DIGEST",
    "CKF_SIGN",
    "CKF_SIGN_RECOVER",
    "CKF_VERIFY",
    "CKF_VERIFY_RECOVER",
    "CKF_GENERATE",
    "CKF_GENERATE_KEY_PAIR",
    "CKF_WRAP",
    "CKF_UNWRAP",
    "CKF_DERIVE",
)
HEX_SHOWN: Final = 32  # bytes of a long value shown before "..."


def flags(value: int, names: tuple[str, ...]) -> str:
    """'CKF_A | CKF_B' for the named bits, unknown bits in hex, 'none' for 0."""
    words = []
    rest = value
    for name in names:
        bit = int(getattr(C, name))
        if value & bit:
            words.append(name)
            rest &= ~bit
    if rest:
        words.append(f"0x{rest:08X}")
    return " | ".join(words) if words else "none"


def mechanism_name(code: int) -> str:
    return C.CKM_NAMES.get(code, f"CKM_0x{code:08X}")


def attribute_name(code: int) -> str:
    return C.CKA_NAMES.get(code, f"CKA_0x{code:08X}")


def counter(value: int) -> str:
    """A CK_TOKEN_INFO count: the two special values by name."""
    if value == C.CK_UNAVAILABLE_INFORMATION:
        return "unavailable"
    if value == C.CK_EFFECTIVELY_INFINITE:
        return "unlimited"
    return str(value)


def plain_counter(value: int) -> str:
    """A count where 0 is just 0 (current session counts, memory)."""
    return "unavailable" if value == C.CK_UNAVAILABLE_INFORMATION else str(value)


def hexdump(raw: bytes) -> str:
    if len(raw) <= HEX_SHOWN:
        return raw.hex() if raw else "(empty)"
    return f"{raw[:HEX_SHOWN].hex()}... ({len(raw)} bytes)"


@functools.cache
def _names(prefix: str) -> dict[int, str]:
    """Number -> name of a CK*_ family (as constants.CKM_NAMES and the like are built)."""
    named = vars(C).items()
    return {v: k for k, v in named if k.startswith(prefix) and type(v) is int}


def _constant(prefix: str, n: int) -> str:
    return _names(prefix).get(n, f"0x{n:08X}")


def _text(value: bytes) -> str:
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError:
        return hexdump(value)
    return f'"{s}"' if s.isprintable() else hexdump(value)


def _date(value: bytes) -> str:
    if not value:
        return "(empty)"
    if len(value) == 8 and value.isdigit():
        d = value.decode()
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return hexdump(value)


def attribute_value(code: int, value: bytes | Sensitive) -> str:
    """One attribute value for display, by the attribute schema (wire kind, SHOWN_AS)."""
    if isinstance(value, Sensitive):
        return "<sensitive>"
    spec = protocol.ATTR_BY_CODE.get(code)
    if spec is None:
        return hexdump(value)
    shown = attributes.SHOWN_AS.get(spec.name, "")
    if spec.kind == protocol.BOOL and len(value) == 1:
        return "true" if value[0] else "false"
    if spec.kind == protocol.ULONG and len(value) in (4, 8):
        n = bytes_ulong(value)
        return _constant(shown, n) if shown.startswith("CK") else str(n)
    if spec.kind == protocol.ULONGS and len(value) % 8 == 0:
        nums = [bytes_ulong(value[i : i + 8]) for i in range(0, len(value), 8)]
        words = [_constant(shown, n) if shown.startswith("CK") else str(n) for n in nums]
        return ", ".join(words) if words else "(empty)"
    if shown == "text":
        return _text(value)
    if shown == "date":
        return _date(value)
    return hexdump(value)
