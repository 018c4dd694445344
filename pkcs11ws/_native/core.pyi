"""Type stubs for the Cython core (pkcs11ws/_native/core.pyx): the hooks the provider calls."""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pkcs11ws.client.transport import Transport
from pkcs11ws.log import Logger
from pkcs11ws.provider import Directory

def slot_update(
    slot_id: int, present: bool, label: bytes, description: bytes, serial: bytes
) -> None: ...
def slot_set_login(slot_id: int, logged_in: bool) -> None: ...
def slot_set_pin_flags(slot_id: int, flags: int) -> None: ...
def object_put(
    handle: int,
    slot_id: int,
    cls: int,
    key_type: int,
    encrypt: bool,
    decrypt: bool,
    sign: bool,
    verify: bool,
    size: int = 0,
    private: bool = True,
) -> int: ...
def object_drop(handle: int) -> None: ...
def current_provider() -> object: ...
def cryptoki_version() -> tuple[int, int]: ...
def loaded_objects() -> list[bytes]: ...

class Queued:
    op: str
    token: str | None
    data: bytes
    started: float
    status: int
    answer: Any
    error: BaseException | None
    lead: list[Queued] | None
    alone: bool
    def __init__(self, op: str, token: str | None, data: bytes) -> None: ...
    def wait(self) -> None: ...
    def wake(self) -> None: ...

class Lane:
    @property
    def free(self) -> bool: ...
    @property
    def sent(self) -> int: ...
    @property
    def queue(self) -> list[Queued]: ...

GROUP_MAX_BYTES: int

class Group:
    limit: int
    size: int
    max_bytes: int
    _busy: int
    _carried: int
    _lone: int
    _parked: bool
    _hook: Callable[[], None] | None
    def __init__(self, limit: int, size: int, max_bytes: int = ...) -> None: ...
    @property
    def lane(self) -> Lane: ...
    @property
    def _queue(self) -> list[Queued]: ...
    @property
    def _lock(self) -> Mutex: ...
    @property
    def sizes(self) -> dict[int, int]: ...
    def reset(self) -> None: ...
    def _lane_busy(self) -> int: ...
    def _release(self, carried: int) -> None: ...
    def run(self, op: str, token: str | None, data: bytes, sender: Any) -> tuple[int, Any]: ...

def flush_wakes() -> None: ...

class TransportFields:
    servers: list[Any]
    _pid: int
    aborted: bool
    _closed: bool
    _timeout_ms: int
    _step_ms: int

class ServerFields:
    idle: list[Any]
    url: str

def set_process(pid: int) -> None: ...
def process() -> int: ...

class ProviderFields:
    fast: dict[int, tuple[Any, ...]]
    dir: Directory
    tokens: dict[int, str]
    renew_at: dict[int, float]

class RequestIdFields:
    field: bytes
    count: Iterator[int]

class ClientFields:
    transport: Transport
    log: Logger

class SocketFields:
    count: int
    fds: set[int]
    lock: Any

class Handle:
    curl: Any
    setopt: Any
    perform: Any
    getinfo: Any
    chunks: list[bytes]
    socks: Any
    server: Any
    headers: Sequence[str] | None
    method: str
    path: str
    timeout_ms: int
    pid: int
    busy: bool
    used: bool
    requests: int
    connects: int
    failures: int

class Mutex:
    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...
