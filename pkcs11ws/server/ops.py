"""The cryptographic operations the service performs with stored keys: AES-CBC(-PAD) and HMAC.

Hot path: called once per /crypto request. HMAC uses the stdlib one-shot hmac.digest (the fastest
in CPython); AES uses cryptography. Callers have already checked the key type and usage flags.
"""

from __future__ import annotations

import hmac
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws.mechanisms import AES_BLOCK, Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError

MAX_RANDOM: Final = 65536


def _check_iv(iv: bytes) -> None:
    if len(iv) != AES_BLOCK:
        raise ApiError("MECHANISM_PARAM_INVALID", f"the IV must be {AES_BLOCK} bytes")


def encrypt(mech: Mechanism, key: bytes, iv: bytes, data: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, last ciphertext block); with no output the chain value is still the IV."""
    _check_iv(iv)
    if mech.padded:
        pad = AES_BLOCK - len(data) % AES_BLOCK
        data = data + bytes((pad,)) * pad
    elif len(data) % AES_BLOCK:
        raise ApiError("DATA_LEN_RANGE", "CKM_AES_CBC needs a multiple of 16 bytes")
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    out = enc.update(data) + enc.finalize()
    return out, (out[-AES_BLOCK:] if out else iv)


def decrypt(mech: Mechanism, key: bytes, iv: bytes, data: bytes) -> tuple[bytes, bytes]:
    """(plaintext, last ciphertext block of the input)."""
    _check_iv(iv)
    if not data or len(data) % AES_BLOCK:
        raise ApiError("ENCRYPTED_DATA_LEN_RANGE", "ciphertext must be a non-zero multiple of 16")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    out = dec.update(data) + dec.finalize()
    if mech.padded:
        pad = out[-1]
        if not 1 <= pad <= AES_BLOCK or not hmac.compare_digest(out[-pad:], bytes((pad,)) * pad):
            raise ApiError("ENCRYPTED_DATA_INVALID", "bad padding")
        out = out[:-pad]
    return out, data[-AES_BLOCK:]


def mac_length(mech: Mechanism, requested: int | None) -> int:
    if not mech.general:
        if requested is not None:
            raise ApiError("MECHANISM_PARAM_INVALID", f"{mech.name} takes no mac_length")
        return mech.out_len
    if requested is None:
        raise ApiError("MECHANISM_PARAM_INVALID", f"{mech.name} needs mac_length")
    if not mech.out_len // 2 <= requested <= mech.out_len:
        raise ApiError(
            "MECHANISM_PARAM_INVALID",
            f"mac_length must be {mech.out_len // 2} to {mech.out_len} for {mech.name}",
        )
    return requested


def sign(mech: Mechanism, key: bytes, data: bytes, length: int) -> bytes:
    return hmac.digest(key, data, mech.digest)[:length]


def verify(mech: Mechanism, key: bytes, data: bytes, signature: bytes, length: int) -> None:
    if len(signature) != length:
        raise ApiError("SIGNATURE_LEN_RANGE", f"{mech.name} signatures are {length} bytes")
    if not hmac.compare_digest(hmac.digest(key, data, mech.digest)[:length], signature):
        raise ApiError("SIGNATURE_INVALID", "the MAC does not verify")
