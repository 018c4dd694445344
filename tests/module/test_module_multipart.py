"""Multi-part operations (C_*Update / C_*Final) through ctypes against the real key service.

AES-CBC(-PAD) streams through the stateless service block-chain by block-chain: results must
equal the single-part (and the `cryptography`) answer for any split of the input. HMAC data is
accumulated in the module up to a bound and signed or verified at C_*Final.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import uuid
from ctypes import byref

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from pkcs11ws._native import core
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.p11ctypes import CK_ULONG, mechanism

BASE = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True), (C.CKA_CLASS, C.CKO_SECRET_KEY)]


@pytest.fixture(scope="module")
def module_keys(mod, service):
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "u" + uuid.uuid4().hex[:12]
    client.create_softcard(name, b"multi-part")
    client.close()
    h = mod.open(mod.slot_by_label(name))
    assert mod.login(h, b"multi-part") == C.CKR_OK
    aes = os.urandom(32)
    mac = os.urandom(48)
    ka = mod.create(
        h,
        [
            *BASE,
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_ENCRYPT, True),
            (C.CKA_DECRYPT, True),
            (C.CKA_VALUE, aes),
        ],
    )
    km = mod.create(
        h,
        [
            *BASE,
            (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC),
            (C.CKA_SIGN, True),
            (C.CKA_VERIFY, True),
            (C.CKA_VALUE, mac),
        ],
    )
    return h, ka, aes, km, mac


def requests() -> int:
    return int(core.current_provider().client.stats()["requests"])  # type: ignore[attr-defined]


def cbc(key: bytes, iv: bytes, data: bytes, pad: bool) -> bytes:
    if pad:
        p = padding.PKCS7(128).padder()
        data = p.update(data) + p.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def multi(mod, h: int, update: str, final: str, data: bytes, sizes: list[int]) -> bytes:
    out = b""
    pos = 0
    n = CK_ULONG()
    for size in [*sizes, len(data)]:
        part = data[pos : pos + size]
        pos += len(part)
        if not part and pos < len(data):
            continue
        mod.ok(update, h, part or None, len(part), None, byref(n))
        buf = ctypes.create_string_buffer(max(1, n.value))
        mod.ok(update, h, part or None, len(part), buf, byref(n))
        out += buf.raw[: n.value]
        if pos >= len(data):
            break
    mod.ok(final, h, None, byref(n))
    buf = ctypes.create_string_buffer(max(1, n.value))
    mod.ok(final, h, buf, byref(n))
    return out + buf.raw[: n.value]


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("sizes", [[1, 15, 16, 17, 100], [16, 16, 16], [7] * 30, [1000]])
def test_cbc_any_split_equals_single_part(mod, module_keys, pad, sizes):
    h, ka, aes, _, _ = module_keys
    size = sum(sizes) if pad else sum(sizes) - sum(sizes) % 16
    data = os.urandom(size)
    iv = os.urandom(16)
    m, _buf = mechanism(C.CKM_AES_CBC_PAD if pad else C.CKM_AES_CBC, iv)
    mod.ok("C_EncryptInit", h, byref(m), ka)
    ct = multi(mod, h, "C_EncryptUpdate", "C_EncryptFinal", data, sizes)
    assert ct == cbc(aes, iv, data, pad)
    mod.ok("C_DecryptInit", h, byref(m), ka)
    assert multi(mod, h, "C_DecryptUpdate", "C_DecryptFinal", ct, list(reversed(sizes))) == data


def test_requests_and_length_rules(mod, module_keys):
    h, ka, aes, _, _ = module_keys
    iv = os.urandom(16)
    m, _buf = mechanism(C.CKM_AES_CBC_PAD, iv)
    n = CK_ULONG()
    out = ctypes.create_string_buffer(64)
    r0 = requests()
    mod.ok("C_EncryptInit", h, byref(m), ka)
    # Less than a block: held back, no request, nothing out.
    n.value = 64
    mod.ok("C_EncryptUpdate", h, b"x" * 10, 10, out, byref(n))
    assert n.value == 0 and requests() == r0
    mod.ok("C_EncryptUpdate", h, b"y" * 30, 30, None, byref(n))
    assert n.value == 32 and requests() == r0
    n.value = 16
    assert mod.call("C_EncryptUpdate", h, b"y" * 30, 30, out, byref(n)) == C.CKR_BUFFER_TOO_SMALL
    assert n.value == 32
    # A single-part call cannot finish a multi-part operation.
    assert mod.call("C_Encrypt", h, b"z", 1, out, byref(n)) == C.CKR_OPERATION_ACTIVE
    n.value = 64
    mod.ok("C_EncryptUpdate", h, b"y" * 30, 30, out, byref(n))
    first = out.raw[:32]
    assert requests() == r0 + 1
    n.value = 0
    assert mod.call("C_EncryptFinal", h, out, byref(n)) == C.CKR_BUFFER_TOO_SMALL
    assert n.value == 16
    n.value = 64
    mod.ok("C_EncryptFinal", h, out, byref(n))
    assert first + out.raw[:16] == cbc(aes, iv, b"x" * 10 + b"y" * 30, True)
    assert requests() == r0 + 2
    assert mod.call("C_EncryptFinal", h, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED

    # CBC without padding: a tail that is not a whole block fails at C_EncryptFinal.
    plain, _b2 = mechanism(C.CKM_AES_CBC, iv)
    mod.ok("C_EncryptInit", h, byref(plain), ka)
    n.value = 64
    mod.ok("C_EncryptUpdate", h, b"a" * 20, 20, out, byref(n))
    assert mod.call("C_EncryptFinal", h, out, byref(n)) == C.CKR_DATA_LEN_RANGE
    assert mod.call("C_EncryptUpdate", h, b"a", 1, out, byref(n)) == (
        C.CKR_OPERATION_NOT_INITIALIZED
    )
    # CBC-PAD decryption of a wrong total length.
    mod.ok("C_DecryptInit", h, byref(m), ka)
    n.value = 64
    mod.ok("C_DecryptUpdate", h, b"b" * 20, 20, out, byref(n))
    assert mod.call("C_DecryptFinal", h, out, byref(n)) == C.CKR_ENCRYPTED_DATA_LEN_RANGE

    # C_DecryptFinal into too small a buffer keeps the plaintext for the retry.
    ct = cbc(aes, iv, b"q" * 13, True)
    mod.ok("C_DecryptInit", h, byref(m), ka)
    n.value = 64
    mod.ok("C_DecryptUpdate", h, ct, 16, out, byref(n))
    assert n.value == 0  # the last block waits for C_DecryptFinal
    r1 = requests()
    small = ctypes.create_string_buffer(4)
    n.value = 4
    assert mod.call("C_DecryptFinal", h, small, byref(n)) == C.CKR_BUFFER_TOO_SMALL
    assert n.value == 13
    mod.ok("C_DecryptFinal", h, out, byref(n))
    assert out.raw[: n.value] == b"q" * 13 and requests() == r1 + 1


def test_hmac_multi_part(mod, module_keys):
    h, _, _, km, mac = module_keys
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    parts = [b"", b"a", os.urandom(1000), b"tail"]
    want = hmac.new(mac, b"".join(parts), hashlib.sha256).digest()
    r0 = requests()
    mod.ok("C_SignInit", h, byref(m), km)
    for p in parts:
        mod.ok("C_SignUpdate", h, p or None, len(p))
    n = CK_ULONG()
    mod.ok("C_SignFinal", h, None, byref(n))
    assert n.value == 32 and requests() == r0
    out = ctypes.create_string_buffer(32)
    mod.ok("C_SignFinal", h, out, byref(n))
    assert out.raw == want and requests() == r0 + 1
    assert mod.call("C_Sign", h, b"x", 1, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED

    g, _gb = mechanism(C.CKM_SHA256_HMAC_GENERAL, 16)
    mod.ok("C_VerifyInit", h, byref(g), km)
    for p in parts:
        mod.ok("C_VerifyUpdate", h, p or None, len(p))
    mod.ok("C_VerifyFinal", h, want[:16], 16)
    mod.ok("C_VerifyInit", h, byref(m), km)
    mod.ok("C_VerifyUpdate", h, b"other", 5)
    assert mod.call("C_VerifyFinal", h, want, 32) == C.CKR_SIGNATURE_INVALID
    mod.ok("C_VerifyInit", h, byref(m), km)
    mod.ok("C_VerifyUpdate", h, b"other", 5)
    assert mod.call("C_Verify", h, b"x", 1, want, 32) == C.CKR_OPERATION_ACTIVE
    assert mod.call("C_VerifyFinal", h, want, 20) == C.CKR_SIGNATURE_LEN_RANGE
    assert mod.call("C_VerifyFinal", h, want, 32) == C.CKR_OPERATION_NOT_INITIALIZED


def test_hmac_accumulation_bound(mod, module_keys):
    """Up to 4 MiB is signed (in one request the service accepts); beyond is DATA_LEN_RANGE."""
    h, _, _, km, mac = module_keys
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    chunk = os.urandom(1024 * 1024)
    n = CK_ULONG(32)
    out = ctypes.create_string_buffer(32)
    mod.ok("C_SignInit", h, byref(m), km)
    for _ in range(4):
        mod.ok("C_SignUpdate", h, chunk, len(chunk))
    mod.ok("C_SignFinal", h, out, byref(n))
    assert out.raw == hmac.new(mac, chunk * 4, hashlib.sha256).digest()
    mod.ok("C_SignInit", h, byref(m), km)
    for _ in range(4):
        mod.ok("C_SignUpdate", h, chunk, len(chunk))
    assert mod.call("C_SignUpdate", h, b"x", 1) == C.CKR_DATA_LEN_RANGE
    assert mod.call("C_SignFinal", h, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED
