"""The attribute schema: which attributes each object class has and the rules on each, once.

Read by the module's template checks (pkcs11ws/templates.py) and the service's
(pkcs11ws/server/new_objects.py), so the two cannot drift. How an attribute travels (its wire
kind) is protocol.ATTRIBUTES; this file says what a class does with it. Flags per (class,
attribute):

- R  required in a creation template
- T  forced true when given (WSOP 6.4: token, private, sensitive objects only)
- F  forced false when given (no wrapping, deriving, extracting or trusting)
- I  forced false when given on an imported key (it was not made here; generated keys read true)
- S  sensitive: never read back (the value of a secret or private key)
- P  may be given false for CKA_PRIVATE: the class can be a public object (certificates, public
     keys: what OpenSSL and ssh look up before login). A public key is always stored public,
     whatever the template says (pkcs11-tool --keypairgen --private asks private on both halves).
- G  set by the service from the key material; a template may only repeat the right value

Anything not in a class's row is ATTRIBUTE_TYPE_INVALID for it. After creation only CKA_LABEL
and CKA_ID change (RENAMABLE).
"""

from __future__ import annotations

from pkcs11ws import constants as C

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Final

_COMMON: Final = {
    "CKA_CLASS": "R",
    "CKA_TOKEN": "T",
    "CKA_PRIVATE": "T",
    "CKA_LABEL": "",
    "CKA_MODIFIABLE": "",
    "CKA_COPYABLE": "",
    "CKA_DESTROYABLE": "T",
}
_KEY: Final = {
    **_COMMON,
    "CKA_KEY_TYPE": "",
    "CKA_ID": "",
    "CKA_START_DATE": "",
    "CKA_END_DATE": "",
    "CKA_DERIVE": "F",
    "CKA_LOCAL": "TI",
    "CKA_KEY_GEN_MECHANISM": "G",
    "CKA_ALLOWED_MECHANISMS": "",
}
_PRIVATE_USE: Final = {
    "CKA_SENSITIVE": "T",
    "CKA_EXTRACTABLE": "F",
    "CKA_ALWAYS_SENSITIVE": "TI",
    "CKA_NEVER_EXTRACTABLE": "TI",
    "CKA_UNWRAP": "F",
    "CKA_WRAP_WITH_TRUSTED": "F",
    "CKA_ALWAYS_AUTHENTICATE": "F",
}
_RSA_EC_PUBLIC: Final = {
    "CKA_MODULUS": "G",
    "CKA_MODULUS_BITS": "G",
    "CKA_PUBLIC_EXPONENT": "G",
    "CKA_EC_PARAMS": "G",
    "CKA_EC_POINT": "G",
    "CKA_PUBLIC_KEY_INFO": "G",
}

SCHEMA: Final[dict[int, dict[str, str]]] = {
    C.CKO_DATA: {**_COMMON, "CKA_APPLICATION": "", "CKA_OBJECT_ID": "", "CKA_VALUE": ""},
    C.CKO_CERTIFICATE: {
        **_COMMON, "CKA_PRIVATE": "TP", "CKA_CERTIFICATE_TYPE": "R", "CKA_TRUSTED": "F",
        "CKA_CERTIFICATE_CATEGORY": "", "CKA_CHECK_VALUE": "", "CKA_START_DATE": "",
        "CKA_END_DATE": "", "CKA_SUBJECT": "R", "CKA_ID": "", "CKA_ISSUER": "",
        "CKA_SERIAL_NUMBER": "", "CKA_VALUE": "R"},
    C.CKO_SECRET_KEY: {
        **_KEY, **_PRIVATE_USE, "CKA_ALWAYS_AUTHENTICATE": "", "CKA_ENCRYPT": "",
        "CKA_DECRYPT": "", "CKA_SIGN": "", "CKA_VERIFY": "", "CKA_WRAP": "F",
        "CKA_CHECK_VALUE": "", "CKA_TRUSTED": "F", "CKA_VALUE": "S", "CKA_VALUE_LEN": ""},
    # CKA_DERIVE is stored as given on key pairs: pkcs11-tool --keypairgen asks it for EC keys
    # (C_DeriveKey itself is not offered).
    C.CKO_PRIVATE_KEY: {
        **_KEY, **_PRIVATE_USE, "CKA_DERIVE": "", "CKA_SUBJECT": "", "CKA_DECRYPT": "",
        "CKA_SIGN": "",
        "CKA_SIGN_RECOVER": "F", **_RSA_EC_PUBLIC, "CKA_PRIVATE_EXPONENT": "S",
        "CKA_PRIME_1": "S", "CKA_PRIME_2": "S", "CKA_EXPONENT_1": "S", "CKA_EXPONENT_2": "S",
        "CKA_COEFFICIENT": "S", "CKA_VALUE": "S"},
    C.CKO_PUBLIC_KEY: {
        **_KEY, "CKA_PRIVATE": "TP", "CKA_DERIVE": "", "CKA_SUBJECT": "", "CKA_ENCRYPT": "",
        "CKA_VERIFY": "",
        "CKA_VERIFY_RECOVER": "F", "CKA_WRAP": "F", "CKA_TRUSTED": "F", **_RSA_EC_PUBLIC},
}  # fmt: skip
# How the ck* utilities (pkcs11ws/cli/ckfmt.py) show a value beyond its wire kind: UTF-8
# text, a CK_DATE (YYYYMMDD), or CK_ULONG constants of the family with this name prefix (one
# for a ULONG attribute, a list for a ULONGS one). Anything else shows as hex.
SHOWN_AS: Final[dict[str, str]] = {
    "CKA_LABEL": "text",
    "CKA_APPLICATION": "text",
    "CKA_START_DATE": "date",
    "CKA_END_DATE": "date",
    "CKA_CLASS": "CKO_",
    "CKA_KEY_TYPE": "CKK_",
    "CKA_CERTIFICATE_TYPE": "CKC_",
    "CKA_KEY_GEN_MECHANISM": "CKM_",
    "CKA_ALLOWED_MECHANISMS": "CKM_",
}
CLASS_NAMES: Final = {
    C.CKO_DATA: "data",
    C.CKO_CERTIFICATE: "certificate",
    C.CKO_SECRET_KEY: "secret key",
    C.CKO_PRIVATE_KEY: "private key",
    C.CKO_PUBLIC_KEY: "public key",
}
KEY_CLASSES: Final = (C.CKO_SECRET_KEY, C.CKO_PRIVATE_KEY, C.CKO_PUBLIC_KEY)
RENAMABLE: Final = ("CKA_LABEL", "CKA_ID")  # what C_SetAttributeValue may change


def allowed(cls: int) -> frozenset[str]:
    return frozenset(SCHEMA[cls])


def having(cls: int, flag: str) -> tuple[str, ...]:
    """The attributes of a class that carry a flag, in schema order."""
    return tuple(n for n, f in SCHEMA[cls].items() if flag in f)


def may_be_public(cls: int) -> bool:
    return "P" in SCHEMA.get(cls, {}).get("CKA_PRIVATE", "")


def is_public(cls: int, private: object) -> bool:
    """A public object: its class may be public and its CKA_PRIVATE reads false."""
    return private is False and may_be_public(cls)


def sensitive(cls: int, name: str) -> bool:
    return "S" in SCHEMA.get(cls, {}).get(name, "")
