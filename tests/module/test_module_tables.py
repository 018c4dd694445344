"""The mechanism table and the attribute schema as the tests' parameter lists, through the built
module against the real key service: a row added to pkcs11ws/mechanisms.py or an attribute added
to a class of pkcs11ws/attributes.py brings its tests by being added.

- every mechanism row: C_GetMechanismInfo answers the row's flags and key sizes;
- every sensitive (S) attribute of a class: C_GetAttributeValue answers CKR_ATTRIBUTE_SENSITIVE
  on an object of that class (and the length CK_UNAVAILABLE_INFORMATION);
- every attribute of a class but CKA_LABEL and CKA_ID: C_SetAttributeValue answers
  CKR_ATTRIBUTE_READ_ONLY;
- every forced value (T, F, and I for imports) given the other way at creation:
  CKR_TEMPLATE_INCONSISTENT.
- every signing row (CKF_SIGN) but the hash-and-sign RSA/ECDSA rows (python-pkcs11 signs with each
  of those in tests/consumers/test_consumer_python_pkcs11_asym.py): C_Sign through the module, the
  result checked outside it (hmac, cryptography), C_Verify accepts it and refuses a changed one.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
from collections.abc import Iterator
from ctypes import byref
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from pkcs11ws import attributes as A
from pkcs11ws import constants as C
from pkcs11ws import mechanisms as M
from pkcs11ws import protocol
from pkcs11ws.abi_ctypes import CK_RSA_PKCS_PSS_PARAMS
from tests.support.cards import client_card
from tests.support.certs import self_signed
from tests.support.p11ctypes import (
    CK_ATTRIBUTE,
    CK_MECHANISM_INFO,
    CK_ULONG,
    Module,
    Template,
    mechanism,
    ulong_bytes,
)
from tests.support.service import Service

P256 = bytes.fromhex("06082a8648ce3d030107")
UNAVAILABLE = ctypes.c_ulong(-1).value  # CK_UNAVAILABLE_INFORMATION
BASE: list[tuple[int, Any]] = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]


def _code(name: str) -> int:
    return int(getattr(C, name))


def _templates() -> dict[int, list[tuple[int, Any]]]:
    """A valid C_CreateObject template per class that C_CreateObject makes."""
    der, _, _ = self_signed("schema cert")
    return {
        C.CKO_DATA: [
            *BASE,
            (C.CKA_CLASS, C.CKO_DATA),
            (C.CKA_LABEL, b"schema data"),
            (C.CKA_VALUE, b"data"),
        ],
        C.CKO_CERTIFICATE: [
            (C.CKA_TOKEN, True),
            (C.CKA_PRIVATE, False),
            (C.CKA_CLASS, C.CKO_CERTIFICATE),
            (C.CKA_CERTIFICATE_TYPE, C.CKC_X_509),
            (C.CKA_SUBJECT, b"0\x00"),
            (C.CKA_VALUE, der),
        ],
        C.CKO_SECRET_KEY: [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_VALUE, bytes(range(16))),
            (C.CKA_ENCRYPT, True),
        ],
    }


def _pair_templates() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    pub = [(C.CKA_TOKEN, True), (C.CKA_EC_PARAMS, P256), (C.CKA_VERIFY, True)]
    priv = [*BASE, (C.CKA_SIGN, True)]
    return pub, priv


def _generate_pair(mod: Module, h: int, pub: list[Any], priv: list[Any]) -> tuple[int, int]:
    mech, _keep = mechanism(C.CKM_EC_KEY_PAIR_GEN)
    tpub, tpriv = Template(pub), Template(priv)
    hpub, hpriv = CK_ULONG(), CK_ULONG()
    rv = mod.call(
        "C_GenerateKeyPair",
        h,
        byref(mech),
        tpub.array,
        tpub.count,
        tpriv.array,
        tpriv.count,
        byref(hpub),
        byref(hpriv),
    )
    if rv != C.CKR_OK:
        raise ValueError(rv)  # the CKR, for the caller to compare
    return hpub.value, hpriv.value


@pytest.fixture(scope="module")
def schema_objects(mod: Module, service: Service) -> Iterator[tuple[int, int, dict[int, int]]]:
    """A logged-in read-write session on a fresh softcard holding one object of each class:
    (slot, session, {class: handle})."""
    name, pin = client_card(service.client_cfg, "sch")
    slot = mod.slot_by_label(name)
    h = mod.open(slot)
    assert mod.login(h, pin.encode()) == C.CKR_OK
    objects = {cls: mod.create(h, t) for cls, t in _templates().items()}
    pub, priv = _generate_pair(mod, h, *_pair_templates())
    objects[C.CKO_PUBLIC_KEY], objects[C.CKO_PRIVATE_KEY] = pub, priv
    assert set(objects) == set(A.SCHEMA), "a class of the schema has no object here"
    yield slot, h, objects
    mod.call("C_CloseAllSessions", slot)


@pytest.mark.parametrize("row", M.MECHANISMS, ids=lambda m: m.name)
def test_mechanism_info_is_the_row(mod: Module, schema_objects: Any, row: M.Mechanism) -> None:
    slot, _, _ = schema_objects
    info = CK_MECHANISM_INFO()
    mod.ok("C_GetMechanismInfo", slot, row.code, byref(info))
    assert (info.ulMinKeySize, info.ulMaxKeySize, info.flags) == (
        row.min_key,
        row.max_key,
        row.flags,
    )


SENSITIVE = [(cls, n) for cls in A.SCHEMA for n in A.having(cls, "S")]
READ_ONLY = [(cls, n) for cls in A.SCHEMA for n in A.SCHEMA[cls] if n not in A.RENAMABLE]


def _id(case: tuple[int, str]) -> str:
    return f"{A.CLASS_NAMES[case[0]].replace(' ', '_')}-{case[1]}"


@pytest.mark.parametrize("case", SENSITIVE, ids=_id)
def test_sensitive_attribute_is_never_read(
    mod: Module, schema_objects: Any, case: tuple[int, str]
) -> None:
    cls, name = case
    _, h, objects = schema_objects
    a = CK_ATTRIBUTE(_code(name), None, 0)
    assert mod.call("C_GetAttributeValue", h, objects[cls], byref(a), 1) == (
        C.CKR_ATTRIBUTE_SENSITIVE
    )
    assert a.ulValueLen == UNAVAILABLE


def _some_value(name: str) -> Any:
    kind = protocol.ATTR_BY_NAME[name].kind
    # A well-formed value of the attribute's kind (ULONGS: one CK_ULONG as raw bytes).
    return {protocol.BOOL: True, protocol.ULONG: 1, protocol.ULONGS: ulong_bytes(1)}.get(kind, b"x")


@pytest.mark.parametrize("case", READ_ONLY, ids=_id)
def test_only_label_and_id_change(mod: Module, schema_objects: Any, case: tuple[int, str]) -> None:
    cls, name = case
    _, h, objects = schema_objects
    t = Template([(_code(name), _some_value(name))])
    assert mod.call("C_SetAttributeValue", h, objects[cls], t.array, t.count) == (
        C.CKR_ATTRIBUTE_READ_ONLY
    )


def _forced() -> list[tuple[int, str, bool]]:
    """(class, attribute, the value the schema refuses at creation) for every forced value.
    C_CreateObject imports (I: must read false), C_GenerateKeyPair makes the key pairs."""
    out = []
    for cls, rules in A.SCHEMA.items():
        imported = cls not in (C.CKO_PUBLIC_KEY, C.CKO_PRIVATE_KEY)
        for name, flags in rules.items():
            if "P" in flags:
                continue
            if "I" in flags and imported:
                out.append((cls, name, True))
            elif "T" in flags:
                out.append((cls, name, False))
            elif "F" in flags:
                out.append((cls, name, True))
    return out


@pytest.mark.parametrize("case", _forced(), ids=lambda c: f"{_id(c[:2])}={c[2]}")
def test_forced_value_refused_at_creation(
    mod: Module, schema_objects: Any, case: tuple[int, str, bool]
) -> None:
    cls, name, wrong = case
    _, h, _ = schema_objects
    code = _code(name)
    if cls in (C.CKO_PUBLIC_KEY, C.CKO_PRIVATE_KEY):
        pub, priv = _pair_templates()
        half = pub if cls == C.CKO_PUBLIC_KEY else priv
        half[:] = [(t, v) for t, v in half if t != code] + [(code, wrong)]
        with pytest.raises(ValueError) as err:
            _generate_pair(mod, h, pub, priv)
        assert err.value.args[0] == C.CKR_TEMPLATE_INCONSISTENT, hex(err.value.args[0])
        return
    items = [(t, v) for t, v in _templates()[cls] if t != code] + [(code, wrong)]
    t = Template(items)
    out = CK_ULONG()
    rv = mod.call("C_CreateObject", h, t.array, t.count, byref(out))
    assert rv == C.CKR_TEMPLATE_INCONSISTENT, hex(rv)


SIGN_ROWS = [
    m
    for m in M.MECHANISMS
    if m.flags & C.CKF_SIGN and not (m.family in (M.Family.RSA, M.Family.EC) and m.digest)
]
MAC_KEY = bytes(range(40))


@pytest.fixture(scope="module")
def sign_keys(mod: Module, schema_objects: Any) -> dict[int, tuple[int, int, Any]]:
    """Per key type: (signing key, verifying key, cryptography's public key or the MAC key)."""
    _, h, objects = schema_objects
    keys: dict[int, tuple[int, int, Any]] = {}
    for kt in {m.key_types[0] for m in SIGN_ROWS if m.family is M.Family.HMAC}:
        k = mod.create(
            h,
            [
                *BASE,
                (C.CKA_CLASS, C.CKO_SECRET_KEY),
                (C.CKA_KEY_TYPE, kt),
                (C.CKA_SIGN, True),
                (C.CKA_VERIFY, True),
                (C.CKA_VALUE, MAC_KEY),
            ],
        )
        keys[kt] = (k, k, MAC_KEY)
    pub = objects[C.CKO_PUBLIC_KEY]
    keys[C.CKK_EC] = (objects[C.CKO_PRIVATE_KEY], pub, _public(mod, h, pub))
    mech, _keep = mechanism(C.CKM_RSA_PKCS_KEY_PAIR_GEN)
    tpub = Template([(C.CKA_TOKEN, True), (C.CKA_MODULUS_BITS, 2048), (C.CKA_VERIFY, True)])
    tpriv = Template([*BASE, (C.CKA_SIGN, True)])
    hpub, hpriv = CK_ULONG(), CK_ULONG()
    mod.ok(
        "C_GenerateKeyPair",
        h,
        byref(mech),
        tpub.array,
        tpub.count,
        tpriv.array,
        tpriv.count,
        byref(hpub),
        byref(hpriv),
    )
    keys[C.CKK_RSA] = (hpriv.value, hpub.value, _public(mod, h, hpub.value))
    return keys


def _public(mod: Module, h: int, pub: int) -> Any:
    return serialization.load_der_public_key(mod.attr(h, pub, C.CKA_PUBLIC_KEY_INFO))


def _sign_and_verify(
    mod: Module, h: int, keys: tuple[int, int, Any], mech: Any, data: bytes
) -> bytes:
    sign_key, verify_key, _ = keys
    mod.ok("C_SignInit", h, byref(mech), sign_key)
    first = mod.single("C_Sign", h, data)  # the provider's path (or the last row's entry)
    mod.ok("C_SignInit", h, byref(mech), sign_key)
    sig = mod.single("C_Sign", h, data)  # the core's fast path where the row allows it
    for s in (first, sig):
        mod.ok("C_VerifyInit", h, byref(mech), verify_key)
        assert mod.call("C_Verify", h, data, len(data), s, len(s)) == C.CKR_OK
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    mod.ok("C_VerifyInit", h, byref(mech), verify_key)
    assert mod.call("C_Verify", h, data, len(data), bad, len(bad)) in (
        C.CKR_SIGNATURE_INVALID,
        C.CKR_SIGNATURE_LEN_RANGE,
    )
    return sig


@pytest.mark.parametrize("row", SIGN_ROWS, ids=lambda m: m.name)
def test_sign_row_signs_and_verifies(
    mod: Module, schema_objects: Any, sign_keys: Any, row: M.Mechanism
) -> None:
    _, h, _ = schema_objects
    data = os.urandom(200)
    if row.family is M.Family.HMAC:
        keys = sign_keys[row.key_types[0]]
        length = row.out_len // 2 if row.param is M.Param.MAC_LEN else row.out_len
        mech, _keep = mechanism(row.code, length if row.param is M.Param.MAC_LEN else None)
        sig = _sign_and_verify(mod, h, keys, mech, data)
        assert sig == hmac.new(MAC_KEY, data, row.digest).digest()[:length]
        return
    digest = hashlib.sha256(data).digest()
    if row.family is M.Family.EC:
        keys = sign_keys[C.CKK_EC]
        mech, _keep = mechanism(row.code)
        sig = _sign_and_verify(mod, h, keys, mech, digest)
        n = len(sig) // 2
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big")
        )
        keys[2].verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return
    keys = sign_keys[C.CKK_RSA]
    assert row.family is M.Family.RSA, f"{row.name}: a signing family this test does not know"
    if row.param is M.Param.RSA_PSS:
        params = CK_RSA_PKCS_PSS_PARAMS(C.CKM_SHA256, C.CKG_MGF1_SHA256, 32)
        mech, _keep = mechanism(
            row.code, ctypes.string_at(ctypes.addressof(params), ctypes.sizeof(params))
        )
        sig = _sign_and_verify(mod, h, keys, mech, digest)
        keys[2].verify(
            sig,
            digest,
            padding.PSS(padding.MGF1(hashes.SHA256()), 32),
            utils.Prehashed(hashes.SHA256()),
        )
        return
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    mech, _keep = mechanism(row.code)
    sig = _sign_and_verify(mod, h, keys, mech, info)
    keys[2].verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
