"""Public-key operations in the module: RSA and ECDSA verification, RSA encryption.

What a public key does needs no secret, so the module does it with cryptography from the key's
CKA_PUBLIC_KEY_INFO, without a round trip (the key service does only private-key work).
cryptography is imported on first use, not at the module's start-up.
"""

from __future__ import annotations

from pkcs11ws import constants as C
from pkcs11ws.errors import PKCS11Error
from pkcs11ws.mechanisms import Family, Mechanism, Param

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BY_DIGEST_LEN = {20: "sha1", 28: "sha224", 32: "sha256", 48: "sha384", 64: "sha512"}


def _hash(name: str) -> Any:
    from cryptography.hazmat.primitives import hashes

    algos: dict[str, Any] = {
        "sha1": hashes.SHA1,
        "sha224": hashes.SHA224,
        "sha256": hashes.SHA256,
        "sha384": hashes.SHA384,
        "sha512": hashes.SHA512,
    }
    algo = algos.get(name)
    if algo is None:
        raise PKCS11Error(C.CKR_MECHANISM_PARAM_INVALID, f"hash {name!r} is not supported")
    return algo()


def load(spki: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_der_public_key(spki)


def _pss(mech: Mechanism, key: Any, params: dict[str, Any]) -> Any:
    from cryptography.hazmat.primitives.asymmetric import padding

    if mech.digest and params["hash"] != mech.digest:
        raise PKCS11Error(C.CKR_MECHANISM_PARAM_INVALID, f"{mech.name} hashes with {mech.digest}")
    return padding.PSS(padding.MGF1(_hash(params["mgf"])), params["salt_length"])


def verify(
    mech: Mechanism, key: Any, data: bytes, signature: bytes, params: dict[str, Any]
) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    try:
        if mech.family is Family.EC:
            n = len(signature) // 2
            der = utils.encode_dss_signature(
                int.from_bytes(signature[:n], "big"), int.from_bytes(signature[n:], "big")
            )
            if mech.digest:
                algo: Any = _hash(mech.digest)
            else:
                name = _BY_DIGEST_LEN.get(len(data))
                if name is None:
                    raise PKCS11Error(C.CKR_DATA_LEN_RANGE, "CKM_ECDSA verifies a digest")
                algo = utils.Prehashed(_hash(name))
            key.verify(der, data, ec.ECDSA(algo))
        elif mech.param is Param.RSA_PSS:
            pss = _pss(mech, key, params)
            if mech.digest:
                key.verify(signature, data, pss, _hash(mech.digest))
            else:
                key.verify(signature, data, pss, utils.Prehashed(_hash(params["hash"])))
        elif mech.digest:
            key.verify(signature, data, padding.PKCS1v15(), _hash(mech.digest))
        else:
            # CKM_RSA_PKCS: the signed block must be exactly the given data, type-1 padded.
            nums = key.public_numbers()
            k = (key.key_size + 7) // 8
            em = pow(int.from_bytes(signature, "big"), nums.e, nums.n).to_bytes(k, "big")
            want = b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data
            if len(data) > k - 11 or em != want:
                raise InvalidSignature()
    except InvalidSignature:
        raise PKCS11Error(C.CKR_SIGNATURE_INVALID, "the signature does not verify") from None


def encrypt(mech: Mechanism, key: Any, data: bytes, params: dict[str, Any]) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import padding

    if mech.family is not Family.RSA:
        raise PKCS11Error(C.CKR_MECHANISM_INVALID, f"{mech.name} does not encrypt")
    pad: Any
    if mech.param is Param.RSA_OAEP:
        pad = padding.OAEP(
            padding.MGF1(_hash(params["mgf"])), _hash(params["hash"]), params.get("label")
        )
    else:
        pad = padding.PKCS1v15()
    try:
        out: bytes = key.encrypt(data, pad)
    except ValueError:
        raise PKCS11Error(C.CKR_DATA_LEN_RANGE, "too long for the modulus") from None
    return out
