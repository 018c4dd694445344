"""/crypto/v1: AES-CBC(-PAD) and HMAC known answers with imported keys, errors, random."""

from __future__ import annotations

import hmac
import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from tests.support.service import b64, unb64

CARDS = "/km/v1/softcards"
ENC, DEC = "/crypto/v1/encrypt", "/crypto/v1/decrypt"
SIGN, VERIFY = "/crypto/v1/sign", "/crypto/v1/verify"

# NIST SP 800-38A, appendix F.2 (CBC): the same IV and plaintext for every key size.
NIST_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
NIST_PT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST_CBC = {
    "F.2.1/F.2.2 AES-128": (
        "2b7e151628aed2a6abf7158809cf4f3c",
        "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2"
        "73bed6b8e3c1743b7116e69e222295163ff1caa1681fac09120eca307586e1a7",
    ),
    "F.2.3/F.2.4 AES-192": (
        "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
        "4f021db243bc633d7178183a9fa071e8b4d9ada9ad7dedf4e5e738763f69145a"
        "571b242012fb7ae07fa9baac3df102e008b0e27988598881d920a9e64f5615cd",
    ),
    "F.2.5/F.2.6 AES-256": (
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d"
        "39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b",
    ),
}

# RFC 4231 test cases: (key, data, HMAC-SHA-256, -384, -512).
_KEY_131 = b"\xaa" * 131
RFC4231 = {
    1: (
        b"\x0b" * 20,
        b"Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
        "faea9ea9076ede7f4af152e8b2fa9cb6",
        "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
        "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
    ),
    2: (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
        "8e2240ca5e69e2c78b3239ecfab21649",
        "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
        "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
    ),
    3: (
        b"\xaa" * 20,
        b"\xdd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
        "2a5ab39dc13814b94e3ab6e101a34f27",
        "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
        "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb",
    ),
    4: (
        bytes(range(1, 26)),
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e"
        "6801dd23c4a7d679ccf8a386c674cffb",
        "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3db"
        "a91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd",
    ),
    6: (
        _KEY_131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
        "0c2ef6ab4030fe8296248df163f44952",
        "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
        "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598",
    ),
    7: (
        _KEY_131,
        b"This is a test using a larger than block-size key and a larger than "
        b"block-size data. The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5"
        "a678cc31e799176d3860e6110c46523e",
        "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
        "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58",
    ),
}
RFC4231_CASE5 = (
    b"\x0c" * 20,
    b"Test With Truncation",
    "a3b6167473100ee06e0c796c2955552b",
    "3abf34c3503b2a23a46efc619baef897",
    "415fad6271580a531d4179bc891d87a6",
)
HMACS = ((256, C.CKK_SHA256_HMAC), (384, C.CKK_SHA384_HMAC), (512, C.CKK_SHA512_HMAC))


def _enc(api, token, key, mech, iv, data, path=ENC):
    return api.post(
        path, {"key": key, "mechanism": mech, "iv": b64(iv), "data": b64(data)}, token=token
    )


def _sign(api, token, key, mech, data, mac_length=None):
    body = {"key": key, "mechanism": mech, "data": b64(data)}
    if mac_length is not None:
        body["mac_length"] = mac_length
    return api.post(SIGN, body, token=token)


def _verify(api, token, key, mech, data, sig, mac_length=None):
    body = {"key": key, "mechanism": mech, "data": b64(data), "signature": b64(sig)}
    if mac_length is not None:
        body["mac_length"] = mac_length
    return api.post(VERIFY, body, token=token)


