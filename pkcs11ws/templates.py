"""The module's templates: decoding them, the WSOP attribute policy, encoding values back.

Templates arrive from the Cython core as [(CKA type, raw bytes)] exactly as the application
passed them; values leave as the raw bytes PKCS#11 defines (CK_BBOOL one byte, CK_ULONG native
unsigned long). Which attribute travels as what comes from protocol.ATTRIBUTES.

The policy of the WSOP guide (section 6.4) is checked here before any round trip, so a template
the service would refuse costs nothing: CKA_TOKEN and CKA_PRIVATE must be present and true (no
session or public objects; the one exception is a public X.509 certificate, CKA_PRIVATE false,
as pkcs11-tool writes them and OpenSSL reads them before login); the classes are CKO_DATA,
CKO_CERTIFICATE (CKC_X_509 only) and CKO_SECRET_KEY (AES and the HMAC key types); some
attributes must be false and, for keys, some true when given. After creation only CKA_LABEL and
CKA_ID change (C_SetAttributeValue, or in a C_CopyObject). The service enforces the same rules
again (it trusts no client).
"""

from __future__ import annotations

import sys

from pkcs11ws import attributes as A
from pkcs11ws import constants as C
from pkcs11ws import mechanisms, protocol
from pkcs11ws.errors import PKCS11Error
from pkcs11ws.protocol import Attrs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:  # annotations only: typing stays off the start-up path (test_startup_imports)
    from collections.abc import Iterable
    from typing import Final

RawTemplate = list[tuple[int, bytes]]
ULONG_SIZE: Final = 8  # sizeof(CK_ULONG) on LP64 Linux

CLASSES: Final = (C.CKO_DATA, C.CKO_CERTIFICATE, C.CKO_SECRET_KEY, C.CKO_PRIVATE_KEY)
# The forced values come from the attribute schema the service reads too (pkcs11ws/attributes.py).
# CKA_COPYABLE is on the WSOP guide's list too, for a library without C_CopyObject; this one
# copies, so CKA_COPYABLE (like CKA_MODIFIABLE) may be given either way and is enforced as read.
MUST_BE_FALSE: Final = A.having(C.CKO_SECRET_KEY, "F")
KEY_MUST_BE_TRUE: Final = tuple(
    n
    for n in A.having(C.CKO_SECRET_KEY, "T")
    if n in ("CKA_ALWAYS_SENSITIVE", "CKA_NEVER_EXTRACTABLE", "CKA_LOCAL", "CKA_SENSITIVE")
)
# An imported key was not always sensitive, may have been extracted and was not made here: these
# read back false on it, so they may only be given false.
IMPORTED_FALSE: Final = A.having(C.CKO_SECRET_KEY, "I")
# The WSOP guide requires CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE_LEN and CKA_LABEL in a key
# generation template. CKA_KEY_TYPE and CKA_LABEL are not enforced: Java SunPKCS11's
# KeyGenerator sends neither (the mechanism implies the type) and pkcs11-tool --keygen sends no
# label without --label; both must keep working (tests/consumers/test_dropin_java.py,
# test_consumer_pkcs11tool_cards).
GENERATE_REQUIRED: Final = ("CKA_CLASS", "CKA_VALUE_LEN")


def _fail(ckr: int, msg: str) -> PKCS11Error:
    return PKCS11Error(ckr, msg)


def decode_value(attr: protocol.Attr, raw: bytes) -> protocol.AttrValue:
    """One raw attribute value as its protocol type; ATTRIBUTE_VALUE_INVALID if malformed."""
    if attr.kind == protocol.BOOL:
        if len(raw) != 1:
            raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, f"{attr.name}: a CK_BBOOL is one byte")
        return raw != b"\x00"
    if attr.kind == protocol.ULONG:
        if len(raw) != ULONG_SIZE:
            raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, f"{attr.name}: a CK_ULONG is 8 bytes")
        return int.from_bytes(raw, sys.byteorder)
    if attr.kind == protocol.ULONGS:
        if len(raw) % ULONG_SIZE:
            raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, f"{attr.name}: an array of CK_ULONG")
        return tuple(
            int.from_bytes(raw[i : i + ULONG_SIZE], sys.byteorder)
            for i in range(0, len(raw), ULONG_SIZE)
        )
    return bytes(raw)


