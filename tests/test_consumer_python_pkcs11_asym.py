"""python-pkcs11 (0.10) with key pairs and AES-GCM through libpkcs11ws.so and the real key
service: RSA and EC key pairs generated on the token, PKCS#1 v1.5 and ECDSA signatures checked
with cryptography and by the module's own verification, the private value never readable.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as E
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config

CAPS = (MechanismFlag.SIGN | MechanismFlag.VERIFY | MechanismFlag.ENCRYPT
        | MechanismFlag.DECRYPT)  # fmt: skip


@pytest.fixture(scope="module")
def session(service: Any) -> Any:
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name, pin = "pa" + uuid.uuid4().hex[:12], uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        lib = pkcs11.lib(module_path())
        lib.reinitialize()
        token = lib.get_token(token_label=name)
        with token.open(rw=True, user_pin=pin) as s:
            yield s
        lib.finalize()


def _spki(pub: Any) -> Any:
    """The public half as cryptography's key (python-pkcs11 0.10 has no CKA_PUBLIC_KEY_INFO)."""
    if pub.key_type == KeyType.RSA:
        return rsa.RSAPublicNumbers(
            int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(pub[Attribute.MODULUS], "big"),
        ).public_key()
    return serialization.load_der_public_key(encode_ec_public_key(pub))


@pytest.fixture(scope="module")
def rsa_pair(session: Any) -> Any:
    return session.generate_keypair(KeyType.RSA, 2048, store=True, label="py-rsa", id=b"\x10",
                                    capabilities=CAPS)  # fmt: skip


@pytest.fixture(scope="module")
def ec_pair(session: Any) -> Any:
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")}, local=True
    )
    caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
    return params.generate_keypair(store=True, label="py-ec", id=b"\x11", capabilities=caps)


def test_rsa_pair_attributes(session: Any, rsa_pair: Any) -> None:
    pub, priv = rsa_pair
    assert pub[Attribute.MODULUS_BITS] == 2048 and pub[Attribute.PUBLIC_EXPONENT] == b"\x01\x00\x01"
    assert priv[Attribute.MODULUS] == pub[Attribute.MODULUS]
    assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
    assert priv[Attribute.LOCAL] and priv[Attribute.KEY_GEN_MECHANISM] == 0  # RSA_PKCS_KEY_PAIR_GEN
    for attr in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.VALUE):
        with pytest.raises(E.AttributeSensitive):
            priv[attr]
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                      Attribute.ID: b"\x10"}))  # fmt: skip
    assert [o.handle for o in found] == [priv.handle]


def test_rsa_signatures_verify_in_cryptography(rsa_pair: Any) -> None:
    pub, priv = rsa_pair
    key = _spki(pub)
    data = os.urandom(2000)
    sig = priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    assert pub.verify(data, sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    assert not pub.verify(data + b"x", sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    # Multi-part hash-and-sign: the core accumulates, C_SignFinal makes the one request.
    sig = priv.sign(iter([data[:700], data[700:]]), mechanism=Mechanism.SHA384_RSA_PKCS)
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA384())


def test_ecdsa_p384(ec_pair: Any) -> None:
    pub, priv = ec_pair
    key = _spki(pub)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    data = os.urandom(500)
    sig = priv.sign(data, mechanism=Mechanism.ECDSA_SHA384)
    assert len(sig) == 96
    der = utils.encode_dss_signature(int.from_bytes(sig[:48], "big"),
                                     int.from_bytes(sig[48:], "big"))  # fmt: skip
    key.verify(der, data, ec.ECDSA(hashes.SHA384()))
    assert pub.verify(data, sig, mechanism=Mechanism.ECDSA_SHA384)
    assert not pub.verify(data, bytes(96), mechanism=Mechanism.ECDSA_SHA384)
