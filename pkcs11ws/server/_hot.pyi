"""Type stub of the compiled pkcs11ws.server._hot (see _hot.pyx)."""

DIGESTS: frozenset[str]

class HmacState:
    size: int
    def __init__(self, name: str, key: bytes) -> None: ...
    def mac(self, data: bytes) -> bytes: ...

def b64_canonical(raw: bytes) -> bytes | None: ...
