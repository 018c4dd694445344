"""Multi-part operations as Java's Cipher and Mac drive them (they never call the single-part
functions): for any split of any input, C_*Update/C_*Final must give exactly the single-part
result, for AES-CBC and AES-CBC-PAD both ways and for every HMAC mechanism.

The CBC streaming contract is checked from the outside: after every C_*Update the output so far
is every whole block of the input so far (CBC-PAD decryption holds back one more block for
C_DecryptFinal), so the module never keeps more than a block. HMAC data is kept in the module up
to a documented bound (4 MiB, README.md); beyond it C_SignUpdate and C_VerifyUpdate
answer CKR_DATA_LEN_RANGE and the operation ends.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
from ctypes import byref
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.p11ctypes import CK_ULONG, Module, mechanism

SECRET = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True), (C.CKA_CLASS, C.CKO_SECRET_KEY)]
MACS = {
    C.CKM_SHA256_HMAC: (hashlib.sha256, None),
    C.CKM_SHA384_HMAC: (hashlib.sha384, None),
    C.CKM_SHA512_HMAC: (hashlib.sha512, None),
    C.CKM_SHA256_HMAC_GENERAL: (hashlib.sha256, 20),
    C.CKM_SHA384_HMAC_GENERAL: (hashlib.sha384, 24),
    C.CKM_SHA512_HMAC_GENERAL: (hashlib.sha512, 64),
}
MAC_BOUND = 4 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def env(service):
    m = Module(module_path())
    rv = m.initialize(str(service.client_cfg))
    assert rv in (C.CKR_OK, C.CKR_CRYPTOKI_ALREADY_INITIALIZED)
    name, pin = client_card(service.client_cfg, "m")
    h = m.open(m.slot_by_label(name))
    assert m.login(h, pin.encode()) == C.CKR_OK
    aes = {}
    for size in (16, 24, 32):
        usage = [(C.CKA_ENCRYPT, True), (C.CKA_DECRYPT, True)]
        aes[size] = m.create(
            h, [*SECRET, (C.CKA_KEY_TYPE, C.CKK_AES), *usage, (C.CKA_VALUE, os.urandom(size))]
        )
    mac_value = os.urandom(64)
    mac = m.create(
        h,
        [
            *SECRET,
            (C.CKA_KEY_TYPE, C.CKK_GENERIC_SECRET),
            (C.CKA_SIGN, True),
            (C.CKA_VERIFY, True),
            (C.CKA_VALUE, mac_value),
        ],
    )
    yield m, h, aes, mac, mac_value
    m.call("C_CloseSession", h)
    m.call("C_Finalize", None)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def streamed(m, h, update: str, final: str, parts: list[bytes], hold_back: bool) -> bytes:
    """Feed the parts; after each update the output so far must be every whole block so far."""
    out = b""
    seen = 0
    n = CK_ULONG()
    for part in parts:
        seen += len(part)
        n.value = len(part) + 32
        buf = ctypes.create_string_buffer(max(1, n.value))
        m.ok(update, h, part or None, len(part), buf, byref(n))
        out += buf.raw[: n.value]
        whole = seen - seen % 16
        if hold_back and seen % 16 == 0 and seen:
            whole -= 16  # CBC-PAD decryption keeps the possible padding block
        assert len(out) == whole, (len(out), seen)
    m.ok(final, h, None, byref(n))
    buf = ctypes.create_string_buffer(max(1, n.value))
    m.ok(final, h, buf, byref(n))
    return out + buf.raw[: n.value]


@EXAMPLES
@given(
    size=st.sampled_from([16, 24, 32]),
    pad=st.booleans(),
    blocks=st.integers(0, 40),
    tail=st.integers(0, 15),
    cuts=st.lists(st.integers(0, 700), max_size=8),
    iv=st.binary(min_size=16, max_size=16),
)
def test_cbc_every_split_equals_single_part(env, size, pad, blocks, tail, cuts, iv):
    m, h, aes, _, _ = env
    key = aes[size]
    length = blocks * 16 + (tail if pad else 0)
    if not pad and length == 0:
        length = 16
    data = os.urandom(length)
    mech, _buf = mechanism(C.CKM_AES_CBC_PAD if pad else C.CKM_AES_CBC, iv)
    m.ok("C_EncryptInit", h, byref(mech), key)
    single = m.single("C_Encrypt", h, data)
    m.ok("C_EncryptInit", h, byref(mech), key)
    multi = streamed(m, h, "C_EncryptUpdate", "C_EncryptFinal", pieces(data, cuts), False)
    assert multi == single
    m.ok("C_DecryptInit", h, byref(mech), key)
    assert m.single("C_Decrypt", h, single) == data
    m.ok("C_DecryptInit", h, byref(mech), key)
    back = streamed(m, h, "C_DecryptUpdate", "C_DecryptFinal", pieces(single, cuts), pad)
    assert back == data


@EXAMPLES
@given(
    mech=st.sampled_from(sorted(MACS)),
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
)
def test_hmac_every_split_equals_single_part(env, mech, data, cuts):
    m, h, _, key, value = env
    digest, length = MACS[mech]
    mm, _buf = mechanism(mech, length)
    want = hmac.new(value, data, digest).digest()[:length]
    m.ok("C_SignInit", h, byref(mm), key)
    assert m.single("C_Sign", h, data) == want
    m.ok("C_SignInit", h, byref(mm), key)
    for part in pieces(data, cuts):
        m.ok("C_SignUpdate", h, part or None, len(part))
    n = CK_ULONG(len(want))
    out = ctypes.create_string_buffer(len(want))
    m.ok("C_SignFinal", h, out, byref(n))
    assert out.raw[: n.value] == want
    m.ok("C_VerifyInit", h, byref(mm), key)
    for part in pieces(data, cuts):
        m.ok("C_VerifyUpdate", h, part or None, len(part))
    m.ok("C_VerifyFinal", h, want, len(want))
    m.ok("C_VerifyInit", h, byref(mm), key)
    for part in pieces(data + b"!", cuts):
        m.ok("C_VerifyUpdate", h, part or None, len(part))
    assert m.call("C_VerifyFinal", h, want, len(want)) == C.CKR_SIGNATURE_INVALID


def test_hmac_bound_is_documented_and_enforced(env):
    m, h, _, key, _ = env
    mm, _buf = mechanism(C.CKM_SHA384_HMAC)
    chunk = bytes(MAC_BOUND // 4)
    for fn in ("C_SignInit", "C_VerifyInit"):
        m.ok(fn, h, byref(mm), key)
        update = fn.replace("Init", "Update")
        for _ in range(4):
            m.ok(update, h, chunk, len(chunk))
        assert m.call(update, h, b"x", 1) == C.CKR_DATA_LEN_RANGE
        assert m.call(update, h, b"x", 1) == C.CKR_OPERATION_NOT_INITIALIZED
    doc = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "4 MiB" in doc and "CKR_DATA_LEN_RANGE" in doc
