"""Mechanism parameters as the core's parsers hand them over, turned into the protocol's fields.

The core (pkcs11ws/_native) checks each struct parameter (CK_RSA_PKCS_PSS_PARAMS,
CK_RSA_PKCS_OAEP_PARAMS, CK_GCM_PARAMS) without the GIL and serialises it as little-endian
64-bit numbers followed by any byte strings; this is the one decoder, one function per kind.
"""

from __future__ import annotations

from pkcs11ws import constants as C
from pkcs11ws import mechanisms
from pkcs11ws.errors import PKCS11Error
from pkcs11ws.mechanisms import Param

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _bad(msg: str) -> PKCS11Error:
    return PKCS11Error(C.CKR_MECHANISM_PARAM_INVALID, msg)


def _hash(code: int, table: dict[int, str], what: str) -> str:
    name = table.get(code)
    if name is None:
        raise _bad(f"{what} 0x{code:X} is not supported")
    return name


def decode(param: Param, blob: bytes) -> dict[str, Any]:
    """The protocol fields for a serialised parameter (empty for kinds without a struct)."""
    if param is Param.NONE:
        return {}
    # Only here: loading the _struct extension cost every process that loads the module ~0.3 ms
    # of start-up, and a mechanism parameter needs it (a dict lookup once imported).
    import struct

    if param is Param.RSA_PSS:
        h, mgf, salt = struct.unpack("<3Q", blob)
        return {
            "hash": _hash(h, mechanisms.HASHES, "hash"),
            "mgf": _hash(mgf, mechanisms.MGFS, "MGF"),
            "salt_length": salt,
        }
    if param is Param.RSA_OAEP:
        h, mgf = struct.unpack_from("<2Q", blob)
        return {
            "hash": _hash(h, mechanisms.HASHES, "hash"),
            "mgf": _hash(mgf, mechanisms.MGFS, "MGF"),
            "label": blob[16:] or None,
        }
    if param is Param.GCM:
        tag_bits, ivlen = struct.unpack_from("<2Q", blob)
        return {
            "iv": blob[16 : 16 + ivlen],
            "aad": blob[16 + ivlen :] or None,
            "tag_bits": tag_bits,
        }
    return {}
