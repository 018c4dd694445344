"""C_DigestInit/C_Digest/C_DigestUpdate/C_DigestKey/C_DigestFinal with CKM_SHA_1 and SHA-2: in
the module (no request, no login), FIPS 180 known answers single-part and multi-part, the
two-call length convention and CKR_BUFFER_TOO_SMALL, the operation rules (active, not
initialised, single after multi-part, cancel), C_GetMechanismInfo's CKF_DIGEST, and C_DigestKey
refused for every key (their values never leave the key service)."""

from __future__ import annotations

import ctypes
from ctypes import byref

import pytest

from pkcs11ws import constants as C
from pkcs11ws._native import core
from tests.support.cards import client_card
from tests.support.p11ctypes import CK_MECHANISM_INFO, CK_ULONG, mechanism

ABC = b"abc"
TWO_BLOCKS = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
# FIPS 180-2 appendix examples (and the empty message).
KNOWN = {
    (C.CKM_SHA_1, ABC): "a9993e364706816aba3e25717850c26c9cd0d89d",
    (C.CKM_SHA_1, TWO_BLOCKS): "84983e441c3bd26ebaae4aa1f95129e5e54670f1",
    (C.CKM_SHA_1, b""): "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    (C.CKM_SHA224, ABC): "23097d223405d8228642a477bda255b32aadbce4bda0b3f7e36c9da7",
    (C.CKM_SHA256, ABC): "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    (C.CKM_SHA256, TWO_BLOCKS): "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
    (C.CKM_SHA256, b""): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    (C.CKM_SHA384, ABC): "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded163"
    "1a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7",
    (C.CKM_SHA512, ABC): "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
}
MILLION_A_SHA256 = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
SIZES = {C.CKM_SHA_1: 20, C.CKM_SHA224: 28, C.CKM_SHA256: 32, C.CKM_SHA384: 48, C.CKM_SHA512: 64}


@pytest.fixture(scope="module")
def card(mod, service):
    """A softcard of its own: (slot, passphrase). `mod` is the shared module (tests/conftest)."""
    name, pin = client_card(service.client_cfg, "dg")
    return mod.slot_by_label(name), pin.encode()


def requests() -> int:
    return int(core.current_provider().client.stats()["requests"])  # type: ignore[attr-defined]


def init(mod, h, mech, param=None):
    m, buf = mechanism(mech, param)
    rv = mod.call("C_DigestInit", h, byref(m))
    del buf
    return rv


def digest(mod, h, data: bytes) -> bytes:
    n = CK_ULONG()
    mod.ok("C_Digest", h, data or None, len(data), None, byref(n))
    out = ctypes.create_string_buffer(n.value)
    mod.ok("C_Digest", h, data or None, len(data), out, byref(n))
    return out.raw[: n.value]


def final(mod, h) -> bytes:
    n = CK_ULONG()
    mod.ok("C_DigestFinal", h, None, byref(n))
    out = ctypes.create_string_buffer(n.value)
    mod.ok("C_DigestFinal", h, out, byref(n))
    return out.raw[: n.value]


def test_known_answers_single_and_multi_part_in_a_public_session(mod, card):
    slot, _ = card
    h = mod.open(slot, rw=False)  # never logged in
    before = requests()
    for (mech, data), want in KNOWN.items():
        assert init(mod, h, mech) == C.CKR_OK
        assert digest(mod, h, data).hex() == want, (C.CKM_NAMES[mech], data)
        assert init(mod, h, mech) == C.CKR_OK
        for i in range(0, len(data), 5):
            mod.ok("C_DigestUpdate", h, data[i : i + 5], len(data[i : i + 5]))
        assert final(mod, h).hex() == want, (C.CKM_NAMES[mech], data)
    # FIPS 180-2's one million "a", in 1000 parts.
    assert init(mod, h, C.CKM_SHA256) == C.CKR_OK
    part = b"a" * 1000
    for _ in range(1000):
        mod.ok("C_DigestUpdate", h, part, len(part))
    mod.ok("C_DigestUpdate", h, None, 0)
    assert final(mod, h).hex() == MILLION_A_SHA256
    assert requests() == before  # all of it in the module
    mod.ok("C_CloseSession", h)


