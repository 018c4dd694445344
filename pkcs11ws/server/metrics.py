"""The key service's Prometheus instruments: what the request path, the store and the TLS
listener count. The admin listener (admin.py) serves them.

`serve` always runs prometheus-client in multiprocess mode: before any worker starts it points
PROMETHEUS_MULTIPROC_DIR at a private folder, every worker process (one with --workers 1, N with
--workers N) writes its counters there through memory-mapped files, and the admin listener in the
`serve` process (uvicorn's supervisor when N > 1) adds them up when scraped. One design for both
cases; nothing crosses processes per request. prometheus-client picks its value class when it is
first imported, so this module must be imported only after `serve` has set the variable (app.py
and cli.py import it lazily or from code that runs in the workers).

Cost on the hot path: one dict lookup for the (operation, status) pair's cached children, then a
counter increment and a histogram observation (each a lock and a write into the mapped file), and
one observation per store call. The measured numbers are in docs/design.md (Operations).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                           1.0, 2.5, 5.0, 10.0)  # fmt: skip
_STORE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                         0.25, 1.0)  # fmt: skip

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
    "write", "card_get", "card_list", "card_counts", "session_valid", "object_get",
    "session_object", "object_search", "idempotency_get",
)  # fmt: skip

_children: dict[tuple[str, int], tuple[Any, Any]] = {}
_lockout_child = LOCKOUT_REFUSALS


def request_done(operation: str, status: int, seconds: float, code: str | None = None) -> None:
    """Count one answered request (code: the protocol error code when it failed)."""
    pair = _children.get((operation, status))
    if pair is None:
        pair = _children[(operation, status)] = (
            REQUESTS.labels(operation, str(status)),
            LATENCY.labels(operation),
        )
    pair[0].inc()
    pair[1].observe(seconds)
    if code == "PASSPHRASE_LOCKED":
        _lockout_child.inc()


def connection_opened() -> None:
    CONNECTIONS.inc()
    CONNECTIONS_OPEN.inc()


def connection_closed() -> None:
    CONNECTIONS_OPEN.dec()


def time_store(store: Any, methods: tuple[str, ...]) -> None:
    """Wrap the store's methods (as instance attributes) to time each call. `write` is a
    context manager: its whole transaction is timed."""
    for name in methods:
        original = getattr(store, name)
        child = STORE.labels(name)
        if name == "write":
            setattr(store, name, _timed_cm(original, child))
        elif name == "object_search":
            setattr(store, name, _timed_iter(original, child))
        else:
            setattr(store, name, _timed(original, child))


def _timed(fn: Callable[..., Any], child: Any) -> Callable[..., Any]:
    perf = time.perf_counter

    def call(*args: Any, **kwargs: Any) -> Any:
        start = perf()
        try:
            return fn(*args, **kwargs)
        finally:
            child.observe(perf() - start)

    return call


def _timed_cm(fn: Callable[..., Any], child: Any) -> Callable[..., Any]:
    perf = time.perf_counter

    @contextmanager
    def call(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start = perf()
        try:
            with fn(*args, **kwargs) as tx:
                yield tx
        finally:
            child.observe(perf() - start)

    return call


def _timed_iter(fn: Callable[..., Any], child: Any) -> Callable[..., Any]:
    perf = time.perf_counter

    def call(*args: Any, **kwargs: Any) -> Any:
        start = perf()
        try:
            return iter(list(fn(*args, **kwargs)))
        finally:
            child.observe(perf() - start)

    return call
