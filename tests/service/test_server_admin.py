"""The admin listener over real HTTP: /healthz, /readyz, /metrics parsed with prometheus-client's
parser, counters that move with real mutual-TLS traffic, one and several worker processes."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pkcs11ws.protocol import ERRORS
from pkcs11ws.server import settings
from tests.support.service import Api, b64

CARDS = "/km/v1/softcards"


def _admin(svc: Any, path: str) -> tuple[int, str, str]:
    port = settings.load(svc.server_yaml).admin_port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _scrape(svc: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, text = _admin(svc, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _scrape_when(svc: Any, ready: Any) -> dict:
    """Scrape until ready(samples): workers publish their request counts every
    metrics.FLUSH_SECONDS, so a scrape right after a request may not show it yet."""
    deadline = time.monotonic() + 60
    while True:
        samples = _scrape(svc)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def _saw_startup_probe(samples: dict) -> bool:
    # The fixture's readiness probe (one GET /health) has been published.
    return _get(samples, "pkcs11ws_requests_total", operation="health", status="200") >= 1


def test_metrics_move_with_traffic(fresh_service) -> None:
    svc = fresh_service(overrides={"lockout": {"threshold": 1, "max_seconds": 60}})
    assert _admin(svc, "/healthz")[0] == 200
    status, _, why = _admin(svc, "/readyz")
    assert status == 200, why
    assert _admin(svc, "/nope")[0] == 404
    before = _scrape_when(svc, _saw_startup_probe)
    assert _get(before, "pkcs11ws_workers_ready") == 1
    assert _get(before, "pkcs11ws_store_up") == 1

    api = Api(svc)
    try:
        card, _token = api.new_card(b"right passphrase")
        assert api.get("/health").status == 200
        assert api.get("/km/v1/nothing-here").status == 404
        # Lockout threshold 1: one wrong passphrase locks, the next attempt is refused as locked.
        bad = {"passphrase": b64(b"wrong passphrase")}
        assert api.post(f"{CARDS}/{card}/activate", bad).code == "PASSPHRASE_INCORRECT"
        assert api.post(f"{CARDS}/{card}/activate", bad).code == "PASSPHRASE_LOCKED"
        mid = _scrape(svc)
        assert _get(mid, "pkcs11ws_tls_connections_open") >= 1  # this keep-alive connection
    finally:
        api.close()

    def moved(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    last = {"operation": "activate", "status": str(ERRORS["PASSPHRASE_LOCKED"].http)}
    after = _scrape_when(svc, lambda a: _get(a, "pkcs11ws_requests_total", **last) > 0)

    assert moved("pkcs11ws_requests_total", operation="create_softcard", status="200") == 1
    assert moved("pkcs11ws_requests_total", operation="activate", status="200") == 1
    for code in ("PASSPHRASE_INCORRECT", "PASSPHRASE_LOCKED"):
        http = str(ERRORS[code].http)
        assert moved("pkcs11ws_requests_total", operation="activate", status=http) == 1, code
    assert moved("pkcs11ws_requests_total", operation="health", status="200") == 1
    assert moved("pkcs11ws_requests_total", operation="unrouted", status="404") == 1
    assert moved("pkcs11ws_request_duration_seconds_count", operation="activate") == 3
    assert moved("pkcs11ws_request_duration_seconds_bucket", operation="activate", le="+Inf") == 3
    assert moved("pkcs11ws_request_duration_seconds_sum", operation="activate") > 0
    assert moved("pkcs11ws_store_duration_seconds_count", method="write") >= 2
    assert moved("pkcs11ws_store_duration_seconds_count", method="card_get") >= 1
    assert moved("pkcs11ws_lockout_refusals_total") == 1
    assert moved("pkcs11ws_tls_connections_total") >= 1
    # The client closed its connection: the open-connections gauge comes back down.
    closed = _scrape_when(svc, lambda a: _get(a, "pkcs11ws_tls_connections_open") == 0)
    assert _get(closed, "pkcs11ws_tls_connections_open") == 0
    assert _get(after, "pkcs11ws_activations_active") == 1
    assert _get(after, "pkcs11ws_softcards_locked") == 1


def test_metrics_add_up_across_workers(fresh_service) -> None:
    svc = fresh_service(workers=2)
    # The service answers as soon as one worker is up; ready means both are.
    deadline = time.monotonic() + 60
    while True:
        status, _, why = _admin(svc, "/readyz")
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 503 and "of 2 workers ready" in why, why
        time.sleep(0.2)
    assert status == 200 and "2 workers" in why, why
    before = _scrape_when(svc, _saw_startup_probe)
    assert _get(before, "pkcs11ws_workers_ready") == 2
    n = 12
    for _ in range(n):  # a new connection each time: the kernel spreads them over the workers
        api = Api(svc)
        try:
            assert api.get("/health").status == 200
        finally:
            api.close()
    key = ("pkcs11ws_requests_total", {"operation": "health", "status": "200"})

    def moved(a: dict) -> float:
        return _get(a, key[0], **key[1]) - _get(before, key[0], **key[1])

    after = _scrape_when(svc, lambda a: moved(a) >= n)
    assert moved(after) == n
    assert (
        _get(after, "pkcs11ws_tls_connections_total")
        - _get(before, "pkcs11ws_tls_connections_total")
        == n
    )
