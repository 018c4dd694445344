"""Object templates: which attributes each class has, the WSOP attribute rules, defaults.

The rules (WSOP user guide 6.4): only token, private objects (CKA_TOKEN / CKA_PRIVATE true if
given), except that an X.509 certificate may be public (CKA_PRIVATE false: what pkcs11-tool
writes and what OpenSSL looks up before login); CKA_DERIVE, CKA_EXTRACTABLE,
CKA_TRUSTED, CKA_UNWRAP, CKA_WRAP and CKA_WRAP_WITH_TRUSTED false if given; for keys
CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_LOCAL and CKA_SENSITIVE true if given (an
imported key reads the first three back false, so there they may only be given false). An
attribute the class does not have is ATTRIBUTE_TYPE_INVALID. Objects can always be destroyed.

After creation only the names change: CKA_LABEL and CKA_ID (C_SetAttributeValue), and a copy
(C_CopyObject) may take new ones. CKA_MODIFIABLE and CKA_COPYABLE are true unless the template
asked for false, and an object that reads false refuses the rename or the copy.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from pkcs11ws import mechanisms
from pkcs11ws._lite import dataclass
from pkcs11ws.protocol import Attrs
from pkcs11ws.protocol import ProtocolError as ApiError

_COMMON: Final = frozenset(
    {"CKA_CLASS", "CKA_TOKEN", "CKA_PRIVATE", "CKA_LABEL", "CKA_MODIFIABLE", "CKA_COPYABLE",
     "CKA_DESTROYABLE"}
)  # fmt: skip
CLASS_ATTRS: Final[dict[int, frozenset[str]]] = {
    C.CKO_DATA: _COMMON | {"CKA_APPLICATION", "CKA_OBJECT_ID", "CKA_VALUE"},
    C.CKO_CERTIFICATE: _COMMON | {
        "CKA_CERTIFICATE_TYPE", "CKA_TRUSTED", "CKA_CERTIFICATE_CATEGORY", "CKA_CHECK_VALUE",
        "CKA_START_DATE", "CKA_END_DATE", "CKA_SUBJECT", "CKA_ID", "CKA_ISSUER",
        "CKA_SERIAL_NUMBER", "CKA_VALUE"},
    C.CKO_SECRET_KEY: _COMMON | {
        "CKA_KEY_TYPE", "CKA_ID", "CKA_START_DATE", "CKA_END_DATE", "CKA_DERIVE", "CKA_LOCAL",
        "CKA_KEY_GEN_MECHANISM", "CKA_SENSITIVE", "CKA_ENCRYPT", "CKA_DECRYPT", "CKA_SIGN",
        "CKA_VERIFY", "CKA_WRAP", "CKA_UNWRAP", "CKA_EXTRACTABLE", "CKA_ALWAYS_SENSITIVE",
        "CKA_NEVER_EXTRACTABLE", "CKA_CHECK_VALUE", "CKA_WRAP_WITH_TRUSTED", "CKA_TRUSTED",
        "CKA_VALUE", "CKA_VALUE_LEN"},
}  # fmt: skip
CLASS_NAMES: Final = {C.CKO_DATA: "data", C.CKO_CERTIFICATE: "certificate",
                      C.CKO_SECRET_KEY: "secret key"}  # fmt: skip
_MUST_TRUE: Final = ("CKA_TOKEN", "CKA_PRIVATE", "CKA_DESTROYABLE")
RENAMABLE: Final = ("CKA_LABEL", "CKA_ID")  # what C_SetAttributeValue may change
# CKA_COPYABLE and CKA_MODIFIABLE may be given either way: what an object reads back is what
# C_CopyObject and C_SetAttributeValue enforce (the WSOP list has CKA_COPYABLE for a library
# that cannot copy).
_MUST_FALSE: Final = ("CKA_DERIVE", "CKA_EXTRACTABLE", "CKA_TRUSTED", "CKA_UNWRAP", "CKA_WRAP",
                      "CKA_WRAP_WITH_TRUSTED")  # fmt: skip
# An imported key was not always sensitive, may have been extracted and was not made here.
_IMPORTED_FALSE: Final = ("CKA_ALWAYS_SENSITIVE", "CKA_NEVER_EXTRACTABLE", "CKA_LOCAL")
_KEY_MUST_TRUE: Final = ("CKA_ALWAYS_SENSITIVE", "CKA_NEVER_EXTRACTABLE", "CKA_LOCAL",
                         "CKA_SENSITIVE")  # fmt: skip
_USAGE: Final = ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_SIGN", "CKA_VERIFY")


@dataclass(frozen=True)
class NewObject:
    cls: int
    key_type: int | None
    attrs: Attrs  # stored in clear (no CKA_VALUE)
    value: bytes  # CKA_VALUE, stored only sealed under the card key


def _inconsistent(msg: str) -> ApiError:
    return ApiError("TEMPLATE_INCONSISTENT", msg)


def _check_common(cls: int, t: Attrs) -> None:
    allowed = CLASS_ATTRS[cls]
    for name in t:
        if name not in allowed:
            raise ApiError(
                "ATTRIBUTE_TYPE_INVALID", f"{name} is not an attribute of a {CLASS_NAMES[cls]}"
            )
    for name in _MUST_TRUE:
        if name == "CKA_PRIVATE" and cls == C.CKO_CERTIFICATE:
            continue
        if t.get(name, True) is not True:
            raise _inconsistent(f"{name} must be true (token, private, destroyable objects only)")
    for name in _MUST_FALSE:
        if t.get(name, False) is not False:
            raise _inconsistent(f"{name} must be false")
    for name in ("CKA_START_DATE", "CKA_END_DATE"):
        v = t.get(name)
        if v is not None and not (v == b"" or (len(v) == 8 and v.isdigit())):  # type: ignore[union-attr, arg-type]
            raise ApiError("ATTRIBUTE_VALUE_INVALID", f"{name} must be empty or YYYYMMDD")


def _base(cls: int, t: Attrs) -> Attrs:
    return {
        "CKA_CLASS": cls,
        "CKA_TOKEN": True,
        "CKA_PRIVATE": t.get("CKA_PRIVATE", True) if cls == C.CKO_CERTIFICATE else True,
        "CKA_LABEL": t.get("CKA_LABEL", b""),
        "CKA_MODIFIABLE": t.get("CKA_MODIFIABLE", True),
        "CKA_COPYABLE": t.get("CKA_COPYABLE", True),
        "CKA_DESTROYABLE": True,
    }


def is_public(cls: int, attrs: Attrs) -> bool:
    """A public object (only certificates can be): its value rests unsealed, readable unlogged."""
    return cls == C.CKO_CERTIFICATE and attrs.get("CKA_PRIVATE") is False


def copied_attrs(cls: int, old: Attrs, value: bytes, t: Attrs) -> Attrs:
    """The attributes (without CKA_VALUE) of a copy of an object (C_CopyObject) whose stored
    attributes are `old` and value `value`, made with the template `t`."""
    if old.get("CKA_COPYABLE") is False:
        raise ApiError("ACTION_PROHIBITED", "the object's CKA_COPYABLE is false")
    new = {k: v for k, v in old.items() if k != "CKA_VALUE"}
    for name, v in t.items():
        if name not in CLASS_ATTRS[cls]:
            raise ApiError("ATTRIBUTE_TYPE_INVALID", f"a {CLASS_NAMES[cls]} has no {name}")
        if name in RENAMABLE or (name == "CKA_PRIVATE" and cls == C.CKO_CERTIFICATE):
            new[name] = v
        elif name in ("CKA_COPYABLE", "CKA_MODIFIABLE") and v is False:
            new[name] = v  # the standard lets a copy drop these, never gain them
        elif name == "CKA_VALUE":
            if cls == C.CKO_SECRET_KEY or v != value:
                raise ApiError("ATTRIBUTE_READ_ONLY", "CKA_VALUE cannot be changed in a copy")
        elif old.get(name) != v:
            raise ApiError("ATTRIBUTE_READ_ONLY", f"{name} cannot be changed in a copy")
    return new


def renamed_attrs(cls: int, old: Attrs, t: Attrs) -> Attrs:
    """The attributes after C_SetAttributeValue: only CKA_LABEL and CKA_ID change."""
    for name in t:
        if name not in CLASS_ATTRS[cls]:
            raise ApiError("ATTRIBUTE_TYPE_INVALID", f"a {CLASS_NAMES[cls]} has no {name}")
        if name not in RENAMABLE:
            raise ApiError("ATTRIBUTE_READ_ONLY", f"{name} cannot be changed")
    if t and old.get("CKA_MODIFIABLE") is False:
        raise ApiError("ACTION_PROHIBITED", "the object's CKA_MODIFIABLE is false")
    return {**old, **t}


def _bytes(t: Attrs, name: str, default: bytes = b"") -> bytes:
    v = t.get(name, default)
    assert isinstance(v, bytes)
    return v


def check_value(key_type: int, value: bytes) -> bytes:
    """PKCS#11 CKA_CHECK_VALUE: AES-ECB of a zero block for AES, else SHA-1, first 3 bytes."""
    if key_type == C.CKK_AES:
        enc = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
        return (enc.update(bytes(16)) + enc.finalize())[:3]
    return hashlib.sha1(value, usedforsecurity=False).digest()[:3]


