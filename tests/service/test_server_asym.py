"""Key pairs (RSA, EC) and AES-GCM on the key service over real mutual TLS: generation, the
public half readable before login, the private half sealed and never shown, signatures and
decryption checked with cryptography, private key import, GCM known answers (SP 800-38D)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from pkcs11ws import constants as C
from tests.support.service import b64, decode, encode, new_idem, unb64

SIGN, DEC, ENC = "/crypto/v1/sign", "/crypto/v1/decrypt", "/crypto/v1/encrypt"
P256 = bytes.fromhex("06082a8648ce3d030107")
P384 = bytes.fromhex("06052b81040022")
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

# The GCM specification's test cases 2-4 (McGrew and Viega; the SP 800-38D validation set).
GCM_K3 = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
GCM_P3 = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
GCM_C3 = bytes.fromhex(
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"
)
GCM_CASES = {
    "case 2": (bytes(16), bytes(12), b"", bytes(16),
               bytes.fromhex("0388dace60b6a392f328c2b971b2fe78"),
               bytes.fromhex("ab6e47d42cec13bdf53a67b21257bddf")),
    "case 3": (GCM_K3, bytes.fromhex("cafebabefacedbaddecaf888"), b"", GCM_P3, GCM_C3,
               bytes.fromhex("4d5c2af327cd64a62cf35abd2ba6fab4")),
    "case 4": (GCM_K3, bytes.fromhex("cafebabefacedbaddecaf888"),
               bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2"), GCM_P3[:60],
               GCM_C3[:60], bytes.fromhex("5bc94fbc3221a5db94fae95ae7121a47")),
}  # fmt: skip


def _pair(
    api: Any, card: str, token: str, mech: str, pub: dict[str, Any], priv: dict[str, Any]
) -> Any:
    return api.post(
        f"/km/v1/softcards/{card}/keys/generate-pair",
        {"mechanism": mech, "public_attrs": encode(pub), "private_attrs": encode(priv)},
        token=token,
        idem=new_idem(),
    )


_PRIV = {"CKA_TOKEN": True, "CKA_PRIVATE": True, "CKA_SIGN": True, "CKA_ID": b"\x01\x02"}


@pytest.fixture(scope="module")
def rsa_pair(shared_card: Any) -> tuple[str, str, rsa.RSAPublicKey]:
    api, card_id, token = shared_card
    r = _pair(
        api,
        card_id,
        token,
        "CKM_RSA_PKCS_KEY_PAIR_GEN",
        {
            "CKA_MODULUS_BITS": 2048,
            "CKA_PUBLIC_EXPONENT": b"\x01\x00\x01",
            "CKA_LABEL": b"rsa",
            "CKA_ID": b"\x01\x02",
        },
        {**_PRIV, "CKA_LABEL": b"rsa"},
    )
    body = api.ok(r)
    pub_attrs = decode(body["public"]["attrs"])
    key = serialization.load_der_public_key(pub_attrs["CKA_PUBLIC_KEY_INFO"])
    assert isinstance(key, rsa.RSAPublicKey)
    return body["public"]["handle"], body["private"]["handle"], key


@pytest.fixture(scope="module")
def ec_pair(shared_card: Any) -> tuple[str, str, ec.EllipticCurvePublicKey]:
    api, card_id, token = shared_card
    body = api.ok(
        _pair(
            api,
            card_id,
            token,
            "CKM_EC_KEY_PAIR_GEN",
            {"CKA_EC_PARAMS": P256, "CKA_LABEL": b"ec"},
            {**_PRIV, "CKA_LABEL": b"ec"},
        )
    )
    key = serialization.load_der_public_key(decode(body["public"]["attrs"])["CKA_PUBLIC_KEY_INFO"])
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return body["public"]["handle"], body["private"]["handle"], key


def _sign(api: Any, token: str, key: str, mech: str, data: bytes, **params: Any) -> Any:
    return api.post(SIGN, {"key": key, "mechanism": mech, "data": b64(data), **params}, token=token)


def test_rsa_pair_attributes(shared_card: Any, rsa_pair: Any) -> None:
    api, card_id, token = shared_card
    pub_h, priv_h, pub = rsa_pair
    priv = decode(
        api.ok(api.get(f"/km/v1/softcards/{card_id}/objects/{priv_h}", token=token))["attrs"]
    )
    assert priv["CKA_CLASS"] == C.CKO_PRIVATE_KEY and priv["CKA_KEY_TYPE"] == C.CKK_RSA
    assert "CKA_VALUE" not in priv and "CKA_PRIVATE_EXPONENT" not in priv
    assert priv["CKA_SENSITIVE"] is True and priv["CKA_EXTRACTABLE"] is False
    assert priv["CKA_LOCAL"] is True and priv["CKA_NEVER_EXTRACTABLE"] is True
    assert priv["CKA_KEY_GEN_MECHANISM"] == C.CKM_RSA_PKCS_KEY_PAIR_GEN
    assert priv["CKA_MODULUS_BITS"] == 2048 and priv["CKA_PUBLIC_EXPONENT"] == b"\x01\x00\x01"
    assert int.from_bytes(priv["CKA_MODULUS"], "big") == pub.public_numbers().n
    assert priv["CKA_ID"] == b"\x01\x02"
    # The public half: found and read without an activation token.
    r = api.post(
        f"/km/v1/softcards/{card_id}/public/search",
        {
            "attrs": encode(
                {"CKA_CLASS": C.CKO_PUBLIC_KEY, "CKA_ID": b"\x01\x02", "CKA_LABEL": b"rsa"}
            )
        },
    )
    found = api.ok(r)["objects"]
    assert [o["handle"] for o in found] == [pub_h]
    attrs = decode(found[0]["attrs"])
    assert attrs["CKA_PRIVATE"] is False and attrs["CKA_VERIFY"] is True
    # The private half is never public.
    r = api.post(
        f"/km/v1/softcards/{card_id}/public/search",
        {"attrs": encode({"CKA_CLASS": C.CKO_PRIVATE_KEY})},
    )
    assert api.ok(r)["objects"] == []


@pytest.mark.parametrize(
    "mech,digest",
    [
        ("CKM_SHA256_RSA_PKCS", hashes.SHA256()),
        ("CKM_SHA384_RSA_PKCS", hashes.SHA384()),
        ("CKM_SHA512_RSA_PKCS", hashes.SHA512()),
    ],
)
def test_rsa_pkcs1_hash_and_sign(shared_card: Any, rsa_pair: Any, mech: str, digest: Any) -> None:
    api, _, token = shared_card
    _, priv_h, pub = rsa_pair
    data = os.urandom(1000)
    sig = unb64(api.ok(_sign(api, token, priv_h, mech, data))["signature"])
    pub.verify(sig, data, padding.PKCS1v15(), digest)


def test_rsa_pkcs_digest_info_and_raw(shared_card: Any, rsa_pair: Any) -> None:
    api, _, token = shared_card
    _, priv_h, pub = rsa_pair
    digest = hashlib.sha256(b"message").digest()
    sig = unb64(
        api.ok(_sign(api, token, priv_h, "CKM_RSA_PKCS", SHA256_DIGEST_INFO + digest))["signature"]
    )
    pub.verify(sig, b"message", padding.PKCS1v15(), hashes.SHA256())
    # TLS 1.0's MD5+SHA-1 is no DigestInfo: raw type-1 padding, checked by recovering it.
    raw = os.urandom(36)
    sig = unb64(api.ok(_sign(api, token, priv_h, "CKM_RSA_PKCS", raw))["signature"])
    n, e = pub.public_numbers().n, pub.public_numbers().e
    em = pow(int.from_bytes(sig, "big"), e, n).to_bytes(256, "big")
    assert em == b"\x00\x01" + b"\xff" * (256 - 3 - 36) + b"\x00" + raw


def test_rsa_pss(shared_card: Any, rsa_pair: Any) -> None:
    api, _, token = shared_card
    _, priv_h, pub = rsa_pair
    data = b"pss data"
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    r = _sign(
        api,
        token,
        priv_h,
        "CKM_SHA256_RSA_PKCS_PSS",
        data,
        hash="sha256",
        mgf="sha256",
        salt_length=32,
    )
    sig = unb64(api.ok(r)["signature"])
    pub.verify(sig, data, pss, hashes.SHA256())
    digest = hashlib.sha384(data).digest()
    pss384 = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    sig = unb64(
        api.ok(
            _sign(
                api,
                token,
                priv_h,
                "CKM_RSA_PKCS_PSS",
                digest,
                hash="sha384",
                mgf="sha384",
                salt_length=48,
            )
        )["signature"]
    )
    pub.verify(sig, digest, pss384, utils.Prehashed(hashes.SHA384()))
    # The hash of a SHA*-PSS form must be its own; a salt too long for the modulus is refused.
    r = _sign(
        api,
        token,
        priv_h,
        "CKM_SHA256_RSA_PKCS_PSS",
        data,
        hash="sha512",
        mgf="sha256",
        salt_length=32,
    )
    assert r.code == "MECHANISM_PARAM_INVALID"
    r = _sign(
        api, token, priv_h, "CKM_RSA_PKCS_PSS", digest, hash="sha384", mgf="sha384", salt_length=300
    )
    assert r.code == "MECHANISM_PARAM_INVALID"


@pytest.mark.parametrize("h", ["sha1", "sha256", "sha384", "sha512"])
def test_rsa_oaep_decrypt(shared_card: Any, rsa_pair: Any, h: str) -> None:
    api, _, token = shared_card
    _, priv_h, pub = rsa_pair
    algo = {
        "sha1": hashes.SHA1(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }[h]
    ct = pub.encrypt(b"secret", padding.OAEP(padding.MGF1(algo), algo, None))
    r = api.post(
        DEC,
        {"key": priv_h, "mechanism": "CKM_RSA_PKCS_OAEP", "data": b64(ct), "hash": h, "mgf": h},
        token=token,
    )
    assert unb64(api.ok(r)["data"]) == b"secret"
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    r = api.post(
        DEC,
        {"key": priv_h, "mechanism": "CKM_RSA_PKCS_OAEP", "data": b64(bad), "hash": h, "mgf": h},
        token=token,
    )
    assert r.code == "ENCRYPTED_DATA_INVALID"


def test_rsa_pkcs_decrypt(shared_card: Any, rsa_pair: Any) -> None:
    api, _, token = shared_card
    _, priv_h, pub = rsa_pair
    ct = pub.encrypt(b"v1.5", padding.PKCS1v15())
    r = api.post(DEC, {"key": priv_h, "mechanism": "CKM_RSA_PKCS", "data": b64(ct)}, token=token)
    assert unb64(api.ok(r)["data"]) == b"v1.5"


def test_public_key_cannot_sign(shared_card: Any, rsa_pair: Any) -> None:
    api, _, token = shared_card
    pub_h, _, _ = rsa_pair
    assert _sign(api, token, pub_h, "CKM_SHA256_RSA_PKCS", b"x").code == "KEY_NOT_FOUND"


@pytest.mark.parametrize(
    "mech,algo",
    [
        ("CKM_ECDSA_SHA256", hashes.SHA256()),
        ("CKM_ECDSA_SHA384", hashes.SHA384()),
        ("CKM_ECDSA_SHA512", hashes.SHA512()),
    ],
)
def test_ecdsa_hash_and_sign(shared_card: Any, ec_pair: Any, mech: str, algo: Any) -> None:
    api, _, token = shared_card
    _, priv_h, pub = ec_pair
    data = os.urandom(300)
    sig = unb64(api.ok(_sign(api, token, priv_h, mech, data))["signature"])
    assert len(sig) == 64
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    pub.verify(der, data, ec.ECDSA(algo))


def test_ecdsa_prehashed(shared_card: Any, ec_pair: Any) -> None:
    api, _, token = shared_card
    _, priv_h, pub = ec_pair
    digest = hashlib.sha256(b"m").digest()
    sig = unb64(api.ok(_sign(api, token, priv_h, "CKM_ECDSA", digest))["signature"])
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    pub.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert _sign(api, token, priv_h, "CKM_ECDSA", b"odd length").code == "DATA_LEN_RANGE"
    assert _sign(api, token, priv_h, "CKM_SHA256_RSA_PKCS", b"x").code == "KEY_TYPE_INCONSISTENT"


def test_ec_named_curve_and_p384(shared_card: Any) -> None:
    api, card_id, token = shared_card
    named = b"\x13\x09secp384r1"
    body = api.ok(
        _pair(api, card_id, token, "CKM_EC_KEY_PAIR_GEN", {"CKA_EC_PARAMS": named}, dict(_PRIV))
    )
    attrs = decode(body["public"]["attrs"])
    assert attrs["CKA_EC_PARAMS"] == P384
    point = attrs["CKA_EC_POINT"]
    assert point[0] == 0x04 and point[1] == 97 and point[2] == 0x04  # DER OCTET STRING


@pytest.mark.parametrize("pub,priv,code", [
    ({"CKA_MODULUS_BITS": 1024}, {}, "KEY_SIZE_RANGE"),
    ({"CKA_MODULUS_BITS": 2048, "CKA_PUBLIC_EXPONENT": b"\x03"}, {}, "ATTRIBUTE_VALUE_INVALID"),
    ({}, {}, "TEMPLATE_INCOMPLETE"),
    ({"CKA_MODULUS_BITS": 2048}, {"CKA_EXTRACTABLE": True}, "TEMPLATE_INCONSISTENT"),
    ({"CKA_MODULUS_BITS": 2048}, {"CKA_SENSITIVE": False}, "TEMPLATE_INCONSISTENT"),
    ({"CKA_MODULUS_BITS": 2048}, {"CKA_TOKEN": False}, "TEMPLATE_INCONSISTENT"),
    ({"CKA_MODULUS_BITS": 2048}, {"CKA_PRIVATE": False}, "TEMPLATE_INCONSISTENT"),
    ({"CKA_MODULUS_BITS": 2048}, {"CKA_VALUE_LEN": 5}, "ATTRIBUTE_TYPE_INVALID"),
])  # fmt: skip
def test_rsa_pair_template_rules(shared_card: Any, pub: Any, priv: Any, code: str) -> None:
    api, card_id, token = shared_card
    r = _pair(api, card_id, token, "CKM_RSA_PKCS_KEY_PAIR_GEN", pub, priv)
    assert r.code == code, r.body


def test_import_private_key_rsa_and_ec(shared_card: Any) -> None:
    api, card_id, token = shared_card
    key = rsa.generate_private_key(65537, 2048)
    n = key.private_numbers()

    def be(v: int) -> bytes:
        return v.to_bytes((v.bit_length() + 7) // 8, "big")

    t = {
        "CKA_CLASS": C.CKO_PRIVATE_KEY,
        "CKA_KEY_TYPE": C.CKK_RSA,
        "CKA_TOKEN": True,
        "CKA_PRIVATE": True,
        "CKA_SIGN": True,
        "CKA_MODULUS": be(n.public_numbers.n),
        "CKA_PUBLIC_EXPONENT": be(n.public_numbers.e),
        "CKA_PRIVATE_EXPONENT": be(n.d),
        "CKA_PRIME_1": be(n.p),
        "CKA_PRIME_2": be(n.q),
        "CKA_EXPONENT_1": be(n.dmp1),
        "CKA_EXPONENT_2": be(n.dmq1),
        "CKA_COEFFICIENT": be(n.iqmp),
    }
    made = api.ok(api.create(card_id, token, t))
    attrs = decode(made["attrs"])
    assert attrs["CKA_LOCAL"] is False and attrs["CKA_ALWAYS_SENSITIVE"] is False
    assert attrs["CKA_NEVER_EXTRACTABLE"] is False and "CKA_PRIVATE_EXPONENT" not in attrs
    sig = unb64(api.ok(_sign(api, token, made["handle"], "CKM_SHA256_RSA_PKCS", b"d"))["signature"])
    key.public_key().verify(sig, b"d", padding.PKCS1v15(), hashes.SHA256())
    # An imported key cannot claim it was made here.
    assert api.create(card_id, token, {**t, "CKA_LOCAL": True}).code == "TEMPLATE_INCONSISTENT"
    eck = ec.generate_private_key(ec.SECP256R1())
    t = {
        "CKA_CLASS": C.CKO_PRIVATE_KEY,
        "CKA_KEY_TYPE": C.CKK_EC,
        "CKA_TOKEN": True,
        "CKA_PRIVATE": True,
        "CKA_EC_PARAMS": P256,
        "CKA_VALUE": eck.private_numbers().private_value.to_bytes(32, "big"),
    }
    made = api.ok(api.create(card_id, token, t))
    assert "CKA_VALUE" not in made["attrs"]
    sig = unb64(api.ok(_sign(api, token, made["handle"], "CKM_ECDSA_SHA256", b"d"))["signature"])
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    eck.public_key().verify(der, b"d", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("case", sorted(GCM_CASES))
def test_aes_gcm_known_answers(shared_card: Any, case: str) -> None:
    api, card_id, token = shared_card
    key, iv, aad, pt, ct, tag = GCM_CASES[case]
    handle = api.import_key(card_id, token, C.CKK_AES, key, CKA_TOKEN=True, CKA_PRIVATE=True)
    body = {
        "key": handle,
        "mechanism": "CKM_AES_GCM",
        "iv": b64(iv),
        "aad": b64(aad),
        "tag_bits": 128,
    }
    out = unb64(api.ok(api.post(ENC, {**body, "data": b64(pt)}, token=token))["data"])
    assert out == ct + tag
    back = unb64(api.ok(api.post(DEC, {**body, "data": b64(ct + tag)}, token=token))["data"])
    assert back == pt
    bad = ct + bytes([tag[0] ^ 1]) + tag[1:]
    assert api.post(DEC, {**body, "data": b64(bad)}, token=token).code == "ENCRYPTED_DATA_INVALID"
    # A 96-bit tag is the first 12 bytes of the full one.
    r = api.post(ENC, {**body, "tag_bits": 96, "data": b64(pt)}, token=token)
    assert unb64(api.ok(r)["data"]) == ct + tag[:12]
    # ... and decrypts (the service's truncated-tag path), refusing a wrong one.
    short = {**body, "tag_bits": 96}
    r = api.post(DEC, {**short, "data": b64(ct + tag[:12])}, token=token)
    assert unb64(api.ok(r)["data"]) == pt
    bad12 = ct + tag[:11] + bytes([tag[11] ^ 1])
    r = api.post(DEC, {**short, "data": b64(bad12)}, token=token)
    assert r.code == "ENCRYPTED_DATA_INVALID"
    assert (
        api.post(ENC, {**body, "tag_bits": 100, "data": b64(pt)}, token=token).code
        == "MECHANISM_PARAM_INVALID"
    )


def test_offload_rule_by_family_and_curve() -> None:
    # What leaves the event loop for the thread pool (ops.<family>.offload): RSA and ECDSA above
    # P-256 (work above the hand-off's own cost); P-256, HMAC and AES stay on the loop. Both
    # paths run for real in the tests above (P-256 and P-384 signatures, RSA).
    from pkcs11ws.server import ops

    assert ops.rsa.offload(rsa.generate_private_key(65537, 2048))
    assert not ops.ec.offload(ec.generate_private_key(ec.SECP256R1()))
    assert ops.ec.offload(ec.generate_private_key(ec.SECP384R1()))
    assert ops.ec.offload(ec.generate_private_key(ec.SECP521R1()))
    for family in (ops.hmac, ops.aes_cbc, ops.aes_gcm):
        assert not family.offload(bytes(32))


def test_key_pairs_count_as_keys_for_softcard_delete(shared_card: Any) -> None:
    """A softcard holding only a key pair (or only its public half) is not empty: delete
    without force answers SOFTCARD_NOT_EMPTY, and the listing counts both halves as keys."""
    api = shared_card[0]
    card_id, token = api.new_card(b"pair only")
    body = api.ok(
        _pair(
            api,
            card_id,
            token,
            "CKM_EC_KEY_PAIR_GEN",
            {"CKA_EC_PARAMS": bytes.fromhex("06082a8648ce3d030107")},
            {**_PRIV, "CKA_LABEL": b"ec"},
        )
    )
    listed = {c["id"]: c for c in api.ok(api.get("/km/v1/softcards"))["softcards"]}
    assert listed[card_id]["keys"] == 2
    assert api.ok(api.get(f"/km/v1/softcards/{card_id}"))["keys"] == 2
    r = api.delete(f"/km/v1/softcards/{card_id}", idem=new_idem())
    assert (r.status, r.code) == (409, "SOFTCARD_NOT_EMPTY")
    priv = body["private"]["handle"]
    r = api.delete(f"/km/v1/softcards/{card_id}/objects/{priv}", token=token, idem=new_idem())
    assert r.status == 200
    r = api.delete(f"/km/v1/softcards/{card_id}", idem=new_idem())
    assert (r.status, r.code) == (409, "SOFTCARD_NOT_EMPTY")  # the public key is still a key
    assert api.delete(f"/km/v1/softcards/{card_id}?force=true", idem=new_idem()).status == 200


def test_batch_offloaded_items_each_answered_as_alone(
    shared_card: Any, rsa_pair: Any, ec_pair: Any
) -> None:
    """A batch's RSA items leave the event loop together (one thread hand-off for the batch,
    batch_items._run_offloaded); each still gets the answer its single request gets, in its place:
    signatures, an error raised by the signing itself, a refusal before it, next to an ECDSA
    P-256 item signed on the loop."""
    api, _, token = shared_card
    pub_h, priv_h, pub = rsa_pair
    _, ec_priv, ec_pub = ec_pair
    data = [os.urandom(100) for _ in range(3)]
    requests = [
        {"key": priv_h, "mechanism": "CKM_SHA256_RSA_PKCS", "data": b64(data[0])},
        {"key": ec_priv, "mechanism": "CKM_ECDSA_SHA256", "data": b64(data[1])},
        {"key": priv_h, "mechanism": "CKM_RSA_PKCS", "data": b64(os.urandom(300))},  # too long
        {"key": pub_h, "mechanism": "CKM_SHA256_RSA_PKCS", "data": b64(data[0])},  # refused
        {"key": priv_h, "mechanism": "CKM_SHA256_RSA_PKCS_PSS", "data": b64(data[2])},  # no salt
        {"key": priv_h, "mechanism": "CKM_SHA256_RSA_PKCS", "data": b64(data[2])},
    ]
    items = [{"op": "sign", "token": token, "request": r} for r in requests]
    r = api.post("/crypto/v1/batch", {"items": items})
    assert r.status == 200, r.body
    got = [(x["status"], x["answer"]) for x in r.json["results"]]
    alone = [api.post(SIGN, req, token=token) for req in requests]
    for i, ((status, answer), one) in enumerate(zip(got, alone, strict=True)):
        assert status == one.status, (i, answer, one.body)
        if i != 1:  # ECDSA signatures differ each time: checked below
            assert answer == one.json, i
    assert [a.get("code") for _, a in got] == [
        None,
        None,
        "DATA_LEN_RANGE",
        "KEY_NOT_FOUND",  # a public key cannot sign
        "MECHANISM_PARAM_INVALID",
        None,
    ]
    pub.verify(unb64(got[0][1]["signature"]), data[0], padding.PKCS1v15(), hashes.SHA256())
    pub.verify(unb64(got[5][1]["signature"]), data[2], padding.PKCS1v15(), hashes.SHA256())
    sig = unb64(got[1][1]["signature"])
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    ec_pub.verify(der, data[1], ec.ECDSA(hashes.SHA256()))