@pytest.mark.parametrize("case", sorted(NIST_CBC))
def test_aes_cbc_nist_sp800_38a(api, shared_card, case):
    _, card, token = shared_card
    key_hex, ct_hex = NIST_CBC[case]
    key = api.import_key(card, token, C.CKK_AES, bytes.fromhex(key_hex))
    ct = bytes.fromhex(ct_hex)
    out = api.ok(_enc(api, token, key, "CKM_AES_CBC", NIST_IV, NIST_PT))
    assert unb64(out["data"]) == ct
    assert unb64(out["last_block"]) == ct[-16:]
    out = api.ok(_enc(api, token, key, "CKM_AES_CBC", NIST_IV, ct, DEC))
    assert unb64(out["data"]) == NIST_PT
    assert unb64(out["last_block"]) == ct[-16:]
    # Chaining: two calls, the second with the first's last_block as IV, give the same output.
    first = api.ok(_enc(api, token, key, "CKM_AES_CBC", NIST_IV, NIST_PT[:32]))
    second = api.ok(_enc(api, token, key, "CKM_AES_CBC", unb64(first["last_block"]), NIST_PT[32:]))
    assert unb64(first["data"]) + unb64(second["data"]) == ct
    first = api.ok(_enc(api, token, key, "CKM_AES_CBC", NIST_IV, ct[:16], DEC))
    second = api.ok(_enc(api, token, key, "CKM_AES_CBC", unb64(first["last_block"]), ct[16:], DEC))
    assert unb64(first["data"]) + unb64(second["data"]) == NIST_PT


def test_aes_cbc_pad_against_reference(api, shared_card):
    _, card, token = shared_card
    value = os.urandom(24)
    key = api.import_key(card, token, C.CKK_AES, value)
    iv = os.urandom(16)
    for n in (0, 1, 15, 16, 17, 31, 32, 33, 100):
        data = os.urandom(n)
        padder = padding.PKCS7(128).padder()
        e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
        expect = e.update(padder.update(data) + padder.finalize()) + e.finalize()
        out = api.ok(_enc(api, token, key, "CKM_AES_CBC_PAD", iv, data))
        assert unb64(out["data"]) == expect, n
        assert unb64(out["last_block"]) == expect[-16:]
        back = api.ok(_enc(api, token, key, "CKM_AES_CBC_PAD", iv, expect, DEC))
        assert unb64(back["data"]) == data


def test_aes_cbc_errors(api, shared_card):
    _, card, token = shared_card
    key = api.import_key(card, token, C.CKK_AES, bytes(16))
    for n in (1, 15, 17):
        r = _enc(api, token, key, "CKM_AES_CBC", bytes(16), bytes(n))
        assert (r.status, r.code) == (400, "DATA_LEN_RANGE"), n
    out = api.ok(_enc(api, token, key, "CKM_AES_CBC", b"I" * 16, b""))
    assert out["data"] == "" and unb64(out["last_block"]) == b"I" * 16
    for mech in ("CKM_AES_CBC", "CKM_AES_CBC_PAD"):
        for n in (0, 1, 15, 17):
            r = _enc(api, token, key, mech, bytes(16), bytes(n), DEC)
            assert (r.status, r.code) == (400, "ENCRYPTED_DATA_LEN_RANGE"), (mech, n)
        for iv in (b"", bytes(8), bytes(15), bytes(17), bytes(32)):
            r = _enc(api, token, key, mech, iv, bytes(16))
            assert (r.status, r.code) == (400, "MECHANISM_PARAM_INVALID"), (mech, len(iv))
            r = _enc(api, token, key, mech, iv, bytes(16), DEC)
            assert r.code == "MECHANISM_PARAM_INVALID"
    for mech in ("CKM_SHA256_HMAC", "CKM_AES_KEY_GEN", "CKM_DES3_CBC", "", "ckm_aes_cbc"):
        r = _enc(api, token, key, mech, bytes(16), bytes(16))
        assert (r.status, r.code) == (400, "MECHANISM_INVALID"), mech


