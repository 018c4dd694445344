"""The admin listener: plain HTTP on 127.0.0.1:admin_port, in the `serve` process.

    /healthz   200 while the process is up (liveness).
    /readyz    200 when the store answers a query and every worker has loaded the master key
               and opened the store; 503 with the reason otherwise (readiness).
    /metrics   Prometheus text format: the workers' counters (metrics.py, multiprocess mode,
               added up here), plus gauges read from the store when scraped (live activations,
               locked softcards), so they cost the request path nothing.

Localhost only and without TLS or authentication on purpose: it exposes no secret and changes
nothing, and a scraper or probe on the same machine (or a sidecar) reads it. One thread serves
it (scrapes are rare), with its own store connection.
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pkcs11ws.server.settings import Settings
from pkcs11ws.server.store import Store, StoreActivity

HOST: Final = "127.0.0.1"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_LIVE_FILE: Final = re.compile(r"gauge_live\w*_(\d+)\.db$")
log = logging.getLogger("pkcs11ws.server")


class _StoreCollector(Collector):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def collect(self) -> Any:
        act = self.admin.activity()
        up = GaugeMetricFamily("pkcs11ws_store_up", "1 when the store answered this scrape.")
        up.add_metric([], 0 if act is None else 1)
        yield up
        if act is not None:
            yield GaugeMetricFamily(
                "pkcs11ws_activations_active",
                "Softcard activations not yet expired.",
                value=act.active_sessions,
            )
            yield GaugeMetricFamily(
                "pkcs11ws_softcards_locked",
                "Softcards refusing activation now (lockout).",
                value=act.locked_cards,
            )


class Admin:
    """The listener and what it reads: the multiprocess folder, the store, the worker count."""

    def __init__(self, s: Settings, store: Store, workers: int, port: int) -> None:
        self.store = store
        self.workers = workers
        self.dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.registry = CollectorRegistry(auto_describe=True)
        multiprocess.MultiProcessCollector(self.registry, path=str(self.dir))  # type: ignore[no-untyped-call]
        self.registry.register(_StoreCollector(self))
        self._last_error = ""
        handler = type("Handler", (_Handler,), {"admin": self})
        # Bound here, in the caller: a port in use fails `serve` at start, not later.
        self.server = http.server.HTTPServer((HOST, port), handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="admin", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("admin listener on http://%s:%d (/healthz /readyz /metrics)", HOST, self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.store.close()

    def activity(self) -> StoreActivity | None:
        try:
            with self.store.read() as r:
                act = r.activity(time.time())
        except Exception as exc:  # any backend's error: the answer is "not ready", with why
            self._last_error = f"store: {type(exc).__name__}: {exc}"
            return None
        self._last_error = ""
        return act

    def _sweep_dead(self) -> None:
        # A worker that died (and was replaced by uvicorn) leaves its live gauges behind.
        for f in self.dir.iterdir():
            m = _LIVE_FILE.match(f.name)
            if m is None:
                continue
            pid = int(m.group(1))
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, str(self.dir))  # type: ignore[no-untyped-call]
            except PermissionError:
                pass

    def metrics(self) -> bytes:
        self._sweep_dead()
        return generate_latest(self.registry)

    def ready(self) -> tuple[bool, str]:
        if self.activity() is None:
            return False, self._last_error
        self._sweep_dead()
        ready = 0.0
        collector = multiprocess.MultiProcessCollector(None, path=str(self.dir))  # type: ignore[no-untyped-call]
        for family in collector.collect():  # type: ignore[no-untyped-call]
            if family.name == "pkcs11ws_workers_ready":
                ready = sum(sample.value for sample in family.samples)
        if ready < self.workers:
            return False, f"{int(ready)} of {self.workers} workers ready"
        return True, f"{self.workers} workers ready, store reachable"


class _Handler(http.server.BaseHTTPRequestHandler):
    admin: Admin
    server_version = "pkcs11ws-admin"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, b"ok\n")
        elif path == "/readyz":
            ok, why = self.admin.ready()
            self._answer(200 if ok else 503, (why + "\n").encode())
        elif path == "/metrics":
            try:
                body = self.admin.metrics()
            except Exception:
                log.exception("admin: /metrics failed")
                self._answer(500, b"metrics failed (logged by the service)\n")
                return
            self._answer(200, body, CONTENT_TYPE)
        else:
            self._answer(404, b"not found: /healthz /readyz /metrics\n")

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the service log
