"""What consumers need of objects, through ctypes against the real key service: C_CopyObject
(Java's KeyStore.setKeyEntry), C_SetAttributeValue for CKA_LABEL / CKA_ID (renaming),
C_GetObjectSize, C_GenerateRandom / C_SeedRandom, generic-secret HMAC keys, and public
certificates visible before C_Login (what pkcs11-tool writes and OpenSSL looks up), while keys
and data objects stay private.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
from ctypes import byref

import pytest

from pkcs11ws import constants as C
from pkcs11ws._native import core
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.certs import store_certificate
from tests.support.p11ctypes import CK_ULONG, CKError, Template, mechanism

TOKEN = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]
SECRET = [*TOKEN, (C.CKA_CLASS, C.CKO_SECRET_KEY)]
HMACS = {
    C.CKM_SHA256_HMAC: hashlib.sha256,
    C.CKM_SHA384_HMAC: hashlib.sha384,
    C.CKM_SHA512_HMAC: hashlib.sha512,
}
GENERAL = {
    C.CKM_SHA256_HMAC_GENERAL: hashlib.sha256,
    C.CKM_SHA384_HMAC_GENERAL: hashlib.sha384,
    C.CKM_SHA512_HMAC_GENERAL: hashlib.sha512,
}


def requests() -> int:
    return int(core.current_provider().client.stats()["requests"])  # type: ignore[attr-defined]


def aes(mod, h, value: bytes, label: bytes = b"orig", extra=()) -> int:
    items = [
        *SECRET,
        (C.CKA_KEY_TYPE, C.CKK_AES),
        (C.CKA_LABEL, label),
        (C.CKA_ID, b"\x01"),
        (C.CKA_ENCRYPT, True),
        (C.CKA_DECRYPT, True),
        (C.CKA_VALUE, value),
    ]
    return mod.create(h, [*items, *extra])


def encrypt(mod, h, key: int, data: bytes, iv: bytes = bytes(16)) -> bytes:
    m, _buf = mechanism(C.CKM_AES_CBC_PAD, iv)
    mod.ok("C_EncryptInit", h, byref(m), key)
    return mod.single("C_Encrypt", h, data)


def copy(mod, h, obj: int, items) -> tuple[int, int]:
    t = Template(items)
    new = CK_ULONG()
    return mod.call("C_CopyObject", h, obj, t.array, t.count, byref(new)), new.value


def set_attrs(mod, h, obj: int, items) -> int:
    t = Template(items)
    return mod.call("C_SetAttributeValue", h, obj, t.array, t.count)


def test_copy_object_with_new_label_and_id(mod, logged_card):
    """The copy is a second key with the same value; only the names changed."""
    _, h, _ = logged_card
    value = os.urandom(32)
    key = aes(mod, h, value)
    rv, new = copy(mod, h, key, [*TOKEN, (C.CKA_LABEL, b"alias"), (C.CKA_ID, b"\x02")])
    assert rv == C.CKR_OK and new not in (0, key)
    assert mod.attr(h, new, C.CKA_LABEL) == b"alias" and mod.attr(h, new, C.CKA_ID) == b"\x02"
    assert mod.attr(h, key, C.CKA_LABEL) == b"orig" and mod.attr(h, key, C.CKA_ID) == b"\x01"
    assert mod.attr(h, new, C.CKA_CHECK_VALUE) == mod.attr(h, key, C.CKA_CHECK_VALUE)
    assert encrypt(mod, h, new, b"same key") == encrypt(mod, h, key, b"same key")
    # The service holds both (a search goes to the service, not the module's cache).
    assert mod.find(h, [(C.CKA_LABEL, b"alias")]) == [new]
    assert sorted(mod.find(h, [(C.CKA_CLASS, C.CKO_SECRET_KEY)])) == sorted([key, new])
    # An empty template copies everything.
    rv, twin = copy(mod, h, key, [])
    assert rv == C.CKR_OK and mod.attr(h, twin, C.CKA_LABEL) == b"orig"
    mod.ok("C_DestroyObject", h, key)
    assert encrypt(mod, h, new, b"x") == encrypt(mod, h, twin, b"x")


@pytest.mark.parametrize(
    ("items", "ckr"),
    [
        ([(C.CKA_ENCRYPT, False)], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC)], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_VALUE, bytes(32))], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_EXTRACTABLE, True)], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_TOKEN, False)], C.CKR_TEMPLATE_INCONSISTENT),
        ([(C.CKA_PRIVATE, False)], C.CKR_TEMPLATE_INCONSISTENT),
        ([(C.CKA_APPLICATION, b"x")], C.CKR_ATTRIBUTE_TYPE_INVALID),
        ([(0x80001234, b"x")], C.CKR_ATTRIBUTE_TYPE_INVALID),
        # Unchanged values and the allowed one-way changes are accepted.
        ([(C.CKA_ENCRYPT, True), (C.CKA_SENSITIVE, True), (C.CKA_EXTRACTABLE, False)], C.CKR_OK),
        ([(C.CKA_COPYABLE, False), (C.CKA_MODIFIABLE, False)], C.CKR_OK),
    ],
)
def test_copy_object_rules(mod, logged_card, items, ckr):
    _, h, _ = logged_card
    key = aes(mod, h, os.urandom(16))
    rv, new = copy(mod, h, key, items)
    assert rv == ckr, C.ckr_name(rv)
    if ckr == C.CKR_OK:
        assert mod.attr(h, new, C.CKA_ENCRYPT) == b"\x01"


def test_copy_object_errors(mod, logged_card):
    slot, h, _ = logged_card
    key = aes(mod, h, os.urandom(16), extra=[(C.CKA_COPYABLE, False)])
    assert mod.attr(h, key, C.CKA_COPYABLE) == b"\x00"
    assert copy(mod, h, key, [(C.CKA_LABEL, b"n")])[0] == C.CKR_ACTION_PROHIBITED
    ok = aes(mod, h, os.urandom(16))
    assert copy(mod, h, 999999, [])[0] == C.CKR_OBJECT_HANDLE_INVALID
    ro = mod.open(slot, rw=False)
    assert copy(mod, ro, ok, [])[0] == C.CKR_SESSION_READ_ONLY
    t = Template([])
    assert mod.call("C_CopyObject", h, ok, t.array, 0, None) == C.CKR_ARGUMENTS_BAD
    mod.ok("C_Logout", h)
    assert copy(mod, h, ok, [])[0] == C.CKR_OBJECT_HANDLE_INVALID  # private: not visible


def test_copy_data_object_and_certificate(mod, logged_card):
    _, h, _ = logged_card
    data = mod.create(
        h, [*TOKEN, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_LABEL, b"d"), (C.CKA_VALUE, b"payload")]
    )
    rv, new = copy(mod, h, data, [(C.CKA_LABEL, b"d2")])
    assert rv == C.CKR_OK and mod.attr(h, new, C.CKA_VALUE) == b"payload"
    assert copy(mod, h, data, [(C.CKA_ID, b"1")])[0] == C.CKR_ATTRIBUTE_TYPE_INVALID
    cert, der = store_certificate(mod, h, True, b"pc")
    rv, pub = copy(mod, h, cert, [(C.CKA_PRIVATE, False), (C.CKA_LABEL, b"pc-public")])
    assert rv == C.CKR_OK and mod.attr(h, pub, C.CKA_VALUE) == der
    assert mod.attr(h, pub, C.CKA_PRIVATE) == b"\x00"


def test_set_attribute_value_renames(mod, logged_card):
    _, h, _ = logged_card
    key = aes(mod, h, os.urandom(24))
    assert set_attrs(mod, h, key, [(C.CKA_LABEL, b"renamed"), (C.CKA_ID, b"\x09\x09")]) == 0
    assert mod.attr(h, key, C.CKA_LABEL) == b"renamed"
    assert mod.find(h, [(C.CKA_LABEL, b"renamed"), (C.CKA_ID, b"\x09\x09")]) == [key]
    assert mod.find(h, [(C.CKA_LABEL, b"orig")]) == []
    assert set_attrs(mod, h, key, [(C.CKA_LABEL, b"")]) == C.CKR_OK
    assert mod.find(h, [(C.CKA_LABEL, b"")]) == [key]
    cert, _ = store_certificate(mod, h, False, b"cert-a")
    assert set_attrs(mod, h, cert, [(C.CKA_LABEL, b"cert-b"), (C.CKA_ID, b"\xc2")]) == 0
    assert mod.find(h, [(C.CKA_CLASS, C.CKO_CERTIFICATE), (C.CKA_ID, b"\xc2")]) == [cert]
    r0 = requests()
    assert set_attrs(mod, h, key, []) == C.CKR_OK and requests() == r0


@pytest.mark.parametrize(
    ("items", "ckr"),
    [
        ([(C.CKA_ENCRYPT, False)], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_VALUE, bytes(16))], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_PRIVATE, False)], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_LABEL, b"ok"), (C.CKA_SIGN, True)], C.CKR_ATTRIBUTE_READ_ONLY),
        ([(C.CKA_LABEL, True)], C.CKR_OK),  # one byte is a label like any other
        ([(0x80001234, b"x")], C.CKR_ATTRIBUTE_TYPE_INVALID),
    ],
)
def test_set_attribute_value_rules(mod, logged_card, items, ckr):
    _, h, _ = logged_card
    key = aes(mod, h, os.urandom(16))
    r0 = requests()
    assert set_attrs(mod, h, key, items) == ckr
    if ckr != C.CKR_OK:
        assert requests() == r0  # refused before any round trip
        assert mod.attr(h, key, C.CKA_LABEL) == b"orig"


def test_set_attribute_value_errors(mod, logged_card):
    slot, h, _ = logged_card
    fixed = aes(mod, h, os.urandom(16), extra=[(C.CKA_MODIFIABLE, False)])
    assert set_attrs(mod, h, fixed, [(C.CKA_LABEL, b"x")]) == C.CKR_ACTION_PROHIBITED
    data = mod.create(h, [*TOKEN, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_VALUE, b"v")])
    assert set_attrs(mod, h, data, [(C.CKA_LABEL, b"data")]) == C.CKR_OK
    assert set_attrs(mod, h, data, [(C.CKA_ID, b"1")]) == C.CKR_ATTRIBUTE_TYPE_INVALID
    ro = mod.open(slot, rw=False)
    assert set_attrs(mod, ro, data, [(C.CKA_LABEL, b"x")]) == C.CKR_SESSION_READ_ONLY
    assert set_attrs(mod, h, 999999, [(C.CKA_LABEL, b"x")]) == C.CKR_OBJECT_HANDLE_INVALID
    mod.ok("C_Logout", h)
    assert set_attrs(mod, h, data, [(C.CKA_LABEL, b"x")]) == C.CKR_OBJECT_HANDLE_INVALID


def test_object_size(mod, logged_card):
    _, h, _ = logged_card
    n = CK_ULONG()
    sizes = {}
    for length in (10, 1000):
        obj = mod.create(h, [*TOKEN, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_VALUE, b"v" * length)])
        r0 = requests()
        mod.ok("C_GetObjectSize", h, obj, byref(n))
        assert requests() == r0
        sizes[length] = n.value
    assert sizes[1000] - sizes[10] == 990
    key = aes(mod, h, os.urandom(32))
    mod.ok("C_GetObjectSize", h, key, byref(n))
    assert n.value > 32 + 16 * 20  # the secret value and some twenty attributes
    assert mod.call("C_GetObjectSize", h, 999999, byref(n)) == C.CKR_OBJECT_HANDLE_INVALID


def test_random_and_seed(mod, logged_card):
    _, h, _ = logged_card
    bufs = []
    for size in (1, 32, 70000):  # 70000: more than one request to the service
        buf = ctypes.create_string_buffer(size)
        mod.ok("C_GenerateRandom", h, buf, size)
        bufs.append(buf.raw)
    assert len(set(bufs[2][i : i + 32] for i in range(0, 70000, 32))) > 2000
    again = ctypes.create_string_buffer(32)
    mod.ok("C_GenerateRandom", h, again, 32)
    assert again.raw != bufs[1]
    assert mod.call("C_SeedRandom", h, b"seed", 4) == C.CKR_RANDOM_SEED_NOT_SUPPORTED
    assert mod.call("C_GenerateRandom", 999999, again, 32) == C.CKR_SESSION_HANDLE_INVALID


def test_generic_secret_hmac_keys(mod, logged_card):
    """CKK_GENERIC_SECRET keys (pkcs11-tool's GENERIC:n, Java's imported Hmac keys) work with
    every HMAC mechanism, generated or imported (then compared with the hmac module)."""
    _, h, _ = logged_card
    usage = [(C.CKA_SIGN, True), (C.CKA_VERIFY, True)]
    gen = mod.generate(
        h,
        C.CKM_GENERIC_SECRET_KEY_GEN,
        [*SECRET, (C.CKA_KEY_TYPE, C.CKK_GENERIC_SECRET), (C.CKA_VALUE_LEN, 32), *usage],
    )
    assert int.from_bytes(mod.attr(h, gen, C.CKA_KEY_TYPE), "little") == C.CKK_GENERIC_SECRET
    value = os.urandom(40)
    imp = mod.create(
        h, [*SECRET, (C.CKA_KEY_TYPE, C.CKK_GENERIC_SECRET), (C.CKA_VALUE, value), *usage]
    )
    msg = os.urandom(300)
    for mech, digest in {**HMACS, **GENERAL}.items():
        full = digest().digest_size
        size = full if mech in HMACS else full // 2 + 1
        param = None if mech in HMACS else size
        m, _buf = mechanism(mech, param)
        mod.ok("C_SignInit", h, byref(m), imp)
        mac = mod.single("C_Sign", h, msg)
        assert mac == hmac.new(value, msg, digest).digest()[:size]
        mod.ok("C_SignInit", h, byref(m), gen)
        mac = mod.single("C_Sign", h, msg)
        assert len(mac) == size
        mod.ok("C_VerifyInit", h, byref(m), gen)
        mod.ok("C_Verify", h, msg, len(msg), mac, len(mac))
        mod.ok("C_VerifyInit", h, byref(m), gen)
        bad = bytes([mac[0] ^ 1]) + mac[1:]
        assert mod.call("C_Verify", h, msg, len(msg), bad, len(bad)) == C.CKR_SIGNATURE_INVALID


def test_public_certificate_visible_before_login(mod, logged_card, service):
    slot, h, pin = logged_card
    pub, der = store_certificate(mod, h, False, b"public-cert", b"\x51")
    priv, _ = store_certificate(mod, h, True, b"private-cert", b"\x52")
    data = mod.create(h, [*TOKEN, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_LABEL, b"secret data")])
    key = aes(mod, h, os.urandom(16))
    everything = mod.find(h, [])
    assert {pub, priv, data, key} <= set(everything)
    mod.ok("C_Logout", h)
    # Logged out: exactly the public certificate, in any session of the slot.
    s2 = mod.open(slot, rw=False)
    for sess in (h, s2):
        assert mod.find(sess, []) == [pub]
        assert mod.find(sess, [(C.CKA_CLASS, C.CKO_CERTIFICATE)]) == [pub]
        assert mod.find(sess, [(C.CKA_CLASS, C.CKO_CERTIFICATE), (C.CKA_PRIVATE, True)]) == []
        assert mod.find(sess, [(C.CKA_CLASS, C.CKO_SECRET_KEY)]) == []
        assert mod.find(sess, [(C.CKA_ID, b"\x51")]) == [pub]
    assert mod.attr(s2, pub, C.CKA_VALUE) == der
    assert mod.attr(s2, pub, C.CKA_LABEL) == b"public-cert"
    with pytest.raises(CKError) as e:
        mod.attr(s2, priv, C.CKA_VALUE)
    assert e.value.rv == C.CKR_OBJECT_HANDLE_INVALID
    n = CK_ULONG()
    mod.ok("C_GetObjectSize", s2, pub, byref(n))
    assert n.value > len(der)
    assert mod.call("C_GetObjectSize", s2, key, byref(n)) == C.CKR_OBJECT_HANDLE_INVALID
    # Changing a public object still needs the login.
    assert mod.call("C_DestroyObject", h, pub) == C.CKR_USER_NOT_LOGGED_IN
    assert set_attrs(mod, h, pub, [(C.CKA_LABEL, b"x")]) == C.CKR_USER_NOT_LOGGED_IN
    # The service answers the public search without an activation token, and only with it.
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    try:
        card_id = next(c["id"] for c in client.list_softcards() if c["name"] == mod_label(mod, s2))
        found = client.search_public(card_id, {})
        assert [o["attrs"]["CKA_VALUE"] for o in found] == [der]
    finally:
        client.close()
    assert mod.login(h, pin) == C.CKR_OK
    assert set(mod.find(h, [])) == set(everything)


def mod_label(mod, session: int) -> str:
    from tests.support.p11ctypes import CK_SESSION_INFO, text

    info = CK_SESSION_INFO()
    mod.ok("C_GetSessionInfo", session, byref(info))
    return text(mod.token_info(info.slotID).label)


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        (C.CKO_DATA, []),
        (C.CKO_SECRET_KEY, [(C.CKA_KEY_TYPE, C.CKK_AES), (C.CKA_VALUE, bytes(16))]),
    ],
)
def test_keys_and_data_stay_private(mod, logged_card, cls, extra):
    _, h, _ = logged_card
    t = Template([(C.CKA_TOKEN, True), (C.CKA_PRIVATE, False), (C.CKA_CLASS, cls), *extra])
    out = CK_ULONG()
    assert mod.call("C_CreateObject", h, t.array, t.count, byref(out)) == (
        C.CKR_TEMPLATE_INCONSISTENT
    )
