"""The service's new objects: what a template becomes (NewObject), by the WSOP rules, with defaults.

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

from pkcs11ws import attributes as A
from pkcs11ws import constants as C
from pkcs11ws import mechanisms
from pkcs11ws._lite import dataclass
from pkcs11ws.protocol import Attrs
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import keypairs

CLASS_ATTRS: Final[dict[int, frozenset[str]]] = {cls: A.allowed(cls) for cls in A.SCHEMA}
CLASS_NAMES: Final = A.CLASS_NAMES
RENAMABLE: Final = A.RENAMABLE  # what C_SetAttributeValue may change
# CKA_COPYABLE and CKA_MODIFIABLE may be given either way: what an object reads back is what
# C_CopyObject and C_SetAttributeValue enforce (the WSOP list has CKA_COPYABLE for a library
# that cannot copy).


@dataclass(frozen=True)
class NewObject:
    cls: int
    key_type: int | None
    attrs: Attrs  # stored in clear (no CKA_VALUE)
    value: bytes  # CKA_VALUE, stored only sealed under the card key


def _inconsistent(msg: str) -> ApiError:
    return ApiError("TEMPLATE_INCONSISTENT", msg)


def _check_common(cls: int, t: Attrs, imported: bool = False) -> None:
    """The schema's rules: attributes of the class only, forced values (T, F, I, P)."""
    rules = A.SCHEMA[cls]
    for name, v in t.items():
        flags = rules.get(name)
        if flags is None:
            raise ApiError(
                "ATTRIBUTE_TYPE_INVALID", f"{name} is not an attribute of a {CLASS_NAMES[cls]}"
            )
        if "P" in flags:
            continue
        if "I" in flags and imported:
            if v is not False:
                raise _inconsistent(f"{name} must be false for an imported key")
        elif "T" in flags and v is not True:
            raise _inconsistent(f"{name} must be true (token, private, sensitive objects only)")
        elif "F" in flags and v is not False:
            raise _inconsistent(f"{name} must be false")
    for name in ("CKA_START_DATE", "CKA_END_DATE"):
        d = t.get(name)
        if d is not None and not (d == b"" or (len(d) == 8 and d.isdigit())):  # type: ignore[union-attr, arg-type]
            raise ApiError("ATTRIBUTE_VALUE_INVALID", f"{name} must be empty or YYYYMMDD")


def _base(cls: int, t: Attrs) -> Attrs:
    return {
        "CKA_CLASS": cls,
        "CKA_TOKEN": True,
        # Certificates are private unless asked. Public keys are always public objects:
        # pkcs11-tool --keypairgen --private asks CKA_PRIVATE on both halves, yet OpenSSL's
        # pkcs11-provider and ssh must find the public half before login.
        "CKA_PRIVATE": (
            False
            if cls == C.CKO_PUBLIC_KEY
            else t.get("CKA_PRIVATE", True)
            if A.may_be_public(cls)
            else True
        ),
        "CKA_LABEL": t.get("CKA_LABEL", b""),
        "CKA_MODIFIABLE": t.get("CKA_MODIFIABLE", True),
        "CKA_COPYABLE": t.get("CKA_COPYABLE", True),
        "CKA_DESTROYABLE": True,
    }


def is_public(cls: int, attrs: Attrs) -> bool:
    """A public object (a certificate or public key with CKA_PRIVATE false): its value rests
    unsealed, readable before login."""
    return A.is_public(cls, attrs.get("CKA_PRIVATE"))


def copied_attrs(cls: int, old: Attrs, value: bytes, t: Attrs) -> Attrs:
    """The attributes (without CKA_VALUE) of a copy of an object (C_CopyObject) whose stored
    attributes are `old` and value `value`, made with the template `t`."""
    if old.get("CKA_COPYABLE") is False:
        raise ApiError("ACTION_PROHIBITED", "the object's CKA_COPYABLE is false")
    new = {k: v for k, v in old.items() if k != "CKA_VALUE"}
    for name, v in t.items():
        if name not in CLASS_ATTRS[cls]:
            raise ApiError("ATTRIBUTE_TYPE_INVALID", f"a {CLASS_NAMES[cls]} has no {name}")
        if name in RENAMABLE or (name == "CKA_PRIVATE" and A.may_be_public(cls)):
            new[name] = v
        elif name in ("CKA_COPYABLE", "CKA_MODIFIABLE") and v is False:
            new[name] = v  # the standard lets a copy drop these, never gain them
        elif name == "CKA_VALUE":
            if A.sensitive(cls, "CKA_VALUE") or v != value:
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
    _check_common(cls, t, imported=cls in A.KEY_CLASSES)
    attrs = _base(cls, t)
    if cls == C.CKO_DATA:
        attrs["CKA_APPLICATION"] = _bytes(t, "CKA_APPLICATION")
        attrs["CKA_OBJECT_ID"] = _bytes(t, "CKA_OBJECT_ID")
        return NewObject(cls, None, attrs, _bytes(t, "CKA_VALUE"))
    if cls == C.CKO_CERTIFICATE:
        return _certificate(t, attrs)
    if cls == C.CKO_PRIVATE_KEY:
        return _private_key(keypairs.imported(t), t, attrs, C.CK_UNAVAILABLE_INFORMATION)
    if cls == C.CKO_PUBLIC_KEY:
        raise ApiError("ATTRIBUTE_VALUE_INVALID", "public keys come with their private key")
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
    if mech is None or mech.action is not mechanisms.Action.KEYGEN:
        raise ApiError("MECHANISM_INVALID", f"{mechanism!r} is not a key generation mechanism")
    key_type = mech.gen_key_type
    _check_common(C.CKO_SECRET_KEY, t)
    if "CKA_ALLOWED_MECHANISMS" in t:
        raise _inconsistent("CKA_ALLOWED_MECHANISMS is for key pairs")
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


