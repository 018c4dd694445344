"""PyKCS11 (1.5) with key pairs through libpkcs11ws.so and the real key service: RSA-2048 and
EC P-256 pairs generated on the token; SHA256_RSA_PKCS, RSA_PKCS of a DigestInfo and ECDSA
signatures checked with cryptography, RSA PKCS#1 v1.5 decryption of what cryptography encrypted,
and the module's own verification (public key, no round trip) accepting and refusing."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import PyKCS11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config

P256 = bytes.fromhex("06082a8648ce3d030107")
SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.fixture(scope="module")
def shared_se(service: Any) -> Any:
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name, pin = "py" + uuid.uuid4().hex[:12], uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        lib = PyKCS11.PyKCS11Lib()
        lib.load(module_path())
        slot = next(
            s
            for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == name
        )
        s = lib.openSession(slot, PyKCS11.CKF_RW_SESSION)
        s.login(pin)
        yield s
        lib.closeAllSessions(slot)
        lib.unload()


def _pair(shared_se: Any, mech: int, pub: list[Any], label: str) -> tuple[Any, Any]:
    common = [(C.CKA_TOKEN, True), (C.CKA_LABEL, label), (C.CKA_ID, label.encode())]
    return shared_se.generateKeyPair(
        [*common, (C.CKA_VERIFY, True), *pub],
        [*common, (C.CKA_PRIVATE, True), (C.CKA_SIGN, True), (C.CKA_DECRYPT, mech == 0)],
        mecha=PyKCS11.Mechanism(mech, None),
    )


def _attr(shared_se: Any, obj: Any, kind: int) -> bytes:
    return bytes(shared_se.getAttributeValue(obj, [kind])[0])


def test_rsa_pair(shared_se: Any) -> None:
    extra = [(C.CKA_MODULUS_BITS, 2048), (C.CKA_ENCRYPT, True)]
    pub, priv = _pair(shared_se, C.CKM_RSA_PKCS_KEY_PAIR_GEN, extra, "pyk-rsa")
    n = int.from_bytes(_attr(shared_se, pub, C.CKA_MODULUS), "big")
    e = int.from_bytes(_attr(shared_se, pub, C.CKA_PUBLIC_EXPONENT), "big")
    key = rsa.RSAPublicNumbers(e, n).public_key()
    data = b"PyKCS11 signs through the key service"
    sig = bytes(shared_se.sign(priv, data, PyKCS11.Mechanism(C.CKM_SHA256_RSA_PKCS, None)))
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    info = SHA256_INFO + hashlib.sha256(data).digest()
    sig2 = bytes(shared_se.sign(priv, info, PyKCS11.Mechanism(C.CKM_RSA_PKCS, None)))
    assert sig2 == sig  # PKCS#1 v1.5 is deterministic: the same signature both ways
    assert shared_se.verify(pub, data, sig, PyKCS11.Mechanism(C.CKM_SHA256_RSA_PKCS, None))
    assert not shared_se.verify(
        pub, data + b"!", sig, PyKCS11.Mechanism(C.CKM_SHA256_RSA_PKCS, None)
    )
    ct = key.encrypt(b"secret", padding.PKCS1v15())
    assert bytes(shared_se.decrypt(priv, ct, PyKCS11.Mechanism(C.CKM_RSA_PKCS, None))) == b"secret"


def test_ec_pair(shared_se: Any) -> None:
    pub, priv = _pair(shared_se, C.CKM_EC_KEY_PAIR_GEN, [(C.CKA_EC_PARAMS, P256)], "pyk-ec")
    point = _attr(shared_se, pub, C.CKA_EC_POINT)
    assert point[:2] == b"\x04\x41"  # DER OCTET STRING around the uncompressed point
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    data = b"ECDSA through PyKCS11"
    sig = bytes(shared_se.sign(priv, data, PyKCS11.Mechanism(C.CKM_ECDSA_SHA256, None)))
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    digest = hashlib.sha256(data).digest()
    sig = bytes(shared_se.sign(priv, digest, PyKCS11.Mechanism(C.CKM_ECDSA, None)))
    assert shared_se.verify(pub, digest, sig, PyKCS11.Mechanism(C.CKM_ECDSA, None))
    # PyKCS11 turns CKR_ATTRIBUTE_SENSITIVE into None.
    assert shared_se.getAttributeValue(priv, [C.CKA_VALUE]) == [None]
