"""The service's cryptographic operations: a registry of family modules keyed by family.

Each family module (aes_cbc, aes_gcm, hmac, rsa, ec) offers the same five functions, all taking
the decoded request body so that each family reads its own parameters:

- load(value) -> key        the sealed value opened into what the family computes with (cached)
- encrypt/decrypt(mech, key, body) -> (output, last block or b"")
- sign(mech, key, body) -> signature;  verify(mech, key, body) -> None or ProtocolError
- offload(key) -> bool: whether this key's work is heavy enough to run off the event loop
  (private-key arithmetic that costs more than the thread hand-off: RSA, ECDSA above P-256)
- optional direct(mech, key, op) -> a function of the request's data alone, or None: op for a
  request without optional fields, for a batch's run of such requests (hmac: sign)

A new family is one module here plus its rows in pkcs11ws/mechanisms.py.
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

from pkcs11ws.mechanisms import Family
from pkcs11ws.server.ops import aes_cbc, aes_gcm, ec, hmac, rsa

MAX_RANDOM: Final = 65536

FAMILIES: Final[dict[Family, ModuleType]] = {
    Family.AES_CBC: aes_cbc,
    Family.AES_GCM: aes_gcm,
    Family.HMAC: hmac,
    Family.RSA: rsa,
    Family.EC: ec,
}