def _pair_common(
    cls: int, key_type: int, t: Attrs, attrs: Attrs, gen_mech: int, public: Attrs
) -> Attrs:
    local = gen_mech != C.CK_UNAVAILABLE_INFORMATION
    if t.get("CKA_KEY_TYPE", key_type) != key_type:
        raise _inconsistent("CKA_KEY_TYPE does not match the key")
    if t.get("CKA_KEY_GEN_MECHANISM", gen_mech) != gen_mech:
        raise _inconsistent("CKA_KEY_GEN_MECHANISM is set by the service")
    keypairs.check_public_repeats(t, public)
    allowed = t.get("CKA_ALLOWED_MECHANISMS")
    if allowed is not None:
        assert isinstance(allowed, tuple)
        for code in allowed:
            m = mechanisms.by_code(code)
            if m is None or key_type not in m.key_types:
                raise ApiError(
                    "ATTRIBUTE_VALUE_INVALID",
                    f"mechanism 0x{code:X} in CKA_ALLOWED_MECHANISMS is not one for this key",
                )
    attrs.update(
        {
            "CKA_ID": _bytes(t, "CKA_ID"),
            "CKA_START_DATE": _bytes(t, "CKA_START_DATE"),
            "CKA_END_DATE": _bytes(t, "CKA_END_DATE"),
            "CKA_DERIVE": t.get("CKA_DERIVE", False),
            "CKA_LOCAL": local,
            "CKA_KEY_GEN_MECHANISM": gen_mech,
            "CKA_SUBJECT": _bytes(t, "CKA_SUBJECT"),
            **public,
            **keypairs.key_usage(cls, key_type, t),
        }
    )
    if allowed is not None:
        attrs["CKA_ALLOWED_MECHANISMS"] = allowed
    return attrs


def _private_key(key: keypairs.PrivateKey, t: Attrs, attrs: Attrs, gen_mech: int) -> NewObject:
    public = keypairs.public_attrs(key)
    key_type = public["CKA_KEY_TYPE"]
    assert isinstance(key_type, int)
    local = gen_mech != C.CK_UNAVAILABLE_INFORMATION
    # Components are inputs of an import, never stored in clear (the PKCS#8 value holds them).
    given = {n: v for n, v in t.items() if not A.sensitive(C.CKO_PRIVATE_KEY, n)}
    _pair_common(C.CKO_PRIVATE_KEY, key_type, given, attrs, gen_mech, public)
    attrs.update(
        {
            "CKA_SENSITIVE": True,
            "CKA_EXTRACTABLE": False,
            "CKA_ALWAYS_SENSITIVE": local,
            "CKA_NEVER_EXTRACTABLE": local,
            "CKA_WRAP_WITH_TRUSTED": False,
            "CKA_ALWAYS_AUTHENTICATE": False,
        }
    )
    return NewObject(C.CKO_PRIVATE_KEY, key_type, attrs, keypairs.pkcs8(key))


def generated_pair(mechanism: str, pub_t: Attrs, priv_t: Attrs) -> tuple[NewObject, NewObject]:
    """A new key pair (public, private) made with a key pair generation mechanism."""
    mech = mechanisms.by_name(mechanism)
    if mech is None or mech.action is not mechanisms.Action.KEYPAIR:
        raise ApiError("MECHANISM_INVALID", f"{mechanism!r} is not a key pair mechanism")
    inputs = keypairs.GEN_INPUTS
    for cls, t in ((C.CKO_PUBLIC_KEY, pub_t), (C.CKO_PRIVATE_KEY, priv_t)):
        if t.get("CKA_CLASS", cls) != cls:
            raise _inconsistent(f"{mech.name} makes a {CLASS_NAMES[cls]} here (CKA_CLASS)")
        _check_common(cls, {n: v for n, v in t.items() if n not in inputs})
        if "CKA_VALUE" in t:
            raise _inconsistent("CKA_VALUE cannot be given for a generated key")
    key = keypairs.generate(mech, pub_t, priv_t)

    def strip(t: Attrs) -> Attrs:
        return {n: v for n, v in t.items() if n not in inputs}

    priv = _private_key(key, strip(priv_t), _base(C.CKO_PRIVATE_KEY, priv_t), mech.code)
    public = keypairs.public_attrs(key)
    pub_attrs = _pair_common(
        C.CKO_PUBLIC_KEY,
        mech.gen_key_type,
        strip(pub_t),
        _base(C.CKO_PUBLIC_KEY, pub_t),
        mech.code,
        public,
    )
    return NewObject(C.CKO_PUBLIC_KEY, mech.gen_key_type, pub_attrs, b""), priv
