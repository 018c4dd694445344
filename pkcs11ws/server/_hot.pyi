"""Type stub of the compiled pkcs11ws.server._hot (see _hot.pyx)."""

from collections.abc import Callable
from typing import Any

DIGESTS: frozenset[str]

class HmacState:
    size: int
    def __init__(self, name: str, key: bytes) -> None: ...
    def mac(self, data: bytes) -> bytes: ...
    def __call__(self, data: bytes) -> bytes: ...

def b64_canonical(raw: bytes) -> bytes | None: ...
def mac_run(
    state: HmacState,
    values: list[Any],
    i: int,
    until: float,
    prefix: bytes,
    suffix: bytes,
    parts: list[bytes],
) -> int: ...
def verify_run(
    state: HmacState,
    values: list[Any],
    i: int,
    until: float,
    part: bytes,
    parts: list[bytes],
) -> int: ...
def scan_run(
    raw: bytes,
    pos: int,
    head: bytes,
    end: int,
    last: tuple[tuple[str, Callable[[bytes], Any], int], ...],
    mids: tuple[bytes, ...],
    values: list[Any],
) -> int: ...
def scan_single(
    raw: bytes,
    head: bytes,
    rest: bytes,
    last: tuple[tuple[str, Callable[[bytes], Any], int], ...],
    mids: tuple[bytes, ...],
    allowed: bytes,
    rid_max: int,
) -> tuple[str, Any] | None: ...
def mac_answer(state: HmacState, data: bytes, prefix: bytes, suffix: bytes) -> bytes: ...
def mac_equals(state: HmacState, data: bytes, mac: bytes) -> bool: ...
def scan_batch(
    raw: bytes,
    bare: bytes,
    rid_head: bytes,
    rid_tail: bytes,
    allowed: bytes,
    rid_max: int,
    head: bytes,
    last: tuple[tuple[str, Callable[[bytes], Any], int], ...],
    mids: tuple[bytes, ...],
    values: list[Any],
) -> tuple[str | None] | None: ...