def encode_value(attr: protocol.Attr, value: protocol.AttrValue) -> bytes:
    """A protocol value as the bytes C_GetAttributeValue hands out."""
    if attr.kind == protocol.BOOL:
        return b"\x01" if value else b"\x00"
    if attr.kind == protocol.ULONG:
        assert isinstance(value, int)
        return value.to_bytes(ULONG_SIZE, sys.byteorder)
    if attr.kind == protocol.ULONGS:
        assert isinstance(value, tuple)
        return b"".join(v.to_bytes(ULONG_SIZE, sys.byteorder) for v in value)
    assert isinstance(value, bytes)
    return value


def decode_template(template: Iterable[tuple[int, bytes]]) -> Attrs:
    """A creation template by attribute name; unknown types are ATTRIBUTE_TYPE_INVALID."""
    out: Attrs = {}
    for code, raw in template:
        attr = protocol.ATTR_BY_CODE.get(code)
        if attr is None:
            raise _fail(C.CKR_ATTRIBUTE_TYPE_INVALID, f"attribute 0x{code:X} is not supported")
        value = decode_value(attr, raw)
        if attr.name in out and out[attr.name] != value:
            raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{attr.name} given twice, differently")
        out[attr.name] = value
    return out


def decode_search(template: Iterable[tuple[int, bytes]]) -> Attrs | None:
    """A search template by name, or None when no object can match it (an attribute nothing
    has, or a class the module never shows)."""
    out: Attrs = {}
    for code, raw in template:
        attr = protocol.ATTR_BY_CODE.get(code)
        if attr is None:
            return None
        value = decode_value(attr, raw)
        if attr.name in out and out[attr.name] != value:
            return None
        out[attr.name] = value
    return out


RENAMABLE: Final = A.RENAMABLE  # the attributes C_SetAttributeValue may change
ATTRIBUTE_HEADER: Final = 2 * ULONG_SIZE  # a CK_ATTRIBUTE's type and length, for size estimates


def _check_schema(cls: int, t: Attrs, imported: bool) -> None:
    """The schema's forced values (T, F, I) for a class (the service checks the same)."""
    rules = A.SCHEMA[cls]
    for name, v in t.items():
        flags = rules.get(name)
        if flags is None:
            raise _fail(
                C.CKR_ATTRIBUTE_TYPE_INVALID,
                f"{name} is not an attribute of a {A.CLASS_NAMES[cls]}",
            )
        if "P" in flags:
            continue
        if "I" in flags and imported:
            if v is not False:
                raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be false for an import")
        elif "T" in flags and v is not True:
            raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be true")
        elif "F" in flags and v is not False:
            raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be false")


def _check_common(t: Attrs, public_ok: bool = False) -> None:
    for name in ("CKA_TOKEN", "CKA_PRIVATE"):
        if name == "CKA_PRIVATE" and public_ok and name not in t:
            # A certificate may leave it out (private then): Java's KeyStore stores the chain
            # of a PrivateKeyEntry without it, whatever the provider configuration says.
            continue
        if name not in t:
            raise _fail(
                C.CKR_TEMPLATE_INCOMPLETE,
                f"{name} is required (only token, private objects are supported)",
            )
        if name == "CKA_PRIVATE" and public_ok:
            continue
        if t[name] is not True:
            raise _fail(
                C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be true (no session or public objects)"
            )
    for name in MUST_BE_FALSE:
        if t.get(name, False) is not False:
            raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be false")


