"""ECDSA with a private key on P-256, P-384 or P-521; signatures are r || s (PKCS#11's form).

CKM_ECDSA signs a digest computed by the caller (SHA-1 or SHA-2 lengths); the CKM_ECDSA_SHA*
forms hash the data here.
"""

from __future__ import annotations

from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from pkcs11ws.mechanisms import Mechanism
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server.ops.rsa import hash_of

# Curves whose signature costs more than handing it to a thread and back: measured on one CPU,
# ECDSA P-256 signs in about 40-65 us, P-384 in about 200 us, P-521 in about 300 us, and the
# asyncio.to_thread hand-off costs 60-100 us of CPU (bench/results/README.md): P-256 signs on the
# event loop (a stall shorter than the hand-off itself), the larger curves in the thread pool.
OFFLOAD_ABOVE_BITS: Final = 256
_BY_DIGEST_LEN: Final = {20: "sha1", 28: "sha224", 32: "sha256", 48: "sha384", 64: "sha512"}


def offload(key: ec.EllipticCurvePrivateKey) -> bool:
    return key.curve.key_size > OFFLOAD_ABOVE_BITS


def load(value: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(value, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


# The signature algorithm objects by (mechanism's hash, digest length): immutable, so built
# once instead of three objects per signature.
_ALGOS: dict[tuple[str, int], ec.ECDSA] = {}


def _algorithm(mech: Mechanism, data: bytes) -> ec.ECDSA:
    algo: hashes.HashAlgorithm | utils.Prehashed
    if mech.digest:
        algo = hash_of(mech.digest, "ECDSA")
    else:
        name = _BY_DIGEST_LEN.get(len(data))
        if name is None:
            raise ApiError("DATA_LEN_RANGE", "CKM_ECDSA signs a SHA-1 or SHA-2 digest")
        algo = utils.Prehashed(hash_of(name, "ECDSA"))
    return ec.ECDSA(algo)


def sign(mech: Mechanism, key: ec.EllipticCurvePrivateKey, body: dict[str, Any]) -> bytes:
    data: bytes = body["data"]
    ck = (mech.digest, 0 if mech.digest else len(data))
    algo = _ALGOS.get(ck)
    if algo is None:
        algo = _ALGOS[ck] = _algorithm(mech, data)
    return raw_signature(key.sign(data, algo), (key.curve.key_size + 7) // 8)


def raw_signature(der: bytes, n: int) -> bytes:
    """r || s, each n bytes, from OpenSSL's DER ECDSA-Sig-Value (SEQUENCE of two INTEGERs,
    minimal lengths, under 128 bytes each): read in place, a few times cheaper than
    decode_dss_signature and two int conversions. Anything else takes that general path."""
    i = 3 if der[1] == 0x81 else 2  # the sequence's length in one byte or in 0x81 + one
    if der[0] == 0x30 and der[i] == 0x02:
        j = i + 2 + der[i + 1]
        if der[j] == 0x02 and j + 2 + der[j + 1] == len(der):
            r = der[i + 2 : j].lstrip(b"\0")
            s = der[j + 2 :].lstrip(b"\0")
            if len(r) <= n and len(s) <= n:
                return r.rjust(n, b"\0") + s.rjust(n, b"\0")
    r_int, s_int = utils.decode_dss_signature(der)
    return r_int.to_bytes(n, "big") + s_int.to_bytes(n, "big")


def decrypt(mech: Mechanism, key: Any, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not decrypt")


def encrypt(mech: Mechanism, key: Any, body: dict[str, Any]) -> tuple[bytes, bytes]:
    raise ApiError("MECHANISM_INVALID", f"{mech.name} does not encrypt")


def verify(mech: Mechanism, key: Any, body: dict[str, Any]) -> None:
    raise ApiError("MECHANISM_INVALID", "ECDSA verification uses the public key (in the module)")
