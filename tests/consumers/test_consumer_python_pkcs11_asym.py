"""python-pkcs11 (0.10) with key pairs and AES-GCM through libpkcs11ws.so and the real key
service: RSA and EC key pairs generated on the token, PKCS#1 v1.5, PSS and ECDSA signatures and
OAEP decryption checked with cryptography (known answers in both directions: what the module signs
verifies in cryptography, what cryptography encrypts the module decrypts), the private value
never readable, AES-GCM single-part and multi-part against the GCM specification's test case 4.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as E
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from pkcs11ws import constants as C
from pkcs11ws import mechanisms as M
from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.service.test_server_asym import GCM_CASES

CAPS = MechanismFlag.SIGN | MechanismFlag.VERIFY | MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT


@pytest.fixture(scope="module")
def shared_session(service: Any) -> Any:
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
def pkcs11_rsa_pair(shared_session: Any) -> Any:
    return shared_session.generate_keypair(
        KeyType.RSA, 2048, store=True, label="py-rsa", id=b"\x10", capabilities=CAPS
    )


@pytest.fixture(scope="module")
def pkcs11_ec_pair(shared_session: Any) -> Any:
    params = shared_session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")}, local=True
    )
    caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
    return params.generate_keypair(store=True, label="py-ec", id=b"\x11", capabilities=caps)


def test_rsa_pair_attributes(shared_session: Any, pkcs11_rsa_pair: Any) -> None:
    pub, priv = pkcs11_rsa_pair
    assert pub[Attribute.MODULUS_BITS] == 2048 and pub[Attribute.PUBLIC_EXPONENT] == b"\x01\x00\x01"
    assert priv[Attribute.MODULUS] == pub[Attribute.MODULUS]
    assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
    assert priv[Attribute.LOCAL] and priv[Attribute.KEY_GEN_MECHANISM] == 0  # RSA_PKCS_KEY_PAIR_GEN
    for attr in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.VALUE):
        with pytest.raises(E.AttributeSensitive):
            priv[attr]
    found = list(
        shared_session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: b"\x10"}
        )
    )
    assert [o.handle for o in found] == [priv.handle]


def test_rsa_signatures_verify_in_cryptography(pkcs11_rsa_pair: Any) -> None:
    pub, priv = pkcs11_rsa_pair
    key = _spki(pub)
    data = os.urandom(2000)
    sig = priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    assert pub.verify(data, sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    assert not pub.verify(data + b"x", sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    sig = priv.sign(
        data,
        mechanism=Mechanism.SHA512_RSA_PKCS_PSS,
        mechanism_param=(Mechanism.SHA512, MGF.SHA512, 64),
    )
    key.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA512()), 64), hashes.SHA512())
    assert pub.verify(
        data,
        sig,
        mechanism=Mechanism.SHA512_RSA_PKCS_PSS,
        mechanism_param=(Mechanism.SHA512, MGF.SHA512, 64),
    )
    # Multi-part hash-and-sign: the core accumulates, C_SignFinal makes the one request.
    sig = priv.sign(iter([data[:700], data[700:]]), mechanism=Mechanism.SHA384_RSA_PKCS)
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA384())


OAEP_HASHES = [
    (Mechanism.SHA_1, MGF.SHA1, hashes.SHA1()),
    (Mechanism.SHA256, MGF.SHA256, hashes.SHA256()),
    (Mechanism.SHA512, MGF.SHA512, hashes.SHA512()),
]


@pytest.mark.parametrize("h,mgf,algo", OAEP_HASHES)
def test_rsa_oaep_both_ways(pkcs11_rsa_pair: Any, h: Any, mgf: Any, algo: Any) -> None:
    pub, priv = pkcs11_rsa_pair
    key = _spki(pub)
    ct = key.encrypt(b"from cryptography", padding.OAEP(padding.MGF1(algo), algo, None))
    assert (
        priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(h, mgf, None))
        == b"from cryptography"
    )
    # Encryption with the public key runs in the module.
    ct = pub.encrypt(
        b"from the module", mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(h, mgf, None)
    )
    assert (
        priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(h, mgf, None))
        == b"from the module"
    )


def test_ecdsa_p384(pkcs11_ec_pair: Any) -> None:
    pub, priv = pkcs11_ec_pair
    key = _spki(pub)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    data = os.urandom(500)
    sig = priv.sign(data, mechanism=Mechanism.ECDSA_SHA384)
    assert len(sig) == 96
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big")
    )
    key.verify(der, data, ec.ECDSA(hashes.SHA384()))
    assert pub.verify(data, sig, mechanism=Mechanism.ECDSA_SHA384)
    assert not pub.verify(data, bytes(96), mechanism=Mechanism.ECDSA_SHA384)


# Every hash-and-sign row of the mechanism table: a row added to an existing family is tested
# by being added (the table is the test's parameter list).
SIGN_ROWS = [
    m
    for m in M.MECHANISMS
    if m.family in (M.Family.RSA, M.Family.EC) and m.flags & C.CKF_SIGN and m.digest
]
HASH_CODE = {name: code for code, name in M.HASHES.items()}
MGF_CODE = {name: code for code, name in M.MGFS.items()}


@pytest.mark.parametrize("row", SIGN_ROWS, ids=lambda m: m.name)
def test_every_hash_and_sign_row(
    pkcs11_rsa_pair: Any, pkcs11_ec_pair: Any, row: M.Mechanism
) -> None:
    pub, priv = pkcs11_rsa_pair if row.family is M.Family.RSA else pkcs11_ec_pair
    key = _spki(pub)
    algo = getattr(hashes, row.digest.upper())()
    data = os.urandom(777)
    param = None
    if row.param is M.Param.RSA_PSS:
        param = (Mechanism(HASH_CODE[row.digest]), MGF(MGF_CODE[row.digest]), algo.digest_size)
    sig = priv.sign(data, mechanism=Mechanism(row.code), mechanism_param=param)
    if row.param is M.Param.RSA_PSS:
        key.verify(sig, data, padding.PSS(padding.MGF1(algo), algo.digest_size), algo)
    elif row.family is M.Family.RSA:
        key.verify(sig, data, padding.PKCS1v15(), algo)
    else:
        n = len(sig) // 2
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big")
        )
        key.verify(der, data, ec.ECDSA(algo))
    # The module's own verification (in the module, with the public key) agrees.
    assert pub.verify(data, sig, mechanism=Mechanism(row.code), mechanism_param=param)
    assert not pub.verify(data + b"x", sig, mechanism=Mechanism(row.code), mechanism_param=param)


def test_aes_gcm_known_answer_single_and_multipart(shared_session: Any) -> None:
    key_bytes, iv, aad, pt, ct, tag = GCM_CASES["case 4"]
    key = shared_session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.VALUE: key_bytes,
        }
    )
    params = GCMParams(iv, aad, 128)
    assert key.encrypt(pt, mechanism=Mechanism.AES_GCM, mechanism_param=params) == ct + tag
    assert key.decrypt(ct + tag, mechanism=Mechanism.AES_GCM, mechanism_param=params) == pt
    parts = [pt[:17], pt[17:40], pt[40:]]
    out = b"".join(key.encrypt(iter(parts), mechanism=Mechanism.AES_GCM, mechanism_param=params))
    assert out == ct + tag
    with pytest.raises(E.EncryptedDataInvalid):
        key.decrypt(
            ct + bytes([tag[0] ^ 1]) + tag[1:], mechanism=Mechanism.AES_GCM, mechanism_param=params
        )
