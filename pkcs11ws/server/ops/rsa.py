"""RSA with a private key: PKCS#1 v1.5 and PSS signatures, PKCS#1 v1.5 and OAEP decryption.

CKM_RSA_PKCS signs what it is given as a DigestInfo (the caller hashed and encoded it):
a DigestInfo of SHA-1 or SHA-2 is signed as that prehashed digest; any other input (the
MD5+SHA-1 of TLS 1.0/1.1) gets the PKCS#1 v1.5 type 1 padding and the private operation from the
key's numbers. Verification and encryption use the public key and run in the module.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from pkcs11ws.mechanisms import Mechanism, Param
from pkcs11ws.protocol import ProtocolError as ApiError

HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# DER prefixes of DigestInfo (RFC 8017 9.2 note 1) by hash.
DIGEST_INFO: Final[dict[bytes, str]] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): "sha1",
    bytes.fromhex("302d300d06096086480165030402040500041c"): "sha224",
    bytes.fromhex("3031300d060960864801650304020105000420"): "sha256",
    bytes.fromhex("3041300d060960864801650304020205000430"): "sha384",
    bytes.fromhex("3051300d060960864801650304020305000440"): "sha512",
}


def offload(key: rsa.RSAPrivateKey) -> bool:
    """Always: an RSA-2048 signature is about 0.5 ms of CPU (RSA-4096 about 3.5 ms), several
    times the thread hand-off (bench/results/README.md)."""
    return True


def load(value: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(value, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def hash_of(name: str | None, what: str) -> hashes.HashAlgorithm:
    cls = HASHES.get(name or "")
    if cls is None:
        raise ApiError("MECHANISM_PARAM_INVALID", f"{what}: unknown hash {name!r}")
    return cls()


def _pss(mech: Mechanism, key: rsa.RSAPrivateKey, body: dict[str, Any]) -> padding.PSS:
    h = body.get("hash")
    if mech.digest and h != mech.digest:
        raise ApiError("MECHANISM_PARAM_INVALID", f"{mech.name} hashes with {mech.digest}")
    salt = body.get("salt_length")
    hlen = hash_of(h, "PSS").digest_size
    if salt is None or salt > key.key_size // 8 - hlen - 2:
        raise ApiError("MECHANISM_PARAM_INVALID", "PSS salt length out of range")
    return padding.PSS(padding.MGF1(hash_of(body.get("mgf"), "MGF1")), salt)


def _raw_v15(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    k = (key.key_size + 7) // 8
    if len(data) > k - 11:
        raise ApiError("DATA_LEN_RANGE", "too long for a PKCS#1 v1.5 signature")
    em = b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data
    n = key.private_numbers()
    # CRT private operation with blinding so the time does not depend on the message.
    pub = n.public_numbers
    m = int.from_bytes(em, "big")
    r = secrets.randbelow(pub.n - 2) + 2
    mb = (m * pow(r, pub.e, pub.n)) % pub.n
    s1, s2 = pow(mb, n.dmp1, n.p), pow(mb, n.dmq1, n.q)
    s = (s2 + n.q * ((n.iqmp * (s1 - s2)) % n.p)) * pow(r, -1, pub.n) % pub.n
    return s.to_bytes(k, "big")


def sign(mech: Mechanism, key: rsa.RSAPrivateKey, body: dict[str, Any]) -> bytes:
    data: bytes = body["data"]
    if mech.param is Param.RSA_PSS:
        pss = _pss(mech, key, body)
        if mech.digest:
            return key.sign(data, pss, hash_of(mech.digest, "PSS"))
        h = hash_of(body.get("hash"), "PSS")
        if len(data) != h.digest_size:
            raise ApiError("DATA_LEN_RANGE", f"CKM_RSA_PKCS_PSS signs a {h.name} digest")
        return key.sign(data, pss, utils.Prehashed(h))
    if mech.digest:
        return key.sign(data, padding.PKCS1v15(), hash_of(mech.digest, "PKCS#1"))
    for prefix, name in DIGEST_INFO.items():
        h = hash_of(name, "PKCS#1")
        if len(data) == len(prefix) + h.digest_size and data.startswith(prefix):
            return key.sign(data[len(prefix) :], padding.PKCS1v15(), utils.Prehashed(h))
    return _raw_v15(key, data)


def decrypt(mech: Mechanism, key: rsa.RSAPrivateKey, body: dict[str, Any]) -> tuple[bytes, bytes]:
    data: bytes = body["data"]
    if len(data) != key.key_size // 8:
        raise ApiError("ENCRYPTED_DATA_LEN_RANGE", "RSA ciphertexts are the modulus' length")
    pad: padding.AsymmetricPadding
    if mech.param is Param.RSA_OAEP:
        mgf = padding.MGF1(hash_of(body.get("mgf"), "MGF1"))
        pad = padding.OAEP(mgf, hash_of(body.get("hash"), "OAEP"), body.get("label") or None)
    else:
        pad = padding.PKCS1v15()
    try:
        return key.decrypt(data, pad), b""
    except ValueError:
        raise ApiError("ENCRYPTED_DATA_INVALID", "the RSA ciphertext does not decrypt") from None


def encrypt(mech: Mechanism, key: Any, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", "RSA encryption uses the public key (in the module)")


def verify(mech: Mechanism, key: Any, body: dict[str, Any]) -> None:
    raise ApiError("MECHANISM_INVALID", "RSA verification uses the public key (in the module)")