def test_length_rules_and_operation_states(mod, card):
    slot, _ = card
    h = mod.open(slot, rw=False)
    n = CK_ULONG()
    out = ctypes.create_string_buffer(64)
    for op in ("C_Digest", "C_DigestFinal"):
        args = (ABC, 3) if op == "C_Digest" else ()
        assert mod.call(op, h, *args, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED
    assert mod.call("C_DigestUpdate", h, ABC, 3) == C.CKR_OPERATION_NOT_INITIALIZED
    assert mod.call("C_DigestKey", h, 1) == C.CKR_OPERATION_NOT_INITIALIZED
    assert mod.call("C_DigestInit", h, None) == C.CKR_ARGUMENTS_BAD
    assert init(mod, h, C.CKM_AES_CBC, bytes(16)) == C.CKR_MECHANISM_INVALID
    assert init(mod, h, C.CKM_SHA256_RSA_PKCS) == C.CKR_MECHANISM_INVALID
    assert init(mod, h, C.CKM_SHA256, b"x") == C.CKR_MECHANISM_PARAM_INVALID
    for mech, size in SIZES.items():
        assert init(mod, h, mech) == C.CKR_OK
        assert init(mod, h, mech) == C.CKR_OPERATION_ACTIVE
        # Length query, then too small a buffer: both keep the operation.
        n.value = 0
        mod.ok("C_Digest", h, ABC, 3, None, byref(n))
        assert n.value == size
        n.value = size - 1
        assert mod.call("C_Digest", h, ABC, 3, out, byref(n)) == C.CKR_BUFFER_TOO_SMALL
        assert n.value == size
        n.value = 64
        mod.ok("C_Digest", h, ABC, 3, out, byref(n))
        assert n.value == size and out.raw[:size].hex() == KNOWN[(mech, ABC)]
        assert mod.call("C_Digest", h, ABC, 3, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED
    # A multi-part digest ends only with C_DigestFinal; its length rules are C_Digest's.
    assert init(mod, h, C.CKM_SHA_1) == C.CKR_OK
    mod.ok("C_DigestUpdate", h, ABC, 3)
    assert mod.call("C_Digest", h, ABC, 3, out, byref(n)) == C.CKR_OPERATION_ACTIVE
    n.value = 19
    assert mod.call("C_DigestFinal", h, out, byref(n)) == C.CKR_BUFFER_TOO_SMALL and n.value == 20
    assert mod.call("C_DigestFinal", h, out, None) == C.CKR_ARGUMENTS_BAD
    assert mod.call("C_DigestFinal", h, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED
    # C_SessionCancel(CKF_DIGEST) ends it too.
    assert init(mod, h, C.CKM_SHA512) == C.CKR_OK
    cancel = mod.lib.C_SessionCancel  # a 3.0 function: the loader's export
    cancel.argtypes = [ctypes.c_ulong, ctypes.c_ulong]
    assert cancel(h, C.CKF_DIGEST) == C.CKR_OK
    assert mod.call("C_DigestUpdate", h, ABC, 3) == C.CKR_OPERATION_NOT_INITIALIZED
    assert init(mod, h, C.CKM_SHA512) == C.CKR_OK
    mod.ok("C_CloseSession", h)
    # A session closed mid-digest leaves nothing behind for the next one.
    h = mod.open(slot, rw=False)
    assert init(mod, h, C.CKM_SHA224) == C.CKR_OK
    assert digest(mod, h, ABC).hex() == KNOWN[(C.CKM_SHA224, ABC)]
    assert mod.call("C_DigestInit", 0x7FFF0001, None) == C.CKR_SESSION_HANDLE_INVALID
    mod.ok("C_CloseSession", h)


def test_digest_key_is_refused(mod, card):
    slot, pin = card
    h = mod.open(slot)
    assert mod.login(h, pin) == C.CKR_OK
    key = mod.create(
        h,
        [
            (C.CKA_TOKEN, True),
            (C.CKA_PRIVATE, True),
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_ENCRYPT, True),
            (C.CKA_VALUE, bytes(range(32))),
        ],
    )
    assert init(mod, h, C.CKM_SHA256) == C.CKR_OK
    mod.ok("C_DigestUpdate", h, ABC, 3)
    assert mod.call("C_DigestKey", h, key) == C.CKR_KEY_INDIGESTIBLE
    assert mod.call("C_DigestUpdate", h, ABC, 3) == C.CKR_OPERATION_NOT_INITIALIZED
    assert init(mod, h, C.CKM_SHA256) == C.CKR_OK
    assert mod.call("C_DigestKey", h, 0x7FFFFFF0) == C.CKR_KEY_HANDLE_INVALID
    mod.ok("C_Logout", h)
    mod.ok("C_CloseSession", h)


def test_mechanism_info(mod, card):
    slot, _ = card
    n = CK_ULONG()
    mod.ok("C_GetMechanismList", slot, None, byref(n))
    arr = (CK_ULONG * n.value)()
    mod.ok("C_GetMechanismList", slot, arr, byref(n))
    assert set(SIZES) <= set(arr)
    info = CK_MECHANISM_INFO()
    for mech in SIZES:
        mod.ok("C_GetMechanismInfo", slot, mech, byref(info))
        assert info.flags == C.CKF_DIGEST and info.ulMinKeySize == info.ulMaxKeySize == 0
