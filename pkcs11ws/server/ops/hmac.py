"""HMAC-SHA-2 (RFC 2104) from the key's padded inner and outer hash states.

OpenSSL 3's one-shot HMAC (hmac.digest) looks its algorithms up on every call: about 24k
instructions for 64 bytes, a quarter of a whole request; hashlib's copy()/digest() of the pad
states still ~14k (an EVP context allocated, copied and freed per step). A loaded key here
keeps, per hash, a compiled state (server/_hot.pyx HmacState) that absorbed the key's inner and
outer pads once; a MAC is then two struct copies, two updates and two finals (~3k). The loaded
key is cached by the service (handlers_crypto.py: by handle, sealed blob and card key), so the
pads are made once per key and hash and are never shared by another key value.
"""

from __future__ import annotations

import hmac as _hmac
from collections.abc import Callable
from typing import Any

from pkcs11ws.mechanisms import Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server._hot import HmacState


class HmacKey(bytes):
    """The key's value (len() is its length, as the service's size checks want) and, by hash
    name, its compiled pad state, made on first use."""

    pads: dict[str, HmacState]


def _mac(key: HmacKey, name: str, data: bytes) -> bytes:
    state = key.pads.get(name)
    if state is None:
        state = key.pads[name] = HmacState(name, key)
    return state.mac(data)


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
        state = key.pads.get(mech.digest)
        if state is None:
            state = key.pads[mech.digest] = HmacState(mech.digest, key)
        return state.mac(body["data"])
    length = mac_length(mech, body.get("mac_length"))
    return _mac(key, mech.digest, body["data"])[:length]


def direct(mech: Mechanism, key: HmacKey, op: str) -> Callable[[bytes], bytes] | None:
    """op as a function of the request's data alone, for a request without optional fields
    (no mac_length): a sign with a full-length mechanism is its state's MAC (the state is
    callable; the batch path gives its runs to _hot.mac_run). A verify with such a mechanism
    gets the same state: the MAC its signature must equal in full (verify() below without
    mac_length; the batch path gives its runs to _hot.verify_run)."""
    if op not in ("sign", "verify") or mech.general:
        return None
    state = key.pads.get(mech.digest)
    if state is None:
        state = key.pads[mech.digest] = HmacState(mech.digest, key)
    return state if state.size == mech.out_len else None


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
