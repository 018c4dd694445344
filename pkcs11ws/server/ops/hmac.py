"""HMAC-SHA-2 (the stdlib one-shot hmac.digest: the fastest in CPython)."""

from __future__ import annotations

import hmac as _hmac
from typing import Any, Final

from pkcs11ws.mechanisms import Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError


def offload(key: bytes) -> bool:
    return False  # microseconds of work: a thread hand-off would cost more


def load(value: bytes) -> bytes:
    return value


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


try:
    # hmac.digest's own one-shot, without its Python frame (the hot path of the service).
    from _hashlib import hmac_digest as _digest
except ImportError:  # a CPython built without OpenSSL
    _digest = _hmac.digest  # type: ignore[assignment]
_DIGEST: Final = _digest


def sign(mech: Mechanism, key: bytes, body: dict[str, Any]) -> bytes:
    if not mech.general and "mac_length" not in body:
        return _DIGEST(key, body["data"], mech.digest)
    length = mac_length(mech, body.get("mac_length"))
    return _DIGEST(key, body["data"], mech.digest)[:length]


def verify(mech: Mechanism, key: bytes, body: dict[str, Any]) -> None:
    length = mac_length(mech, body.get("mac_length"))
    signature: bytes = body["signature"]
    if len(signature) != length:
        raise ApiError("SIGNATURE_LEN_RANGE", f"{mech.name} signatures are {length} bytes")
    if not _hmac.compare_digest(_hmac.digest(key, body["data"], mech.digest)[:length], signature):
        raise ApiError("SIGNATURE_INVALID", "the MAC does not verify")


def encrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not encrypt")


def decrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not decrypt")
