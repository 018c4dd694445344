"""The key service's Prometheus instruments: what the request path, the store and the TLS
listener count. The admin listener (admin.py) serves them.

`serve` always runs prometheus-client in multiprocess mode: before any worker starts it points
PROMETHEUS_MULTIPROC_DIR at a private folder, every worker process (one with --workers 1, N with
--workers N) writes its counters there through memory-mapped files, and the admin listener in the
`serve` process (uvicorn's supervisor when N > 1) adds them up when scraped. One design for both
cases; nothing crosses processes per request. prometheus-client picks its value class when it is
first imported, so this module must be imported only after `serve` has set the variable (app.py
and cli.py import it lazily or from code that runs in the workers).

Cost on the hot path: a request appends its time to a per-process array, a store call adds to
plain per-process numbers (a dict lookup, a bisect, a few additions); flush(), which the
worker's event loop runs every FLUSH_SECONDS and at shutdown, moves them into
prometheus-client's memory-mapped values, which cost several us per value written. Measured
numbers: docs/design.md section 8. A scrape therefore sees a worker's requests up to
FLUSH_SECONDS late.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_STORE_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

REQUESTS: Final = Counter(
    "pkcs11ws_requests",
    "Requests answered, by protocol operation and HTTP status.",
    ["operation", "status"],
)
LATENCY: Final = Histogram(
    "pkcs11ws_request_duration_seconds",
    "Time from the request's arrival in the app to its answer, by operation.",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
STORE: Final = Histogram(
    "pkcs11ws_store_duration_seconds",
    "Time of each store call (a read, or a whole write transaction), by store method.",
    ["method"],
    buckets=_STORE_BUCKETS,
)
LOCKOUT_REFUSALS: Final = Counter(
    "pkcs11ws_lockout_refusals",
    "Activations refused because the softcard is locked after wrong passphrases.",
)
CONNECTIONS: Final = Counter(
    "pkcs11ws_tls_connections",
    "TLS connections accepted.",
)
CONNECTIONS_OPEN: Final = Gauge(
    "pkcs11ws_tls_connections_open",
    "TLS connections open now.",
    multiprocess_mode="livesum",
)
WORKERS_READY: Final = Gauge(
    "pkcs11ws_workers_ready",
    "Worker processes that have loaded the master key and opened the store.",
    multiprocess_mode="livesum",
)

# The Store methods timed (all public ones but set-up and tear-down). object_search returns an
# iterator: it is timed to the end of the iteration, as the rows are fetched eagerly anyway.
STORE_METHODS: Final = (
    "write",
    "card_get",
    "card_list",
    "card_counts",
    "session_valid",
    "object_get",
    "session_object",
    "object_search",
    "idempotency_get",
    "grant_exists",
    "grant_list",
)

FLUSH_SECONDS: Final = 0.5


class _Series:
    """One histogram label set (and, for requests, one counter per status) not yet flushed."""

    __slots__ = ("bounds", "buckets", "count", "hist", "sum")

    def __init__(self, hist: Any) -> None:
        self.hist = hist  # the prometheus-client child: flush() adds to its values
        self.bounds = hist._upper_bounds
        self.buckets = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def add(self, seconds: float) -> None:
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def add_all(self, times: array[float]) -> None:
        buckets, bounds = self.buckets, self.bounds
        for seconds in times:
            buckets[bisect_left(bounds, seconds)] += 1
        self.sum += sum(times)
        self.count += len(times)

    def flush(self) -> None:
        if not self.count:
            return
        # Bulk add through the child's values: Histogram has no public "add n observations".
        values = self.hist._buckets
        for i, n in enumerate(self.buckets):
            if n:
                values[i].inc(n)
                self.buckets[i] = 0
        self.hist._sum.inc(self.sum)
        self.sum = 0.0
        self.count = 0


_latency: dict[str, _Series] = {}
_store: list[_Series] = []
# The seconds of each request answered since the last flush, by operation and status: a
# request appends one float (no tuple key, no bisect); flush() counts them.
_answered: dict[str, dict[int, array[float]]] = {}


def request_done(operation: str, status: int, seconds: float, code: str | None = None) -> None:
    """Count one answered request (code: the protocol error code when it failed)."""
    by_status = _answered.get(operation)
    if by_status is None:
        by_status = _answered[operation] = {}
    times = by_status.get(status)
    if times is None:
        times = by_status[status] = array("d")
    times.append(seconds)
    if code == "PASSPHRASE_LOCKED":
        LOCKOUT_REFUSALS.inc()


def flush() -> None:
    """Move what this process counted since the last flush into the shared values."""
    for operation, by_status in _answered.items():
        series = _latency.get(operation)
        if series is None:
            series = _latency[operation] = _Series(LATENCY.labels(operation))
        for status, times in by_status.items():
            if times:
                REQUESTS.labels(operation, str(status)).inc(len(times))
                series.add_all(times)
                del times[:]
    for series in (*_latency.values(), *_store):
        series.flush()


def connection_opened() -> None:
    CONNECTIONS.inc()
    CONNECTIONS_OPEN.inc()


def connection_closed() -> None:
    CONNECTIONS_OPEN.dec()


def time_store(store: Any, methods: tuple[str, ...]) -> None:
    """Time the store's work, per method (as instance attributes, store.py's contract): `write`
    is a context manager whose whole transaction is timed; every other name is a read, timed
    on the ReadTx that `store.read()` hands out (a thin proxy class made here once)."""
    children = {name: _Series(STORE.labels(name)) for name in methods}
    _store.extend(children.values())
    if "write" in children:
        store.write = _timed_cm(store.write, children.pop("write"))
    if not children:
        return
    proxy = _read_proxy(children)
    inner = store.read

    def read() -> _TimedRead:
        return _TimedRead(inner(), proxy)

    store.read = read


class _TimedRead:
    """store.read()'s context manager, handing out the timing proxy of the ReadTx."""

    __slots__ = ("cm", "proxy")

    def __init__(self, cm: Any, proxy: type) -> None:
        self.cm = cm
        self.proxy = proxy

    def __enter__(self) -> Any:
        return self.proxy(self.cm.__enter__())

    def __exit__(self, *exc: Any) -> Any:
        return self.cm.__exit__(*exc)


def _read_proxy(children: dict[str, Any]) -> type:
    perf = time.perf_counter

    def timed(name: str, child: Any) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = perf()
            try:
                return getattr(self.tx, name)(*args, **kwargs)
            finally:
                child.add(perf() - start)

        return call

    def init(self: Any, tx: Any) -> None:
        self.tx = tx

    def other(self: Any, name: str) -> Any:  # reads not listed: untimed
        return getattr(self.tx, name)

    ns: dict[str, Any] = {"__slots__": ("tx",), "__init__": init, "__getattr__": other}
    ns.update({name: timed(name, child) for name, child in children.items()})
    return type("TimedReadTx", (), ns)


def _timed_cm(fn: Callable[..., Any], child: Any) -> Callable[..., Any]:
    perf = time.perf_counter

    @contextmanager
    def call(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start = perf()
        try:
            with fn(*args, **kwargs) as tx:
                yield tx
        finally:
            child.add(perf() - start)

    return call