def _check_value_given(t: Attrs, computed: bytes) -> bytes:
    given = t.get("CKA_CHECK_VALUE")
    if given is None:
        return computed
    if given not in (b"", computed):
        raise ApiError("ATTRIBUTE_VALUE_INVALID", "CKA_CHECK_VALUE does not match the value")
    return computed if given else b""


def new_object(t: Attrs) -> NewObject:
    """A data object, an X.509 certificate or an imported secret key from a template."""
    cls = t.get("CKA_CLASS")
    if cls is None:
        raise ApiError("TEMPLATE_INCOMPLETE", "CKA_CLASS is required")
    if cls not in CLASS_ATTRS:
        raise ApiError("ATTRIBUTE_VALUE_INVALID", f"object class {cls!r} is not supported")
    assert isinstance(cls, int)
    _check_common(cls, t)
    attrs = _base(cls, t)
    if cls == C.CKO_DATA:
        attrs["CKA_APPLICATION"] = _bytes(t, "CKA_APPLICATION")
        attrs["CKA_OBJECT_ID"] = _bytes(t, "CKA_OBJECT_ID")
        return NewObject(cls, None, attrs, _bytes(t, "CKA_VALUE"))
    if cls == C.CKO_CERTIFICATE:
        return _certificate(t, attrs)
    return _imported_key(t, attrs)


