"""Idempotency keys of the requests that create or destroy (api.py's retry policy): a new key
per logical call, and the keys of calls that got no answer, kept for the application's retry of
the same call so that it gets the first answer back instead of a second object.
"""

from __future__ import annotations

import time

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)


def new_idempotency_key() -> str:
    """A random (version 4) UUID; os.urandom keeps the uuid module out of start-up."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class PendingKeys:
    """Idempotency keys of requests that got no answer, by (operation, path, body digest).

    Shared by the clients of one process (the module's survives C_Finalize/C_Initialize). A key
    is taken out while a request uses it (so two threads never share one) and dropped once a
    request with it succeeds. The service remembers a key for its idempotency_ttl (24 h by
    default); a key kept longer is harmless: the service then treats it as new. Bounded: the
    oldest keys go first.
    """

    MAX = 256
    MAX_AGE = 24 * 3600.0

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, bytes], tuple[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._keys)

    @staticmethod
    def slot(op: str, path: str, data: bytes | None) -> tuple[str, str, bytes]:
        import hashlib  # only after a failure: kept out of start-up

        return op, path, hashlib.sha256(data or b"").digest()

    def take(self, slot: tuple[str, str, bytes]) -> str | None:
        found = self._keys.pop(slot, None)  # atomic under the GIL
        if found is None or found[1] < time.monotonic() - self.MAX_AGE:
            return None
        return found[0]

    def keep(self, slot: tuple[str, str, bytes], key: str) -> None:
        while len(self._keys) >= self.MAX:
            try:
                del self._keys[next(iter(self._keys))]
            except (StopIteration, KeyError, RuntimeError):  # emptied by another thread
                break
        self._keys[slot] = (key, time.monotonic())

    def clear(self) -> None:
        self._keys.clear()
