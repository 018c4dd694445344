"""HMAC-SHA-2 (RFC 2104) from the key's padded inner and outer hash states.

OpenSSL 3's one-shot HMAC (hmac.digest) looks its algorithms up on every call: about 24k
instructions for 64 bytes, a quarter of a whole request. A loaded key here keeps, per hash, the
two hash objects that have absorbed the key's inner and outer pads; a MAC is then two copies,
two updates and two digests (about 15k). The loaded key is cached by the service
(handlers_crypto.py: by handle, sealed blob and card key), so the pads are made once per key
and hash.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from typing import Any

from pkcs11ws.mechanisms import Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError

_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class HmacKey(bytes):
    """The key's value (len() is its length, as the service's size checks want) and, by hash
    name, its (inner, outer) pad states, made on first use."""

    pads: dict[str, tuple[Any, Any]]


def _pads(key: bytes, name: str) -> tuple[Any, Any]:
    inner, outer = hashlib.new(name), hashlib.new(name)
    if len(key) > inner.block_size:
        key = hashlib.new(name, key).digest()
    key = key.ljust(inner.block_size, b"\0")
    inner.update(key.translate(_IPAD))
    outer.update(key.translate(_OPAD))
    return inner, outer


def _mac(key: HmacKey, name: str, data: bytes) -> bytes:
    pads = key.pads.get(name)
    if pads is None:
        pads = key.pads[name] = _pads(key, name)
    inner = pads[0].copy()
    inner.update(data)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()  # type: ignore[no-any-return]


def offload(key: bytes) -> bool:
    return False  # microseconds of work: a thread hand-off would cost more


def load(value: bytes) -> HmacKey:
    key = HmacKey(value)
    key.pads = {}
    return key


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


def sign(mech: Mechanism, key: HmacKey, body: dict[str, Any]) -> bytes:
    if not mech.general and "mac_length" not in body:
        # _mac inlined: the service's most frequent operation.
        pads = key.pads.get(mech.digest)
        if pads is None:
            pads = key.pads[mech.digest] = _pads(key, mech.digest)
        inner = pads[0].copy()
        inner.update(body["data"])
        outer = pads[1].copy()
        outer.update(inner.digest())
        return outer.digest()  # type: ignore[no-any-return]
    length = mac_length(mech, body.get("mac_length"))
    return _mac(key, mech.digest, body["data"])[:length]


def verify(mech: Mechanism, key: HmacKey, body: dict[str, Any]) -> None:
    length = mac_length(mech, body.get("mac_length"))
    signature: bytes = body["signature"]
    if len(signature) != length:
        raise ApiError("SIGNATURE_LEN_RANGE", f"{mech.name} signatures are {length} bytes")
    if not _hmac.compare_digest(_mac(key, mech.digest, body["data"])[:length], signature):
        raise ApiError("SIGNATURE_INVALID", "the MAC does not verify")


def encrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not encrypt")


def decrypt(mech: Mechanism, key: bytes, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not decrypt")
