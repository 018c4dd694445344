"""AES-GCM (NIST SP 800-38D): single requests, the module accumulates multi-part data.

Encryption returns the ciphertext followed by the tag (what PKCS#11's C_Encrypt gives);
decryption takes the same and refuses a wrong tag with ENCRYPTED_DATA_INVALID.
"""

from __future__ import annotations

from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pkcs11ws.mechanisms import Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError

TAG_BITS: Final = (32, 64, 96, 104, 112, 120, 128)  # SP 800-38D 5.2.1.2
MIN_IV, MAX_IV = 8, 128  # bytes; 12 is the recommended length


def offload(key: bytes) -> bool:
    return False  # microseconds of work: a thread hand-off would cost more


def load(value: bytes) -> bytes:
    return value


def _params(body: dict[str, Any]) -> tuple[bytes, bytes, int]:
    iv: bytes | None = body.get("iv")
    tag_bits: int | None = body.get("tag_bits")
    if iv is None or not MIN_IV <= len(iv) <= MAX_IV:
        raise ApiError("MECHANISM_PARAM_INVALID", f"the GCM IV must be {MIN_IV}-{MAX_IV} bytes")
    if tag_bits not in TAG_BITS:
        raise ApiError("MECHANISM_PARAM_INVALID", f"the GCM tag must be one of {TAG_BITS} bits")
    assert tag_bits is not None
    return iv, body.get("aad", b""), tag_bits // 8


# The one-shot AEAD (AESGCM) costs about 2 us for 4 KiB against 8 us through Cipher's
# encryptor (bench/results/README.md); it only checks full 128-bit tags, so a shorter tag is
# decrypted through Cipher, which takes a minimum tag length.


def encrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    iv, aad, tag_len = _params(body)
    out = AESGCM(key).encrypt(iv, body["data"], aad or None)
    # A t-bit tag is the leftmost t bits of the full one (SP 800-38D 5.2.1.2, 7.1 step 7).
    return (out if tag_len == 16 else out[: len(out) - 16 + tag_len]), b""


def decrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    iv, aad, tag_len = _params(body)
    data: bytes = body["data"]
    if len(data) < tag_len:
        raise ApiError("ENCRYPTED_DATA_LEN_RANGE", "shorter than the GCM tag")
    if tag_len == 16:
        try:
            return AESGCM(key).decrypt(iv, data, aad or None), b""
        except InvalidTag:
            raise ApiError("ENCRYPTED_DATA_INVALID", "the GCM tag does not verify") from None
    cut = len(data) - tag_len
    dec = Cipher(algorithms.AES(key), modes.GCM(iv, data[cut:], min_tag_length=4)).decryptor()
    if aad:
        dec.authenticate_additional_data(aad)
    try:
        out = dec.update(data[:cut]) + dec.finalize()
    except InvalidTag:
        raise ApiError("ENCRYPTED_DATA_INVALID", "the GCM tag does not verify") from None
    return out, b""


def sign(mech: Mechanism, key: bytes, body: dict[str, Any]) -> bytes:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not sign")


def verify(mech: Mechanism, key: bytes, body: dict[str, Any]) -> None:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not verify")