def _check_key(t: Attrs, imported: bool = False) -> None:
    for name in KEY_MUST_BE_TRUE:
        if imported and name in IMPORTED_FALSE:
            if t.get(name, False) is not False:
                raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be false for an import")
        elif t.get(name, True) is not True:
            raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{name} must be true for keys")


def check_create(t: Attrs) -> int:
    """C_CreateObject's template; returns the object class."""
    cls = t.get("CKA_CLASS")
    _check_common(t, public_ok=cls == C.CKO_CERTIFICATE)
    if cls is None:
        raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_CLASS is required")
    if cls not in CLASSES:
        raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, f"object class {cls!r} is not supported")
    assert isinstance(cls, int)
    if cls == C.CKO_CERTIFICATE:
        ctype = t.get("CKA_CERTIFICATE_TYPE")
        if ctype is None:
            raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_CERTIFICATE_TYPE is required")
        if ctype != C.CKC_X_509:
            raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, "only CKC_X_509 certificates")
        for name in ("CKA_VALUE", "CKA_SUBJECT"):
            if name not in t:
                raise _fail(C.CKR_TEMPLATE_INCOMPLETE, f"{name} is required for a certificate")
    elif cls == C.CKO_SECRET_KEY:
        _check_key(t, imported=True)
        kt = t.get("CKA_KEY_TYPE")
        if kt is None:
            raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_KEY_TYPE is required")
        if kt not in mechanisms.KEY_TYPE_NAMES:
            raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, f"key type {kt!r} is not supported")
        if "CKA_VALUE" not in t:
            raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_VALUE is required to import a key")
    elif cls == C.CKO_PRIVATE_KEY:
        # The components' checks need the key arithmetic: the service does them.
        _check_schema(cls, t, imported=True)
        kt = t.get("CKA_KEY_TYPE")
        if kt is None:
            raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_KEY_TYPE is required")
        if kt not in mechanisms.PAIR_KEY_TYPE_NAMES:
            raise _fail(C.CKR_ATTRIBUTE_VALUE_INVALID, "private keys are CKK_RSA or CKK_EC")
    return cls


