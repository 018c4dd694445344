"""The ASGI application: routing by protocol.ENDPOINTS, bodies, errors, idempotency, access log.

A plain ASGI callable (no framework: design.md 6 measured Starlette at 1.7x the CPU per request).
Per request: one dict lookup or a few precompiled regexes to route, strict decoding with
protocol.decode, one handler call, one JSON answer. Every failure becomes
{"code", "message"} with the status from protocol.ERRORS; an unexpected exception is INTERNAL
(500) with its traceback logged, never a crash of the connection; a database that cannot be
reached (store.StoreUnavailable) is UNAVAILABLE (503), which clients retry.

`create_app()` is the uvicorn factory: it reads the config path from PKCS11WS_SERVER_CONFIG so
that each worker process builds its own app (and its own store connections) on the shared store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from pkcs11ws import protocol
from pkcs11ws.protocol import ERRORS, STRUCTS, Endpoint
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import conn
from pkcs11ws.server import settings as settings_mod
from pkcs11ws.server.accesslog import LOG_FORMAT, AccessLog
from pkcs11ws.server.handlers import Idem, Request, Response, Service, dumps
from pkcs11ws.server.masterkey import open_master_key
from pkcs11ws.server.sealing import MasterKeys
from pkcs11ws.server.settings import Settings
from pkcs11ws.server.store import Store, StoreUnavailable
from pkcs11ws.server.store import open_store as _open_store

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Request], Awaitable[Response]]

error_log = logging.getLogger("pkcs11ws.server")

_JSON_HEADERS: Final = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
]


# Endpoints whose handler checks the session together with the key (Service._key).
_KEYED_OPS: Final = frozenset({"encrypt", "decrypt", "sign", "verify"})


class _Disconnected(Exception):
    pass


class _Route:
    """One path template and the endpoint for each method on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.static = "{" not in path
        self.methods: dict[str, tuple[Endpoint, Handler]] = {}
        self.pattern = Endpoint("", "", path, "", "", "").pattern


def open_store(s: Settings, migrate: bool = True, keys: MasterKeys | None = None) -> Store:
    """The configured store (server.yaml `store:`), its schema brought up to date. keys: needed
    to migrate a store holding cards from before the master-key step (their card keys are
    wrapped under the master key then); without them that step refuses such a store."""
    if keys is None:
        return _open_store(s.store, migrate)
    k = keys
    return _open_store(s.store, migrate, card_rewrap=lambda card, inner: k.wrap_card(inner, card))


# Where _dispatch leaves the routed operation in the ASGI scope, for the metrics.
_OP: Final = "pkcs11ws.op"