def _certificate(t: Attrs, attrs: Attrs) -> NewObject:
    ctype = t.get("CKA_CERTIFICATE_TYPE")
    if ctype is None:
        raise ApiError("TEMPLATE_INCOMPLETE", "CKA_CERTIFICATE_TYPE is required")
    if ctype != C.CKC_X_509:
        raise ApiError("ATTRIBUTE_VALUE_INVALID", "only CKC_X_509 certificates are supported")
    for name in ("CKA_VALUE", "CKA_SUBJECT"):
        if name not in t:
            raise ApiError("TEMPLATE_INCOMPLETE", f"{name} is required for a certificate")
    value = _bytes(t, "CKA_VALUE")
    try:
        x509.load_der_x509_certificate(value)
    except ValueError:
        raise ApiError(
            "ATTRIBUTE_VALUE_INVALID", "CKA_VALUE is not a DER X.509 certificate"
        ) from None
    category = t.get("CKA_CERTIFICATE_CATEGORY", 0)
    if category not in (0, 1, 2, 3):
        raise ApiError("ATTRIBUTE_VALUE_INVALID", "CKA_CERTIFICATE_CATEGORY must be 0-3")
    attrs.update(
        {
            "CKA_CERTIFICATE_TYPE": C.CKC_X_509,
            "CKA_TRUSTED": False,
            "CKA_CERTIFICATE_CATEGORY": category,
            "CKA_CHECK_VALUE": _check_value_given(t, check_value(-1, value)),
            "CKA_START_DATE": _bytes(t, "CKA_START_DATE"),
            "CKA_END_DATE": _bytes(t, "CKA_END_DATE"),
            "CKA_SUBJECT": _bytes(t, "CKA_SUBJECT"),
            "CKA_ID": _bytes(t, "CKA_ID"),
            "CKA_ISSUER": _bytes(t, "CKA_ISSUER"),
            "CKA_SERIAL_NUMBER": _bytes(t, "CKA_SERIAL_NUMBER"),
        }
    )
    return NewObject(C.CKO_CERTIFICATE, None, attrs, value)