def test_aes_cbc_pad_bad_padding(api, shared_card):
    _, card, token = shared_card
    key = api.import_key(card, token, C.CKK_AES, bytes(range(16)))
    iv = bytes(16)
    for last_block in (
        bytes(16),
        bytes(15) + b"\x11",
        bytes(13) + b"\x01\x02\x03",
        bytes(14) + b"\x03\x03",
        b"\xff" * 16,
    ):
        raw = api.ok(_enc(api, token, key, "CKM_AES_CBC", iv, b"A" * 16 + last_block))
        r = _enc(api, token, key, "CKM_AES_CBC_PAD", iv, unb64(raw["data"]), DEC)
        assert (r.status, r.code) == (400, "ENCRYPTED_DATA_INVALID"), last_block.hex()
    good = api.ok(_enc(api, token, key, "CKM_AES_CBC", iv, bytes(14) + b"\x02\x02"))
    r = api.ok(_enc(api, token, key, "CKM_AES_CBC_PAD", iv, unb64(good["data"]), DEC))
    assert unb64(r["data"]) == bytes(14)


@pytest.mark.parametrize("case", sorted(RFC4231))
def test_hmac_rfc4231(api, shared_card, case):
    _, card, token = shared_card
    key_bytes, data, *expected = RFC4231[case]
    for (bits, key_type), hexmac in zip(HMACS, expected, strict=True):
        mac = bytes.fromhex(hexmac)
        for kt in (key_type, C.CKK_GENERIC_SECRET):
            key = api.import_key(card, token, kt, key_bytes)
            out = api.ok(_sign(api, token, key, f"CKM_SHA{bits}_HMAC", data))
            assert unb64(out["signature"]) == mac, (case, bits, kt)
            assert api.ok(_verify(api, token, key, f"CKM_SHA{bits}_HMAC", data, mac)) == {
                "valid": True
            }
            full = api.ok(_sign(api, token, key, f"CKM_SHA{bits}_HMAC_GENERAL", data, bits // 8))
            assert unb64(full["signature"]) == mac


def test_hmac_rfc4231_case5_truncated(api, shared_card):
    _, card, token = shared_card
    key_bytes, data, *expected = RFC4231_CASE5
    for (bits, key_type), hexmac in zip(HMACS, expected, strict=True):
        mac = bytes.fromhex(hexmac)
        key = api.import_key(card, token, key_type, key_bytes)
        mech = f"CKM_SHA{bits}_HMAC_GENERAL"
        if bits == 256:
            out = api.ok(_sign(api, token, key, mech, data, 16))
            assert unb64(out["signature"]) == mac
            assert _verify(api, token, key, mech, data, mac, 16).status == 200
        else:  # 16 bytes is below half of SHA-384/512 output: out of range for _GENERAL
            r = _sign(api, token, key, mech, data, 16)
            assert (r.status, r.code) == (400, "MECHANISM_PARAM_INVALID")
            full = unb64(api.ok(_sign(api, token, key, f"CKM_SHA{bits}_HMAC", data))["signature"])
            assert full[:16] == mac


def test_hmac_general_lengths_and_errors(api, shared_card):
    _, card, token = shared_card
    key_bytes = os.urandom(32)
    key = api.import_key(card, token, C.CKK_SHA256_HMAC, key_bytes)
    data = b"message"
    full = hmac.digest(key_bytes, data, "sha256")
    for n in (16, 17, 31, 32):
        out = api.ok(_sign(api, token, key, "CKM_SHA256_HMAC_GENERAL", data, n))
        assert unb64(out["signature"]) == full[:n]
        assert _verify(api, token, key, "CKM_SHA256_HMAC_GENERAL", data, full[:n], n).status == 200
    for n in (0, 1, 15, 33, 64):
        r = _sign(api, token, key, "CKM_SHA256_HMAC_GENERAL", data, n)
        assert (r.status, r.code) == (400, "MECHANISM_PARAM_INVALID"), n
    r = _sign(api, token, key, "CKM_SHA256_HMAC_GENERAL", data)
    assert r.code == "MECHANISM_PARAM_INVALID"
    r = _sign(api, token, key, "CKM_SHA256_HMAC", data, 32)
    assert r.code == "MECHANISM_PARAM_INVALID"
    r = _verify(api, token, key, "CKM_SHA256_HMAC", data, full, 32)
    assert r.code == "MECHANISM_PARAM_INVALID"
    # Verification failures.
    bad = bytearray(full)
    bad[5] ^= 1
    r = _verify(api, token, key, "CKM_SHA256_HMAC", data, bytes(bad))
    assert (r.status, r.code) == (422, "SIGNATURE_INVALID")
    r = _verify(api, token, key, "CKM_SHA256_HMAC", data + b"!", full)
    assert r.code == "SIGNATURE_INVALID"
    for sig in (full[:31], full + b"\x00", b""):
        r = _verify(api, token, key, "CKM_SHA256_HMAC", data, sig)
        assert (r.status, r.code) == (422, "SIGNATURE_LEN_RANGE"), len(sig)
    r = _verify(api, token, key, "CKM_SHA256_HMAC_GENERAL", data, full[:20], 16)
    assert r.code == "SIGNATURE_LEN_RANGE"
    # Empty data is fine.
    out = api.ok(_sign(api, token, key, "CKM_SHA256_HMAC", b""))
    assert unb64(out["signature"]) == hmac.digest(key_bytes, b"", "sha256")


def test_key_type_and_usage_enforced(api, shared_card):
    _, card, token = shared_card
    aes = api.import_key(card, token, C.CKK_AES, bytes(16))
    h384 = api.import_key(card, token, C.CKK_SHA384_HMAC, bytes(48))
    sign_only = api.import_key(card, token, C.CKK_SHA256_HMAC, bytes(32), CKA_VERIFY=False)
    enc_only = api.import_key(card, token, C.CKK_AES, bytes(16), CKA_DECRYPT=False)
    no_sign = api.import_key(card, token, C.CKK_SHA256_HMAC, bytes(32), CKA_SIGN=False)

    r = _sign(api, token, aes, "CKM_SHA256_HMAC", b"x")
    assert (r.status, r.code) == (400, "KEY_TYPE_INCONSISTENT")
    r = _sign(api, token, h384, "CKM_SHA256_HMAC", b"x")
    assert r.code == "KEY_TYPE_INCONSISTENT"
    r = _enc(api, token, h384, "CKM_AES_CBC", bytes(16), bytes(16))
    assert r.code == "KEY_TYPE_INCONSISTENT"
    sig = unb64(api.ok(_sign(api, token, sign_only, "CKM_SHA256_HMAC", b"x"))["signature"])
    r = _verify(api, token, sign_only, "CKM_SHA256_HMAC", b"x", sig)
    assert (r.status, r.code) == (403, "KEY_FUNCTION_NOT_PERMITTED")
    r = _sign(api, token, no_sign, "CKM_SHA256_HMAC", b"x")
    assert r.code == "KEY_FUNCTION_NOT_PERMITTED"
    assert _verify(api, token, no_sign, "CKM_SHA256_HMAC", b"x", sig).status == 200
    ct = unb64(api.ok(_enc(api, token, enc_only, "CKM_AES_CBC", bytes(16), bytes(16)))["data"])
    r = _enc(api, token, enc_only, "CKM_AES_CBC", bytes(16), ct, DEC)
    assert r.code == "KEY_FUNCTION_NOT_PERMITTED"
    # An AES key with CKA_ENCRYPT=false cannot encrypt either.
    no_enc = api.import_key(card, token, C.CKK_AES, bytes(16), CKA_ENCRYPT=False)
    assert _enc(api, token, no_enc, "CKM_AES_CBC", bytes(16), bytes(16)).code == (
        "KEY_FUNCTION_NOT_PERMITTED"
    )


def test_key_lookup_errors(api, shared_card, service):
    _, card, token = shared_card
    data = api.ok(api.create(card, token, {"CKA_CLASS": C.CKO_DATA, "CKA_VALUE": b"x"}))
    for key in ("00000000-0000-0000-0000-000000000000", data["handle"], "nope", ""):
        r = _sign(api, token, key, "CKM_SHA256_HMAC", b"x")
        assert (r.status, r.code) == (404, "KEY_NOT_FOUND"), key
    r = api.post(SIGN, {"key": data["handle"], "mechanism": "CKM_SHA256_HMAC", "data": b64(b"")})
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    # Keys longer than the hash block are fine for HMAC (hashed first), up to the stored limit.
    big = api.import_key(card, token, C.CKK_GENERIC_SECRET, bytes(1024))
    assert _sign(api, token, big, "CKM_SHA256_HMAC", b"x").status == 200
    assert _sign(api, token, big, "CKM_SHA512_HMAC", b"x").status == 200


def test_generated_keys_work(api, shared_card):
    _, card, token = shared_card
    path = f"{CARDS}/{card}/keys/generate"
    from tests.support.service import new_idem

    aes = api.ok(
        api.post(
            path,
            {"mechanism": "CKM_AES_KEY_GEN", "attrs": {"CKA_VALUE_LEN": 32}},
            token=token,
            idem=new_idem(),
        )
    )["handle"]
    ct = api.ok(_enc(api, token, aes, "CKM_AES_CBC_PAD", bytes(16), b"hello"))
    back = api.ok(_enc(api, token, aes, "CKM_AES_CBC_PAD", bytes(16), unb64(ct["data"]), DEC))
    assert unb64(back["data"]) == b"hello"
    for mech, gen in (
        ("CKM_SHA512_HMAC", "CKM_SHA512_KEY_GEN"),
        ("CKM_SHA256_HMAC", "CKM_GENERIC_SECRET_KEY_GEN"),
    ):
        h = api.ok(
            api.post(
                path,
                {"mechanism": gen, "attrs": {"CKA_VALUE_LEN": 64}},
                token=token,
                idem=new_idem(),
            )
        )["handle"]
        sig = unb64(api.ok(_sign(api, token, h, mech, b"data"))["signature"])
        assert _verify(api, token, h, mech, b"data", sig).status == 200
    # Two generated keys differ.
    a = api.ok(
        api.post(
            path,
            {"mechanism": "CKM_SHA256_KEY_GEN", "attrs": {"CKA_VALUE_LEN": 32}},
            token=token,
            idem=new_idem(),
        )
    )["handle"]
    b = api.ok(
        api.post(
            path,
            {"mechanism": "CKM_SHA256_KEY_GEN", "attrs": {"CKA_VALUE_LEN": 32}},
            token=token,
            idem=new_idem(),
        )
    )["handle"]
    sa = api.ok(_sign(api, token, a, "CKM_SHA256_HMAC", b"d"))["signature"]
    sb = api.ok(_sign(api, token, b, "CKM_SHA256_HMAC", b"d"))["signature"]
    assert sa != sb


def test_random(api):
    for n in (1, 16, 65536):
        out = api.ok(api.post("/crypto/v1/random", {"length": n}))
        assert len(unb64(out["data"])) == n
    a = unb64(api.ok(api.post("/crypto/v1/random", {"length": 32}))["data"])
    b = unb64(api.ok(api.post("/crypto/v1/random", {"length": 32}))["data"])
    assert a != b
    for n in (0, 65537, 2**64 - 1):
        r = api.post("/crypto/v1/random", {"length": n})
        assert (r.status, r.code) == (400, "BAD_REQUEST"), n
    for body in ({"length": -1}, {"length": "8"}, {"length": 1.5}, {}, {"length": 8, "x": 1}):
        r = api.post("/crypto/v1/random", body)
        assert r.status == 400, body
    assert api.post("/crypto/v1/random", {"length": 8, "x": 1}).code == "UNKNOWN_FIELD"