class App:
    def __init__(self, s: Settings, store: Store | None = None) -> None:
        from pkcs11ws.server import metrics  # after `serve` chose prometheus-client's mode

        self.settings = s
        self.max_body = s.max_body
        keys = MasterKeys(open_master_key(s))
        self.store = store if store is not None else open_store(s, keys=keys)
        metrics.time_store(self.store, metrics.STORE_METHODS)
        self._request_done = metrics.request_done
        self._ready = metrics.WORKERS_READY
        self._flush = metrics.flush
        self._flush_every = metrics.FLUSH_SECONDS
        self._flusher: asyncio.Task[None] | None = None
        self.service = Service(s, self.store, keys)
        self._static: dict[str, _Route] = {}
        self._dynamic: list[_Route] = []
        routes: dict[str, _Route] = {}
        for ep in protocol.ENDPOINTS:
            handler = getattr(self.service, ep.op, None)
            if handler is None:
                raise RuntimeError(f"no handler for endpoint {ep.op}")
            route = routes.get(ep.path)
            if route is None:
                route = routes[ep.path] = _Route(ep.path)
                (self._static.__setitem__(ep.path, route) if route.static
                 else self._dynamic.append(route))  # fmt: skip
            route.methods[ep.method] = (ep, handler)
        self._openapi: bytes | None = None
        self._access = s.access_log
        self._access_log = AccessLog()

    # ------------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                loop = type(asyncio.get_running_loop()).__name__
                error_log.info("worker ready (event loop %s)", loop)
                self._ready.inc()  # the master key is loaded and the store open (__init__)
                self._flusher = asyncio.create_task(self._flush_metrics())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._flusher is not None:
                    self._flusher.cancel()
                self._flush()
                self._ready.dec()
                self.store.close()
                self.service.keys.master.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _flush_metrics(self) -> None:
        # Off the request path: requests only add to per-process numbers (metrics.py).
        while True:
            await asyncio.sleep(self._flush_every)
            self._flush()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        code: str | None = None
        try:
            resp = await self._dispatch(scope, method, path, receive)
        except ApiError as exc:
            code = exc.code
            resp = _error(code, exc.message)
        except _Disconnected:
            return
        except StoreUnavailable as exc:
            error_log.warning("%s %s: %s", method, path, exc)
            resp = _error("UNAVAILABLE", "the database is unavailable: retry")
        except Exception:
            error_log.exception("internal error on %s %s", method, path)
            code = "INTERNAL"
            resp = _error(code, "internal error (logged by the service)")
        headers = [*_JSON_HEADERS, (b"content-length", str(len(resp.body)).encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": resp.body})
        elapsed = time.perf_counter() - start
        self._request_done(scope.get(_OP, "unrouted"), resp.status, elapsed, code)
        if self._access:
            # The path is percent-decoded: escape it so it cannot forge or split a log line.
            shown = path if path.isprintable() and " " not in path else ascii(path)
            self._access_log.write(method, shown, resp.status, elapsed * 1e3)

    # ------------------------------------------------------------------ request handling

    def _route(self, method: str, path: str) -> tuple[Endpoint, Handler, dict[str, str]]:
        route = self._static.get(path)
        allowed = False
        if route is not None:
            hit = route.methods.get(method)
            if hit is not None:
                return hit[0], hit[1], {}
            allowed = True
        for route in self._dynamic:
            m = route.pattern.match(path)
            if m is None:
                continue
            hit = route.methods.get(method)
            if hit is not None:
                return hit[0], hit[1], m.groupdict()
            allowed = True
        if allowed:
            raise ApiError("METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}")
        raise ApiError("NOT_FOUND", f"no endpoint {path}")

    async def _dispatch(self, scope: Scope, method: str, path: str, receive: Receive) -> Response:
        if path == protocol.OPENAPI_PATH and method == "GET":
            scope[_OP] = "openapi"
            return self._openapi_doc()
        ep, handler, params = self._route(method, path)
        scope[_OP] = ep.op
        length: bytes | None = None
        authorization: bytes | None = None
        idem_key: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"authorization":
                authorization = value
            elif name == b"idempotency-key":
                idem_key = value
        raw = await self._body(receive, length)
        query = _query(ep, scope.get("query_string", b""))
        # The keyed crypto endpoints check the session in the same store query as the key.
        deferred = ep.op in _KEYED_OPS
        claims = self.service.authenticate(authorization, params.get("card")) if ep.auth else None
        if claims is not None and not deferred:
            await self.service.check_session(claims, time.time())
        idem: Idem | None = None
        if ep.idempotent:
            key = idem_key.decode("latin-1") if idem_key is not None else ""
            if not protocol.IDEMPOTENCY_RE.match(key):
                raise ApiError(
                    "IDEMPOTENCY_KEY_REQUIRED",
                    f"{protocol.IDEMPOTENCY_HEADER}: 8-128 of A-Z a-z 0-9 _ . : -",
                )
            fp = self.service.keys.fingerprint(
                method.encode(), path.encode(), scope.get("query_string", b""), raw
            )
            idem = Idem(key, fp)
            done = self.service.replay(
                idem, await self.service.read(lambda r: r.idempotency_get(key))
            )
            if done is not None:
                return done
        try:
            body = _decode(ep.request, raw)
        except ApiError:
            if deferred and claims is not None:
                # An ended session outranks a bad body, as when it is checked up front.
                await self.service.check_session(claims, time.time())
            raise
        return await handler(Request(ep, params, query, body, claims, idem))

    async def _body(self, receive: Receive, length: bytes | None) -> bytes:
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise ApiError("BAD_REQUEST", "invalid Content-Length") from None
            if declared > self.max_body:
                raise ApiError("BODY_TOO_LARGE", f"the body is over {self.max_body} bytes")
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk: bytes = msg.get("body", b"")
            if chunk:
                total += len(chunk)
                if total > self.max_body:
                    raise ApiError("BODY_TOO_LARGE", f"the body is over {self.max_body} bytes")
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _openapi_doc(self) -> Response:
        if self._openapi is None:
            try:
                from pkcs11ws import protocol_docs  # on first use: off the start-up path
            except ImportError:
                raise ApiError("NOT_FOUND", "the OpenAPI document is not available") from None
            self._openapi = dumps(protocol_docs.openapi())
        return Response(200, self._openapi)


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: a duplicate is refused, not resolved
    (a last-one-wins reading lets a proxy and the service see different requests)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return obj


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique)


def _error(code: str, message: str) -> Response:
    return Response(ERRORS[code].http, dumps({"code": code, "message": message}))


def _decode(struct: str, raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        if struct == "Empty":
            return {}
        raise ApiError("BAD_REQUEST", "the body must be a JSON object")
    try:
        # UTF-8 only (RFC 8259 8.1): json.loads(bytes) would also take UTF-16 and UTF-32.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("BAD_REQUEST", "the body is not UTF-8") from None
    try:
        obj = _DECODER.decode(text)
    except _DuplicateKey as exc:
        raise ApiError("BAD_REQUEST", f"duplicate key {exc.args[0]!r} in the body") from None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ApiError("BAD_REQUEST", "the body is not valid JSON") from None
    try:
        return protocol.decode(STRUCTS[struct], obj)
    except RecursionError:
        raise ApiError("BAD_REQUEST", "the body is nested too deeply") from None


def _query(ep: Endpoint, qs: bytes) -> dict[str, str]:
    if not qs:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(qs.decode("ascii"), keep_blank_values=True,
                                       strict_parsing=True)  # fmt: skip
    except (ValueError, UnicodeDecodeError):
        raise ApiError("BAD_REQUEST", "malformed query string") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in ep.query:
            raise ApiError("BAD_REQUEST", f"unknown query parameter {name!r}")
        if value not in ("true", "false"):
            raise ApiError("BAD_REQUEST", f"{name} must be true or false")
        out[name] = value
    return out


def configure_logging(s: Settings) -> None:
    handler: logging.Handler
    if s.log_file is not None:
        s.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(s.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.FileHandler(s.log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("pkcs11ws", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(s.log_level)
        logger.propagate = False


def die_with_supervisor(supervisor: int) -> None:
    """In a --workers N worker: be killed when the supervisor dies, however it dies.

    Without this a `kill -9` of the supervisor left the workers serving with PPID 1, holding the
    port, so a restart failed with "Address already in use". SIGKILL: the supervisor is gone
    abruptly, nothing is left to wait for the worker's drain (a normal SIGTERM of the supervisor
    stops its workers itself, before it exits). The PPID check closes the window in which the
    supervisor died before the prctl.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != supervisor:
        os._exit(1)


def create_app() -> App:
    """uvicorn factory (one call per worker process): config path from PKCS11WS_SERVER_CONFIG."""
    supervisor = os.environ.get(settings_mod.SUPERVISOR_ENV)
    if supervisor and int(supervisor) != os.getpid():
        die_with_supervisor(int(supervisor))
    path = os.environ.get(settings_mod.CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{settings_mod.CONFIG_ENV} is not set")
    s = settings_mod.load(Path(path))
    os.umask(0o077)  # whatever this process creates later (logs, database files) is owner-only
    configure_logging(s)
    conn.configure(s)
    return App(s)
