"""AES-CBC and AES-CBC-PAD (the family that streams: the last ciphertext block goes back)."""

from __future__ import annotations

import hmac
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws.mechanisms import AES_BLOCK, Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError


def offload(key: bytes) -> bool:
    return False  # microseconds of work: a thread hand-off would cost more


def load(value: bytes) -> bytes:
    return value


def _iv(body: dict[str, Any]) -> bytes:
    iv: bytes | None = body.get("iv")
    if iv is None or len(iv) != AES_BLOCK:
        raise ApiError("MECHANISM_PARAM_INVALID", f"the IV must be {AES_BLOCK} bytes")
    return iv


def encrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """(ciphertext, last ciphertext block); with no output the chain value is still the IV."""
    iv, data = _iv(body), body["data"]
    if mech.padded:
        pad = AES_BLOCK - len(data) % AES_BLOCK
        data = data + bytes((pad,)) * pad
    elif len(data) % AES_BLOCK:
        raise ApiError("DATA_LEN_RANGE", "CKM_AES_CBC needs a multiple of 16 bytes")
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    out = enc.update(data) + enc.finalize()
    return out, (out[-AES_BLOCK:] if out else iv)


def decrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """(plaintext, last ciphertext block of the input)."""
    iv, data = _iv(body), body["data"]
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


def sign(mech: Mechanism, key: bytes, body: dict[str, Any]) -> bytes:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not sign")


def verify(mech: Mechanism, key: bytes, body: dict[str, Any]) -> None:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not verify")
