"""libpkcs11ws.so objects and cryptography through ctypes against the real key service.

Known-answer checks import a key (C_CreateObject with CKA_VALUE) and compare with the
`cryptography` package / hmac; generated keys are checked by round trips. The two-call length
convention and the attribute cache are checked to cost no round trip (the client's counters).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import threading
import uuid
from ctypes import byref
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws._native import core
from tests.support.p11ctypes import (
    CK_ATTRIBUTE,
    CK_ULONG,
    CKError,
    Module,
    Template,
    mechanism,
    ulong_bytes,
)

TRUE = True
KEY_BASE = [(C.CKA_TOKEN, TRUE), (C.CKA_PRIVATE, TRUE)]


def requests() -> int:
    prov = core.current_provider()
    return int(prov.client.stats()["requests"])  # type: ignore[attr-defined]


def aes_key(mod, h, value: bytes | None = None, **flags: bool) -> int:
    usage = {C.CKA_ENCRYPT: flags.get("encrypt", True), C.CKA_DECRYPT: flags.get("decrypt", True)}
    items = [
        *KEY_BASE,
        (C.CKA_CLASS, C.CKO_SECRET_KEY),
        (C.CKA_KEY_TYPE, C.CKK_AES),
        (C.CKA_LABEL, b"aes"),
        (C.CKA_ID, b"\x01"),
        *usage.items(),
    ]
    if value is None:
        return mod.generate(h, C.CKM_AES_KEY_GEN, [*items, (C.CKA_VALUE_LEN, 32)])
    return mod.create(h, [*items, (C.CKA_VALUE, value)])


def hmac_key(mod, h, value: bytes) -> int:
    items = [
        *KEY_BASE,
        (C.CKA_CLASS, C.CKO_SECRET_KEY),
        (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC),
        (C.CKA_LABEL, b"mac"),
        (C.CKA_SIGN, True),
        (C.CKA_VERIFY, True),
    ]
    return mod.create(h, [*items, (C.CKA_VALUE, value)])


def cbc(key: bytes, iv: bytes, data: bytes, pad: bool) -> bytes:
    if pad:
        p = padding.PKCS7(128).padder()
        data = p.update(data) + p.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def test_generate_aes_and_round_trip(mod, logged_card):
    _, h, _ = logged_card
    key = aes_key(mod, h)
    assert mod.attr(h, key, C.CKA_VALUE_LEN) == ulong_bytes(32)
    assert mod.attr(h, key, C.CKA_KEY_TYPE) == ulong_bytes(C.CKK_AES)
    assert mod.attr(h, key, C.CKA_LOCAL) == b"\x01"
    iv = os.urandom(16)
    m, _buf = mechanism(C.CKM_AES_CBC_PAD, iv)
    for size in (0, 1, 15, 16, 17, 1000):
        data = os.urandom(size)
        mod.ok("C_EncryptInit", h, byref(m), key)
        ct = mod.single("C_Encrypt", h, data)
        assert len(ct) == (size // 16 + 1) * 16
        mod.ok("C_DecryptInit", h, byref(m), key)
        assert mod.single("C_Decrypt", h, ct) == data


def test_known_answer_aes_cbc_and_cbc_pad(mod, logged_card):
    _, h, _ = logged_card
    value = os.urandom(32)
    key = aes_key(mod, h, value)
    iv = os.urandom(16)
    data = os.urandom(48)
    for mech, pad in ((C.CKM_AES_CBC, False), (C.CKM_AES_CBC_PAD, True)):
        m, _buf = mechanism(mech, iv)
        mod.ok("C_EncryptInit", h, byref(m), key)
        ct = mod.single("C_Encrypt", h, data)
        assert ct == cbc(value, iv, data, pad)
        mod.ok("C_DecryptInit", h, byref(m), key)
        assert mod.single("C_Decrypt", h, ct) == data


def test_length_queries_cost_no_round_trip(mod, logged_card):
    _, h, _ = logged_card
    key = aes_key(mod, h)
    iv = os.urandom(16)
    m, _buf = mechanism(C.CKM_AES_CBC_PAD, iv)
    data = os.urandom(33)
    n = CK_ULONG()
    r0 = requests()
    mod.ok("C_EncryptInit", h, byref(m), key)
    mod.ok("C_Encrypt", h, data, len(data), None, byref(n))
    assert n.value == 48
    # Too small: CKR_BUFFER_TOO_SMALL with the size, and the operation stays active.
    small = ctypes.create_string_buffer(16)
    n.value = 16
    assert mod.call("C_Encrypt", h, data, len(data), small, byref(n)) == C.CKR_BUFFER_TOO_SMALL
    assert n.value == 48
    assert requests() == r0
    out = ctypes.create_string_buffer(48)
    mod.ok("C_Encrypt", h, data, len(data), out, byref(n))
    assert requests() == r0 + 1
    ct = out.raw[: n.value]
    # The operation ended: a further C_Encrypt is not initialised.
    assert mod.call("C_Encrypt", h, data, len(data), out, byref(n)) == (
        C.CKR_OPERATION_NOT_INITIALIZED
    )

    # CBC-PAD decryption: the input length is the bound; the exact length comes back.
    mod.ok("C_DecryptInit", h, byref(m), key)
    mod.ok("C_Decrypt", h, ct, len(ct), None, byref(n))
    assert n.value == len(ct)
    assert requests() == r0 + 1
    out = ctypes.create_string_buffer(48)
    mod.ok("C_Decrypt", h, ct, len(ct), out, byref(n))
    assert out.raw[: n.value] == data and requests() == r0 + 2

    # A buffer big enough for the plaintext but below the bound works in one request; one too
    # small for it keeps the result, and the retry costs nothing.
    mod.ok("C_DecryptInit", h, byref(m), key)
    out = ctypes.create_string_buffer(40)
    n.value = 40
    mod.ok("C_Decrypt", h, ct, len(ct), out, byref(n))
    assert out.raw[: n.value] == data and requests() == r0 + 3
    mod.ok("C_DecryptInit", h, byref(m), key)
    out = ctypes.create_string_buffer(20)
    n.value = 20
    assert mod.call("C_Decrypt", h, ct, len(ct), out, byref(n)) == C.CKR_BUFFER_TOO_SMALL
    assert n.value == 33 and requests() == r0 + 4
    out = ctypes.create_string_buffer(33)
    mod.ok("C_Decrypt", h, ct, len(ct), out, byref(n))
    assert out.raw[: n.value] == data and requests() == r0 + 4


def test_cipher_errors(mod, logged_card, client):
    _, h, _ = logged_card
    key = aes_key(mod, h)
    iv = os.urandom(16)
    m, _buf = mechanism(C.CKM_AES_CBC, iv)
    out = ctypes.create_string_buffer(64)
    n = CK_ULONG(64)
    mod.ok("C_EncryptInit", h, byref(m), key)
    assert mod.call("C_EncryptInit", h, byref(m), key) == C.CKR_OPERATION_ACTIVE
    assert mod.call("C_Encrypt", h, b"x" * 15, 15, out, byref(n)) == C.CKR_DATA_LEN_RANGE
    assert mod.call("C_Encrypt", h, b"x" * 16, 16, out, byref(n)) == (
        C.CKR_OPERATION_NOT_INITIALIZED
    )  # the error ended the operation
    mod.ok("C_DecryptInit", h, byref(m), key)
    assert mod.call("C_Decrypt", h, b"x" * 17, 17, out, byref(n)) == (
        C.CKR_ENCRYPTED_DATA_LEN_RANGE
    )
    pad, _b2 = mechanism(C.CKM_AES_CBC_PAD, iv)
    mod.ok("C_DecryptInit", h, byref(pad), key)
    n.value = 64
    assert mod.call("C_Decrypt", h, os.urandom(32), 32, out, byref(n)) in (
        C.CKR_ENCRYPTED_DATA_INVALID,
        C.CKR_OK,
    )  # random data: padding almost always bad
    for bad_iv in (None, b"short"):
        bm, _b3 = mechanism(C.CKM_AES_CBC, bad_iv)
        assert mod.call("C_EncryptInit", h, byref(bm), key) == C.CKR_MECHANISM_PARAM_INVALID
    sm, _ = mechanism(C.CKM_SHA256_HMAC)
    assert mod.call("C_EncryptInit", h, byref(sm), key) == C.CKR_MECHANISM_INVALID
    assert mod.call("C_EncryptInit", h, None, key) == C.CKR_ARGUMENTS_BAD
    assert mod.call("C_EncryptInit", h, byref(m), 999999) == C.CKR_KEY_HANDLE_INVALID
    assert mod.call("C_Encrypt", h, b"", 0, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED
    enc_only = aes_key(mod, h, decrypt=False)
    assert mod.call("C_DecryptInit", h, byref(m), enc_only) == C.CKR_KEY_FUNCTION_NOT_PERMITTED
    mac = hmac_key(mod, h, os.urandom(32))
    assert mod.call("C_EncryptInit", h, byref(m), mac) == C.CKR_KEY_TYPE_INCONSISTENT
    # Not logged in: the handle is known, its use is not allowed.
    mod.ok("C_Logout", h)
    assert mod.call("C_EncryptInit", h, byref(m), key) == C.CKR_USER_NOT_LOGGED_IN


def test_hmac_sign_verify_known_answer(mod, logged_card):
    _, h, _ = logged_card
    value = os.urandom(32)
    key = hmac_key(mod, h, value)
    data = os.urandom(100)
    want = hmac.new(value, data, hashlib.sha256).digest()
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    mod.ok("C_SignInit", h, byref(m), key)
    r0 = requests()
    assert mod.single("C_Sign", h, data) == want
    assert requests() == r0 + 1  # the length query was answered locally
    mod.ok("C_VerifyInit", h, byref(m), key)
    mod.ok("C_Verify", h, data, len(data), want, len(want))
    bad = bytes([want[0] ^ 1]) + want[1:]
    mod.ok("C_VerifyInit", h, byref(m), key)
    assert mod.call("C_Verify", h, data, len(data), bad, len(bad)) == C.CKR_SIGNATURE_INVALID
    mod.ok("C_VerifyInit", h, byref(m), key)
    assert mod.call("C_Verify", h, data, len(data), want, 31) == C.CKR_SIGNATURE_LEN_RANGE
    # _GENERAL: a truncated MAC of the requested length (half to full size).
    g, _gb = mechanism(C.CKM_SHA256_HMAC_GENERAL, 20)
    mod.ok("C_SignInit", h, byref(g), key)
    assert mod.single("C_Sign", h, data) == want[:20]
    mod.ok("C_VerifyInit", h, byref(g), key)
    mod.ok("C_Verify", h, data, len(data), want[:20], 20)
    for bad_len in (15, 33):
        bg, _bb = mechanism(C.CKM_SHA256_HMAC_GENERAL, bad_len)
        assert mod.call("C_SignInit", h, byref(bg), key) == C.CKR_MECHANISM_PARAM_INVALID
    # Empty input through a NULL pointer (PyKCS11 does that).
    mod.ok("C_SignInit", h, byref(m), key)
    assert mod.single("C_Sign", h, b"") == hmac.new(value, b"", hashlib.sha256).digest()


def test_generated_hmac_keys(mod, logged_card):
    _, h, _ = logged_card
    for mech, kt in (
        (C.CKM_SHA256_KEY_GEN, C.CKK_SHA256_HMAC),
        (C.CKM_GENERIC_SECRET_KEY_GEN, C.CKK_GENERIC_SECRET),
    ):
        key = mod.generate(
            h,
            mech,
            [
                *KEY_BASE,
                (C.CKA_CLASS, C.CKO_SECRET_KEY),
                (C.CKA_SIGN, True),
                (C.CKA_VERIFY, True),
                (C.CKA_VALUE_LEN, 32),
            ],
        )
        assert mod.attr(h, key, C.CKA_KEY_TYPE) == ulong_bytes(kt)
        m, _ = mechanism(C.CKM_SHA256_HMAC)
        mod.ok("C_SignInit", h, byref(m), key)
        mac = mod.single("C_Sign", h, b"message")
        mod.ok("C_VerifyInit", h, byref(m), key)
        mod.ok("C_Verify", h, b"message", 7, mac, len(mac))


def test_template_policy_before_any_request(mod, logged_card):
    _, h, _ = logged_card
    aes = [(C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_KEY_TYPE, C.CKK_AES), (C.CKA_VALUE_LEN, 16)]
    r0 = requests()
    cases: list[tuple[list[tuple[int, Any]], int]] = [
        ([(C.CKA_PRIVATE, True), *aes], C.CKR_TEMPLATE_INCOMPLETE),
        ([(C.CKA_TOKEN, True), *aes], C.CKR_TEMPLATE_INCOMPLETE),
        ([(C.CKA_TOKEN, False), (C.CKA_PRIVATE, True), *aes], C.CKR_TEMPLATE_INCONSISTENT),
        ([(C.CKA_TOKEN, True), (C.CKA_PRIVATE, False), *aes], C.CKR_TEMPLATE_INCONSISTENT),
        ([*KEY_BASE, *aes, (C.CKA_DERIVE, True)], C.CKR_TEMPLATE_INCONSISTENT),
        ([*KEY_BASE, *aes, (C.CKA_EXTRACTABLE, True)], C.CKR_TEMPLATE_INCONSISTENT),
        ([*KEY_BASE, *aes, (C.CKA_SENSITIVE, False)], C.CKR_TEMPLATE_INCONSISTENT),
        ([*KEY_BASE, (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_KEY_TYPE, C.CKK_AES)],
         C.CKR_TEMPLATE_INCOMPLETE),
        ([*KEY_BASE, (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_VALUE_LEN, 20)], C.CKR_KEY_SIZE_RANGE),
        ([*KEY_BASE, *aes, (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC)], C.CKR_TEMPLATE_INCONSISTENT),
        ([*KEY_BASE, *aes, (0x80001234, b"x")], C.CKR_ATTRIBUTE_TYPE_INVALID),
        ([*KEY_BASE, *aes, (C.CKA_ENCRYPT, b"\x01\x00")], C.CKR_ATTRIBUTE_VALUE_INVALID),
    ]  # fmt: skip
    for items, want in cases:
        t = Template(items)
        k = CK_ULONG()
        m, _ = mechanism(C.CKM_AES_KEY_GEN)
        assert mod.call("C_GenerateKey", h, byref(m), t.array, t.count, byref(k)) == want, items
    data = [(C.CKA_CLASS, C.CKO_DATA), (C.CKA_VALUE, b"v")]
    for items, want in (
        ([(C.CKA_TOKEN, True), *data], C.CKR_TEMPLATE_INCOMPLETE),
        ([*KEY_BASE, (C.CKA_VALUE, b"v")], C.CKR_TEMPLATE_INCOMPLETE),
        ([*KEY_BASE, (C.CKA_CLASS, C.CKO_PRIVATE_KEY)], C.CKR_TEMPLATE_INCOMPLETE),  # no key type
        ([*KEY_BASE, (C.CKA_CLASS, C.CKO_CERTIFICATE), (C.CKA_CERTIFICATE_TYPE, 1)],
         C.CKR_ATTRIBUTE_VALUE_INVALID),
        ([*KEY_BASE, (C.CKA_CLASS, C.CKO_CERTIFICATE), (C.CKA_CERTIFICATE_TYPE, C.CKC_X_509),
          (C.CKA_VALUE, b"der")], C.CKR_TEMPLATE_INCOMPLETE),
    ):  # fmt: skip
        t = Template(items)
        o = CK_ULONG()
        assert mod.call("C_CreateObject", h, t.array, t.count, byref(o)) == want, items
    assert requests() == r0
    m, _ = mechanism(C.CKM_AES_CBC)
    t = Template([*KEY_BASE, *aes])
    k = CK_ULONG()
    assert mod.call("C_GenerateKey", h, byref(m), t.array, t.count, byref(k)) == (
        C.CKR_MECHANISM_INVALID
    )


def test_objects_find_attributes_destroy(mod, logged_card):
    slot, h, _ = logged_card
    key = aes_key(mod, h)
    d1 = mod.create(
        h,
        [
            *KEY_BASE,
            (C.CKA_CLASS, C.CKO_DATA),
            (C.CKA_LABEL, b"one"),
            (C.CKA_APPLICATION, b"app"),
            (C.CKA_VALUE, b"<v> & \x00\x01"),
        ],
    )
    d2 = mod.create(
        h, [*KEY_BASE, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_LABEL, b"two"), (C.CKA_VALUE, b"")]
    )
    assert len({key, d1, d2}) == 3
    assert sorted(mod.find(h, [])) == sorted([key, d1, d2])
    assert sorted(mod.find(h, [(C.CKA_CLASS, C.CKO_DATA)])) == sorted([d1, d2])
    assert mod.find(h, [(C.CKA_LABEL, b"one")]) == [d1]
    assert mod.find(h, [(C.CKA_CLASS, C.CKO_PRIVATE_KEY)]) == []
    assert mod.find(h, [(C.CKA_CLASS, C.CKO_PUBLIC_KEY)]) == []
    assert mod.find(h, [(0x80005678, b"?")]) == []
    # Handles are stable: searching again gives the same ones.
    assert mod.find(h, [(C.CKA_LABEL, b"two")]) == [d2]

    # After C_FindObjects, attributes come from the cache.
    r0 = requests()
    assert mod.attr(h, d1, C.CKA_VALUE) == b"<v> & \x00\x01"
    assert mod.attr(h, d1, C.CKA_APPLICATION) == b"app"
    assert mod.attr(h, d2, C.CKA_VALUE) == b""
    assert mod.attr(h, key, C.CKA_CLASS) == ulong_bytes(C.CKO_SECRET_KEY)
    assert mod.attr(h, key, C.CKA_TOKEN) == b"\x01"
    assert requests() == r0

    # The length-query rules, every attribute processed.
    buf_small = ctypes.create_string_buffer(2)
    buf_ok = ctypes.create_string_buffer(8)
    arr = (CK_ATTRIBUTE * 5)(
        CK_ATTRIBUTE(C.CKA_LABEL, None, 0),
        CK_ATTRIBUTE(C.CKA_VALUE, ctypes.addressof(buf_small), 2),
        CK_ATTRIBUTE(C.CKA_CLASS, ctypes.addressof(buf_ok), 8),
        CK_ATTRIBUTE(0x80001111, None, 0),
        CK_ATTRIBUTE(C.CKA_APPLICATION, None, 0),
    )
    assert mod.call("C_GetAttributeValue", h, d1, arr, 5) == C.CKR_BUFFER_TOO_SMALL
    assert arr[0].ulValueLen == 3
    assert arr[1].ulValueLen == C.CK_UNAVAILABLE_INFORMATION
    assert arr[2].ulValueLen == 8 and buf_ok.raw == ulong_bytes(C.CKO_DATA)
    assert arr[3].ulValueLen == C.CK_UNAVAILABLE_INFORMATION
    assert arr[4].ulValueLen == 3
    sens = (CK_ATTRIBUTE * 2)(
        CK_ATTRIBUTE(C.CKA_VALUE, None, 0), CK_ATTRIBUTE(C.CKA_VALUE_LEN, None, 0)
    )
    assert mod.call("C_GetAttributeValue", h, key, sens, 2) == C.CKR_ATTRIBUTE_SENSITIVE
    assert sens[0].ulValueLen == C.CK_UNAVAILABLE_INFORMATION and sens[1].ulValueLen == 8
    one = (CK_ATTRIBUTE * 1)(CK_ATTRIBUTE(0x80001111, None, 0))
    assert mod.call("C_GetAttributeValue", h, key, one, 1) == C.CKR_ATTRIBUTE_TYPE_INVALID
    assert mod.call("C_GetAttributeValue", h, 999999, one, 1) == C.CKR_OBJECT_HANDLE_INVALID

    # Find operation state.
    t = Template([])
    mod.ok("C_FindObjectsInit", h, t.array, 0)
    assert mod.call("C_FindObjectsInit", h, t.array, 0) == C.CKR_OPERATION_ACTIVE
    mod.ok("C_FindObjectsFinal", h)
    assert mod.call("C_FindObjectsFinal", h) == C.CKR_OPERATION_NOT_INITIALIZED
    n = CK_ULONG()
    assert mod.call("C_FindObjects", h, None, 0, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED

    mod.ok("C_DestroyObject", h, d1)
    assert mod.call("C_GetAttributeValue", h, d1, one, 1) == C.CKR_OBJECT_HANDLE_INVALID
    assert mod.call("C_DestroyObject", h, d1) == C.CKR_OBJECT_HANDLE_INVALID
    assert sorted(mod.find(h, [])) == sorted([key, d2])

    # Read-only sessions cannot create or destroy (all objects are token objects).
    ro = mod.open(slot, rw=False)
    t = Template([*KEY_BASE, (C.CKA_CLASS, C.CKO_DATA)])
    o = CK_ULONG()
    assert mod.call("C_CreateObject", ro, t.array, t.count, byref(o)) == C.CKR_SESSION_READ_ONLY
    assert mod.call("C_DestroyObject", ro, d2) == C.CKR_SESSION_READ_ONLY
    # Logged out: nothing is found and private objects are not readable.
    mod.ok("C_Logout", h)
    assert mod.find(ro, []) == []
    assert mod.call("C_GetAttributeValue", ro, d2, one, 1) == C.CKR_OBJECT_HANDLE_INVALID
    t = Template([*KEY_BASE, (C.CKA_CLASS, C.CKO_DATA)])
    assert mod.call("C_CreateObject", h, t.array, t.count, byref(o)) == C.CKR_USER_NOT_LOGGED_IN


def test_objects_of_one_token_are_invisible_from_another(mod, logged_card, client):
    _, h, _ = logged_card
    key = aes_key(mod, h)
    name = "x" + uuid.uuid4().hex[:12]
    client.create_softcard(name, b"other-card")
    other = mod.open(mod.slot_by_label(name))
    assert mod.login(other, b"other-card") == C.CKR_OK
    assert mod.find(other, []) == []
    m, _ = mechanism(C.CKM_AES_CBC, bytes(16))
    assert mod.call("C_EncryptInit", other, byref(m), key) == C.CKR_KEY_HANDLE_INVALID
    mod.ok("C_CloseSession", other)


def test_generate_random(mod, logged_card):
    _, h, _ = logged_card
    buf = ctypes.create_string_buffer(100)
    mod.ok("C_GenerateRandom", h, buf, 100)
    a = buf.raw
    mod.ok("C_GenerateRandom", h, buf, 100)
    assert a != buf.raw and len(set(a)) > 20
    mod.ok("C_GenerateRandom", h, None, 0)
    assert mod.call("C_GenerateRandom", h, None, 5) == C.CKR_ARGUMENTS_BAD


def test_finalize_then_initialize_keeps_handles(mod, logged_card, service):
    slot, h, pin = logged_card
    key = aes_key(mod, h)
    mod.ok("C_Finalize", None)
    assert mod.initialize(str(service.client_cfg)) == C.CKR_OK
    assert slot in mod.slots()
    h2 = mod.open(slot)
    assert mod.login(h2, pin) == C.CKR_OK
    assert key in mod.find(h2, [(C.CKA_CLASS, C.CKO_SECRET_KEY)])
    m, _ = mechanism(C.CKM_AES_CBC, bytes(16))
    mod.ok("C_EncryptInit", h2, byref(m), key)
    assert len(mod.single("C_Encrypt", h2, bytes(32))) == 32


def test_threads_share_the_module(mod, logged_card):
    """8 threads encrypt concurrently on their own sessions; each keeps its own connection."""
    slot, h, _ = logged_card
    key = aes_key(mod, h)
    errors: list[BaseException] = []
    client = core.current_provider().client  # type: ignore[attr-defined]
    before = client.stats()
    sizes0 = dict(client.group.sizes) if client.group is not None else {}

    def work() -> None:
        try:
            s = mod.open(slot)
            m, _ = mechanism(C.CKM_AES_CBC_PAD, bytes(16))
            for i in range(10):
                data = os.urandom(i * 7)
                mod.ok("C_EncryptInit", s, byref(m), key)
                ct = mod.single("C_Encrypt", s, data)
                mod.ok("C_DecryptInit", s, byref(m), key)
                assert mod.single("C_Decrypt", s, ct) == data
            mod.ok("C_CloseSession", s)
        except (CKError, AssertionError) as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = client.stats()
    if client.group is None:
        assert after["requests"] - before["requests"] == 160
    else:
        # Group commit: 160 calls, in as many requests as the batches made (client/group.py).
        sizes = {n: k - sizes0.get(n, 0) for n, k in client.group.sizes.items()}
        assert sum(n * k for n, k in sizes.items()) == 160
        assert after["requests"] - before["requests"] == sum(sizes.values()) <= 160
    # A handle per thread, reused: one connection each, not one per request.
    assert after["connects"] - before["connects"] <= 8


def test_caller_holding_the_gil(mod, logged_card):
    """PyKCS11 keeps the GIL across calls: the module must work without releasing it."""
    slot, _, _ = logged_card
    g = Module(module_path(), hold_gil=True)
    s = g.open(slot)
    key = aes_key(g, s)
    m, _ = mechanism(C.CKM_AES_CBC_PAD, bytes(16))
    g.ok("C_EncryptInit", s, byref(m), key)
    ct = g.single("C_Encrypt", s, b"held")
    g.ok("C_DecryptInit", s, byref(m), key)
    assert g.single("C_Decrypt", s, ct) == b"held"
    g.ok("C_CloseSession", s)


def test_object_size_estimate(mod, logged_card):
    _, h, _ = logged_card
    key = aes_key(mod, h)
    n = CK_ULONG()
    r0 = requests()
    mod.ok("C_GetObjectSize", h, key, byref(n))
    # Every attribute as a CK_ATTRIBUTE (16-byte header) plus the 32-byte secret value.
    assert 32 + 16 < n.value < 2000 and requests() == r0
    assert mod.call("C_GetObjectSize", h, 999999, byref(n)) == C.CKR_OBJECT_HANDLE_INVALID
    assert mod.call("C_GetObjectSize", h, key, None) == C.CKR_ARGUMENTS_BAD
