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
(The signing rows are tested by consumers: tests/consumers/test_consumer_python_pkcs11_asym.py
signs with every hash-and-sign row.)
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from ctypes import byref
from typing import Any

import pytest

from pkcs11ws import attributes as A
from pkcs11ws import constants as C
from pkcs11ws import mechanisms as M
from pkcs11ws import protocol
from tests.support.cards import client_card
from tests.support.dropin_util import self_signed
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
        C.CKO_DATA: [*BASE, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_LABEL, b"schema data"),
                     (C.CKA_VALUE, b"data")],
        C.CKO_CERTIFICATE: [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, False),
                            (C.CKA_CLASS, C.CKO_CERTIFICATE),
                            (C.CKA_CERTIFICATE_TYPE, C.CKC_X_509),
                            (C.CKA_SUBJECT, b"0\x00"), (C.CKA_VALUE, der)],
        C.CKO_SECRET_KEY: [*BASE, (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_KEY_TYPE, C.CKK_AES),
                           (C.CKA_VALUE, bytes(range(16))), (C.CKA_ENCRYPT, True)],
    }  # fmt: skip


def _pair_templates() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    pub = [(C.CKA_TOKEN, True), (C.CKA_EC_PARAMS, P256), (C.CKA_VERIFY, True)]
    priv = [*BASE, (C.CKA_SIGN, True)]
    return pub, priv


def _generate_pair(mod: Module, h: int, pub: list[Any], priv: list[Any]) -> tuple[int, int]:
    mech, _keep = mechanism(C.CKM_EC_KEY_PAIR_GEN)
    tpub, tpriv = Template(pub), Template(priv)
    hpub, hpriv = CK_ULONG(), CK_ULONG()
    rv = mod.call("C_GenerateKeyPair", h, byref(mech), tpub.arr, tpub.count, tpriv.arr,
                  tpriv.count, byref(hpub), byref(hpriv))  # fmt: skip
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
    assert (info.ulMinKeySize, info.ulMaxKeySize, info.flags) == (row.min_key, row.max_key,
                                                                  row.flags)  # fmt: skip


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
    assert mod.call("C_SetAttributeValue", h, objects[cls], t.arr, t.count) == (
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
    rv = mod.call("C_CreateObject", h, t.arr, t.count, byref(out))
    assert rv == C.CKR_TEMPLATE_INCONSISTENT, hex(rv)