def _key_attrs(t: Attrs, attrs: Attrs, key_type: int, value: bytes, gen_mech: int) -> Attrs:
    local = gen_mech != C.CK_UNAVAILABLE_INFORMATION
    for name in _KEY_MUST_TRUE:
        if not local and name in _IMPORTED_FALSE:
            if t.get(name, False) is not False:
                raise _inconsistent(f"{name} must be false for an imported key")
        elif t.get(name, True) is not True:
            raise _inconsistent(f"{name} must be true for keys")
    mac = key_type != C.CKK_AES
    attrs.update(
        {
            "CKA_KEY_TYPE": key_type,
            "CKA_ID": _bytes(t, "CKA_ID"),
            "CKA_START_DATE": _bytes(t, "CKA_START_DATE"),
            "CKA_END_DATE": _bytes(t, "CKA_END_DATE"),
            "CKA_DERIVE": False,
            "CKA_LOCAL": local,
            "CKA_KEY_GEN_MECHANISM": gen_mech,
            "CKA_SENSITIVE": True,
            "CKA_ENCRYPT": t.get("CKA_ENCRYPT", not mac),
            "CKA_DECRYPT": t.get("CKA_DECRYPT", not mac),
            "CKA_SIGN": t.get("CKA_SIGN", mac),
            "CKA_VERIFY": t.get("CKA_VERIFY", mac),
            "CKA_WRAP": False,
            "CKA_UNWRAP": False,
            "CKA_EXTRACTABLE": False,
            "CKA_ALWAYS_SENSITIVE": local,
            "CKA_NEVER_EXTRACTABLE": local,
            "CKA_CHECK_VALUE": _check_value_given(t, check_value(key_type, value)),
            "CKA_WRAP_WITH_TRUSTED": False,
            "CKA_TRUSTED": False,
            "CKA_VALUE_LEN": len(value),
        }
    )
    return attrs


def _imported_key(t: Attrs, attrs: Attrs) -> NewObject:
    key_type = t.get("CKA_KEY_TYPE")
    if key_type is None:
        raise ApiError("TEMPLATE_INCOMPLETE", "CKA_KEY_TYPE is required")
    if key_type not in mechanisms.KEY_TYPE_NAMES:
        raise ApiError("ATTRIBUTE_VALUE_INVALID", f"key type {key_type!r} is not supported")
    assert isinstance(key_type, int)
    if "CKA_VALUE" not in t:
        raise ApiError("TEMPLATE_INCOMPLETE", "CKA_VALUE is required to import a secret key")
    value = _bytes(t, "CKA_VALUE")
    if not mechanisms.key_size_ok(key_type, len(value)):
        raise ApiError("KEY_SIZE_RANGE", f"a {len(value)}-byte key is not allowed for this type")
    if t.get("CKA_VALUE_LEN", len(value)) != len(value):
        raise _inconsistent("CKA_VALUE_LEN does not match the length of CKA_VALUE")
    if t.get("CKA_KEY_GEN_MECHANISM", C.CK_UNAVAILABLE_INFORMATION) != C.CK_UNAVAILABLE_INFORMATION:
        raise _inconsistent("CKA_KEY_GEN_MECHANISM cannot be set on an imported key")
    _key_attrs(t, attrs, key_type, value, C.CK_UNAVAILABLE_INFORMATION)
    return NewObject(C.CKO_SECRET_KEY, key_type, attrs, value)


def generated_key(mechanism: str, t: Attrs) -> NewObject:
    """A new secret key made with a key generation mechanism."""
    mech = mechanisms.by_name(mechanism)
    if mech is None or mech.op is not mechanisms.Op.KEYGEN:
        raise ApiError("MECHANISM_INVALID", f"{mechanism!r} is not a key generation mechanism")
    key_type = mech.gen_key_type
    _check_common(C.CKO_SECRET_KEY, t)
    if t.get("CKA_CLASS", C.CKO_SECRET_KEY) != C.CKO_SECRET_KEY:
        raise _inconsistent(f"{mech.name} makes secret keys (CKA_CLASS)")
    if t.get("CKA_KEY_TYPE", key_type) != key_type:
        raise _inconsistent(f"{mech.name} makes {mechanisms.KEY_TYPE_NAMES[key_type]} keys")
    if "CKA_VALUE" in t:
        raise _inconsistent("CKA_VALUE cannot be given for a generated key")
    if t.get("CKA_KEY_GEN_MECHANISM", mech.code) != mech.code:
        raise _inconsistent("CKA_KEY_GEN_MECHANISM does not match the mechanism")
    length = t.get("CKA_VALUE_LEN")
    if length is None:
        raise ApiError("TEMPLATE_INCOMPLETE", f"CKA_VALUE_LEN is required for {mech.name}")
    assert isinstance(length, int)
    if not (mech.min_key <= length <= mech.max_key and mechanisms.key_size_ok(key_type, length)):
        raise ApiError("KEY_SIZE_RANGE", f"{length} bytes is out of range for {mech.name}")
    value = os.urandom(length)
    attrs = _key_attrs(t, _base(C.CKO_SECRET_KEY, t), key_type, value, mech.code)
    return NewObject(C.CKO_SECRET_KEY, key_type, attrs, value)