def check_generate_pair(mech: mechanisms.Mechanism, pub: Attrs, priv: Attrs) -> None:
    """C_GenerateKeyPair's templates. CKA_TOKEN and CKA_PRIVATE may be left out (token
    objects; the private half private, the public half public unless asked otherwise), as
    pkcs11-tool --keypairgen and Java's KeyPairGenerator leave them out; given, they follow
    the schema."""
    inputs = ("CKA_MODULUS_BITS", "CKA_PUBLIC_EXPONENT", "CKA_EC_PARAMS")
    for cls, t in ((C.CKO_PUBLIC_KEY, pub), (C.CKO_PRIVATE_KEY, priv)):
        if t.get("CKA_CLASS", cls) != cls:
            raise _fail(
                C.CKR_TEMPLATE_INCONSISTENT,
                f"CKA_CLASS: {mech.name} makes a {A.CLASS_NAMES[cls]} here",
            )
        if t.get("CKA_KEY_TYPE", mech.gen_key_type) != mech.gen_key_type:
            raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"CKA_KEY_TYPE does not fit {mech.name}")
        _check_schema(cls, {n: v for n, v in t.items() if n not in inputs}, imported=False)
    given = {**pub, **priv}
    if mech.gen_key_type == C.CKK_RSA:
        bits = given.get("CKA_MODULUS_BITS")
        if bits is None:
            raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_MODULUS_BITS is required for RSA")
        if bits not in mechanisms.RSA_BITS:
            raise _fail(C.CKR_KEY_SIZE_RANGE, f"RSA keys are {mechanisms.RSA_BITS} bits")
    elif "CKA_EC_PARAMS" not in given:
        raise _fail(C.CKR_TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS is required for EC")


def check_generate(mech: mechanisms.Mechanism, t: Attrs) -> None:
    """C_GenerateKey's template for a key generation mechanism."""
    for name in GENERATE_REQUIRED:
        if name not in t:
            raise _fail(C.CKR_TEMPLATE_INCOMPLETE, f"{name} is required for {mech.name}")
    _check_common(t)
    _check_key(t)
    if t.get("CKA_CLASS", C.CKO_SECRET_KEY) != C.CKO_SECRET_KEY:
        raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{mech.name} makes secret keys")
    if t.get("CKA_KEY_TYPE", mech.gen_key_type) != mech.gen_key_type:
        name = mechanisms.KEY_TYPE_NAMES.get(mech.gen_key_type, "?")
        raise _fail(C.CKR_TEMPLATE_INCONSISTENT, f"{mech.name} makes {name} keys")
    if "CKA_VALUE" in t:
        raise _fail(C.CKR_TEMPLATE_INCONSISTENT, "CKA_VALUE cannot be given for a generated key")
    length = t.get("CKA_VALUE_LEN")
    if length is None:
        raise _fail(C.CKR_TEMPLATE_INCOMPLETE, f"CKA_VALUE_LEN is required for {mech.name}")
    assert isinstance(length, int)
    if not mechanisms.key_size_ok(mech.gen_key_type, length):
        raise _fail(C.CKR_KEY_SIZE_RANGE, f"{length} bytes is out of range for {mech.name}")


def attribute_values(attrs: Attrs, types: list[int]) -> list[bytes | int]:
    """C_GetAttributeValue answers: each value's bytes, or the CKR for that attribute."""
    cls = attrs.get("CKA_CLASS")
    assert isinstance(cls, int)
    out: list[bytes | int] = []
    for code in types:
        attr = protocol.ATTR_BY_CODE.get(code)
        if attr is not None and attr.name in attrs:
            out.append(encode_value(attr, attrs[attr.name]))
        elif attr is not None and A.sensitive(cls, attr.name):
            out.append(C.CKR_ATTRIBUTE_SENSITIVE)
        else:
            out.append(C.CKR_ATTRIBUTE_TYPE_INVALID)
    return out


def check_copy(current: Attrs, t: Attrs) -> None:
    """C_CopyObject's template against the object's attributes (the service checks the rest)."""
    if current.get("CKA_COPYABLE") is False:
        raise _fail(C.CKR_ACTION_PROHIBITED, "the object's CKA_COPYABLE is false")
    if t.get("CKA_TOKEN", True) is not True:
        raise _fail(C.CKR_TEMPLATE_INCONSISTENT, "copies are token objects (no session objects)")
    cls = current.get("CKA_CLASS")
    if t.get("CKA_PRIVATE", True) is not True and not (
        isinstance(cls, int) and A.may_be_public(cls)
    ):
        raise _fail(C.CKR_TEMPLATE_INCONSISTENT, "only certificates and public keys can be public")


def check_rename(current: Attrs, t: Attrs) -> None:
    """C_SetAttributeValue's template: CKA_LABEL and CKA_ID only."""
    for name in t:
        if name not in RENAMABLE:
            raise _fail(C.CKR_ATTRIBUTE_READ_ONLY, f"{name} cannot be changed")
    if current.get("CKA_MODIFIABLE") is False:
        raise _fail(C.CKR_ACTION_PROHIBITED, "the object's CKA_MODIFIABLE is false")


def object_size(attrs: Attrs) -> int:
    """C_GetObjectSize's estimate: every attribute as a CK_ATTRIBUTE with its value, plus the
    secret value of a key (which the module never sees, but knows the length of)."""
    size = 0
    for name, value in attrs.items():
        attr = protocol.ATTR_BY_NAME.get(name)
        if attr is not None:
            size += ATTRIBUTE_HEADER + len(encode_value(attr, value))
    if attrs.get("CKA_CLASS") == C.CKO_SECRET_KEY:
        length = attrs.get("CKA_VALUE_LEN", 0)
        assert isinstance(length, int)
        size += ATTRIBUTE_HEADER + length
    return size
