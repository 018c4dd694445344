"""The ASGI application: routing by protocol.ENDPOINTS, bodies, errors, idempotency, access log.

A plain ASGI callable, no framework (design.md section 6 has the measurement behind that).
Per request: one dict lookup or a few precompiled regexes to route, strict decoding with
protocol.decode, one handler call, one JSON answer. Every failure becomes
{"code", "message"} with the status from protocol.ERRORS; an unexpected exception is INTERNAL
(500) with its traceback logged, never a crash of the connection; a database that cannot be
reached (store.StoreUnavailable) is UNAVAILABLE (503), which clients retry.

worker.create_app() is the uvicorn factory: each worker process builds its own App (and its own
store connections) on the shared store.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Final

from pkcs11ws import protocol
from pkcs11ws.protocol import ERRORS, STRUCTS, Endpoint
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import audit, fastjson, pipeline, reload
from pkcs11ws.server.accesslog import AccessLog
from pkcs11ws.server.batch_items import BatchPath
from pkcs11ws.server.direct import Direct
from pkcs11ws.server.handlers import Service, expired
from pkcs11ws.server.handlers_crypto import IN_BATCH, Offloaded
from pkcs11ws.server.identity import Clients, Identity
from pkcs11ws.server.masterkey import open_master_key
from pkcs11ws.server.peer import PEER_KEY
from pkcs11ws.server.pipeline import Idem, Request, Response, dumps
from pkcs11ws.server.sealing import MasterKeys, TokenClaims
from pkcs11ws.server.settings import Settings
from pkcs11ws.server.store import Store, StoreUnavailable
from pkcs11ws.server.store import open_store as _open_store

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Request], Awaitable[Response]]

error_log = logging.getLogger("pkcs11ws.server")

_perf: Final = time.perf_counter

_JSON_HEADERS: Final = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
]

# An answer's headers by its body's length, made once (uvicorn copies them into its own list
# before it writes them: the same list may serve every answer of that length).
_HEADS: dict[int, list[tuple[bytes, bytes]]] = {}


def _heads(n: int) -> list[tuple[bytes, bytes]]:
    headers = [*_JSON_HEADERS, (b"content-length", str(n).encode())]
    if n < 4096:  # bounded: answers longer than that are rare and cost more anyway
        _HEADS[n] = headers
    return headers


# Endpoints whose handler checks the session together with the key (Service._key). App._keyed
# runs them (their token may come in the body), which relies on them needing a token, no
# Idempotency-Key, no query, no softcard in the path, and changing nothing (no audit line for
# a success).
_KEYED_OPS: Final = frozenset({"encrypt", "decrypt", "sign", "verify"})
if any(
    not (ep := protocol.ENDPOINT_BY_OP[op]).auth
    or ep.idempotent
    or ep.access != "token"
    or "{" in ep.path
    or ep.query
    or ep.changes
    for op in _KEYED_OPS
):
    raise RuntimeError("a keyed crypto endpoint needs more than App._keyed checks")


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


class App(BatchPath):
    def __init__(self, s: Settings, store: Store | None = None) -> None:
        from pkcs11ws.server import metrics  # after `serve` chose prometheus-client's mode

        self.settings = s
        self.max_body = s.max_body
        self.batch_max_items = s.batch_max_items
        self.batch_max_bytes = s.batch_max_bytes
        keys = MasterKeys(open_master_key(s))
        self.store = store if store is not None else open_store(s, keys=keys)
        metrics.time_store(self.store, metrics.STORE_METHODS)
        self._request_done = metrics.request_done
        self._ready = metrics.WORKERS_READY
        self._flush = metrics.flush
        self._flush_every = metrics.FLUSH_SECONDS
        self._flusher: asyncio.Task[None] | None = None
        self.clients = Clients(s.clients, s.unlisted_clients, s.crl, s.tls_ca)
        self.service = Service(s, self.store, keys, self.clients)
        self._static: dict[str, _Route] = {}
        self._dynamic: list[_Route] = []
        routes: dict[str, _Route] = {}
        # The batch endpoint is served here: it runs its items through this app's pipeline.
        self._handlers: dict[str, Handler] = {}
        for ep in protocol.ENDPOINTS:
            handler = self._batch if ep.op == "batch" else getattr(self.service, ep.op, None)
            if handler is None:
                raise RuntimeError(f"no handler for endpoint {ep.op}")
            self._handlers[ep.op] = handler
            route = routes.get(ep.path)
            if route is None:
                route = routes[ep.path] = _Route(ep.path)
                (
                    self._static.__setitem__(ep.path, route)
                    if route.static
                    else self._dynamic.append(route)
                )
            route.methods[ep.method] = (ep, handler)
        self._opened: dict[str, TokenClaims] = {}  # _keyed: claims by a body's token
        # The keyed requests' direct paths (server/direct.py; None: the full path's).
        direct = Direct(self.service, self._token_claims, _KEYED_OPS, self.batch_max_items)
        self._single, self._direct_batch = direct.single, direct.batch
        # The keyed endpoints by path, for the single request's direct path (_dispatch).
        self._keyed_paths = {
            ep.path: ep for ep in protocol.ENDPOINTS if ep.op in _KEYED_OPS and ep.method == "POST"
        }
        if len(self._keyed_paths) != len(_KEYED_OPS) or any(
            len(self._static[p].methods) != 1 for p in self._keyed_paths
        ):
            raise RuntimeError("a keyed endpoint shares its path: the direct path would hide it")
        # The batch endpoint, for its direct path in _http: what _operation would check of it.
        self._batch_ep = protocol.ENDPOINT_BY_OP["batch"]
        self._batch_handler = self._handlers["batch"]
        b = self._batch_ep
        if (
            b.path != protocol.BATCH_PATH
            or b.method != "POST"
            or len(self._static[b.path].methods) != 1
            or b.auth
            or b.idempotent
            or b.access in pipeline.CARD_ACCESS
        ):
            raise RuntimeError("the batch endpoint needs more than _http's direct path checks")
        self._openapi: bytes | None = None
        self._access = s.access_log
        self._access_log = AccessLog()
        atexit.register(self._access_log.flush)  # a stop without lifespan shutdown too

    # ------------------------------------------------------------------ ASGI entry

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not itself a coroutine: a request's coroutine is _http's (one frame fewer per request;
        # uvicorn is told the interface, cli.py: it would take this for ASGI 2).
        kind = scope["type"]
        if kind == "http":
            return self._http(scope, receive, send)
        if kind == "lifespan":
            return self._lifespan(receive, send)
        return _ignored()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                running = asyncio.get_running_loop()
                reload.register(self._access_log.flush)
                reload.register(self.clients.reload)
                reload.register(audit.reopen)
                reload.install(running)
                error_log.info("worker ready (event loop %s)", type(running).__name__)
                self._ready.inc()  # the master key is loaded and the store open (__init__)
                self._flusher = asyncio.create_task(self._flush_metrics())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                reload.unregister(self._access_log.flush)
                reload.unregister(self.clients.reload)
                reload.unregister(audit.reopen)
                self._access_log.flush()  # (requests are over: uvicorn drained them)
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
        start = _perf()
        method: str = scope["method"]
        path: str = scope["path"]
        # What the audit line needs, filled in as it is learnt: endpoint, identity, path
        # parameters, decoded body.
        seen: list[Any] = [None, None, _NO_PARAMS, None]
        code: str | None = None
        try:
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
                elif name == b"x-request-id":
                    rid = value.decode("latin-1")
                    if protocol.REQUEST_ID_RE.match(rid):
                        audit.REQUEST_ID.set(rid)
            # The identity cached on the connection (pipeline.identify, inlined: every request).
            state = scope.get("state")
            peer = state.get(PEER_KEY) if state is not None else None
            if peer is not None and peer.generation == self.clients.generation:
                ident = peer.identity
            else:
                ident, peer = pipeline.identify(self.clients, scope)
            if ident is None:
                raise pipeline.refuse_unknown(peer)
            seen[1] = ident
            keyed = self._keyed_paths.get(path) if method == "POST" else None
            if keyed is None and (path != protocol.BATCH_PATH or method != "POST"):
                resp = await self._dispatch(
                    scope, method, path, receive, seen, length, authorization, idem_key, ident
                )
            else:
                # A single keyed request or a batch (the hot paths): what _route, _operation
                # and _keyed do for these paths (static, POST only, no parameters), without
                # their lookups and coroutines, and _body's first step inline; the same checks
                # in the same order: the body (its limit), the query, then the operation's.
                if keyed is None:
                    ep, limit, too_large = self._batch_ep, self.batch_max_bytes, "BATCH_TOO_LARGE"
                else:
                    ep, limit, too_large = keyed, self.max_body, "BODY_TOO_LARGE"
                scope[_OP] = ep.op
                seen[0] = ep
                if length is not None:
                    _declared(length, limit, too_large)
                msg = await receive()
                if msg["type"] == "http.request" and not msg.get("more_body", False):
                    raw: bytes = msg.get("body", b"")
                    if len(raw) > limit:
                        raise ApiError(too_large, f"the body is over {limit} bytes")
                else:
                    raw = await self._body(receive, None, limit, too_large, msg)
                qs = scope.get("query_string", b"")
                service = self.service
                if keyed is None:
                    # _operation's steps for the batch endpoint (no token, no Idempotency-Key,
                    # any identity: checked in __init__), then its handler.
                    query = _query(ep, qs)
                    if (answer := self._direct_batch(ident, raw)) is not None:
                        resp = Response(200, answer)
                    else:
                        body = _decode(ep.request, raw)
                        seen[3] = body
                        resp = await self._batch_handler(
                            Request(ep, _NO_PARAMS, query, body, None, None, ident, None)
                        )
                else:
                    if qs:
                        _query(keyed, qs)  # a keyed endpoint takes no query: refused as there
                    if authorization is not None or service._reads_block:
                        resp = await self._keyed(
                            keyed, raw, _UNPARSED, authorization, ident, seen, False
                        )
                    elif (answer := self._single(ident, keyed, None, raw)) is not None:
                        resp = Response(200, answer)
                    else:
                        claims, body = self._body_claims(keyed, raw, _UNPARSED, False, ident, seen)
                        try:
                            resp = Response(200, service.crypto_now(claims, body, keyed.op))
                        except Offloaded as work:  # (a single request: never IN_BATCH)
                            resp = work.answer(await asyncio.to_thread(work.run))
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
        if resp.status >= 300 or (seen[0] is not None and seen[0].changes):
            _audit(seen, resp, code)
        headers = _HEADS.get(len(resp.body))
        if headers is None:
            headers = _heads(len(resp.body))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": resp.body})
        elapsed = _perf() - start
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

    async def _dispatch(
        self,
        scope: Scope,
        method: str,
        path: str,
        receive: Receive,
        seen: list[Any],
        length: bytes | None,
        authorization: bytes | None,
        idem_key: bytes | None,
        ident: Identity,
    ) -> Response:
        """Any request but a single keyed one (_http runs those), its headers read."""
        if path == protocol.OPENAPI_PATH and method == "GET":
            scope[_OP] = "openapi"
            return self._openapi_doc()
        ep, handler, params = self._route(method, path)
        scope[_OP] = ep.op
        seen[0] = ep
        seen[2] = params
        if ep.op == "batch":
            raw = await self._body(receive, length, self.batch_max_bytes, "BATCH_TOO_LARGE")
        else:
            raw = await self._body(receive, length, self.max_body, "BODY_TOO_LARGE")
        qs = scope.get("query_string", b"")
        if ep.op in _KEYED_OPS:
            # _operation's first two steps, without its coroutine (the hot path).
            if qs:
                _query(ep, qs)  # a keyed endpoint takes no query: refused as there
            return await self._keyed(ep, raw, _UNPARSED, authorization, ident, seen, False)
        return await self._operation(
            ep, handler, params, qs, path, raw, _UNPARSED, authorization, idem_key, ident, seen
        )

    async def _operation(
        self,
        ep: Endpoint,
        handler: Handler,
        params: dict[str, str],
        qs: bytes,
        path: str,
        raw: bytes,
        obj: object,
        authorization: bytes | None,
        idem_key: bytes | None,
        ident: Identity,
        seen: list[Any],
        decoded: bool = False,
    ) -> Response:
        """One operation after routing: authentication, idempotency, authorization, strict
        decoding, handler. A single request and every item of a batch go through here, so an
        item is checked exactly as its single request would be. raw is the request body, or
        obj its already parsed JSON (a batch item; raw is then unused), or with decoded its
        already decoded request (a batch item the fast path took: fastjson.py)."""
        query = _query(ep, qs)
        if ep.op in _KEYED_OPS:
            return await self._keyed(ep, raw, obj, authorization, ident, seen, decoded)
        claims = (
            self.service.authenticate(authorization, params.get("card"), ident) if ep.auth else None
        )
        if claims is not None:
            await self.service.check_session(claims, time.time())
        idem: Idem | None = None
        if ep.idempotent:
            key = idem_key.decode("latin-1") if idem_key is not None else ""
            if not protocol.IDEMPOTENCY_RE.match(key):
                raise ApiError(
                    "IDEMPOTENCY_KEY_REQUIRED",
                    f"{protocol.IDEMPOTENCY_HEADER}: 8-128 of A-Z a-z 0-9 _ . : -",
                )
            fp = self.service.keys.fingerprint(ep.method.encode(), path.encode(), qs, raw)
            # Keys are per identity: one identity can neither replay nor probe another's, so
            # the replay may come before authorization (a repeated delete answers as the
            # first did, though the card is gone now).
            idem = Idem(ident.name + "/" + key, fp)
            idem_key_str = idem.key
            done = self.service.replay(
                idem, await self.service.read(lambda r: r.idempotency_get(idem_key_str))
            )
            if done is not None:
                return done
        card = (
            await self.service.read(lambda r: pipeline.authorize(r, ep, ident, params))
            if ep.access in pipeline.CARD_ACCESS
            else None
        )
        body = _body_of(ep.request, raw, obj, decoded)
        seen[3] = body
        return await handler(Request(ep, params, query, body, claims, idem, ident, card))

    async def _keyed(
        self,
        ep: Endpoint,
        raw: bytes,
        obj: object,
        authorization: bytes | None,
        ident: Identity,
        seen: list[Any],
        decoded: bool,
    ) -> Response:
        """A keyed crypto operation (_KEYED_OPS), single or batch item; raw, obj, decoded as
        for _operation. Its token is the Authorization header's (or the batch item's), checked
        before the body is decoded; else the body's token field (protocol.TOKEN_FIELD, read
        once the body is decoded, then checked exactly as the header's would be; none:
        NOT_ACTIVATED). The session is checked in the same store query as the key
        (Service.crypto_now). batch_items._keyed_item is this for a batch's fast path: keep the
        two alike."""
        service = self.service
        if authorization is None:
            claims, body = self._body_claims(ep, raw, obj, decoded, ident, seen)
        else:
            claims = service.authenticate(authorization, None, ident)
            try:
                body = _body_of(ep.request, raw, obj, decoded)
            except ApiError:
                # An ended session outranks a bad body, as when it is checked up front.
                await service.check_session(claims, time.time())
                raise
            _request_id(body)
            if protocol.TOKEN_FIELD in body:
                raise _twice()
            seen[3] = body
        if service._reads_block:
            return await service.keyed(claims, body, ep.op)
        # Service.keyed without its coroutine: the common case.
        try:
            return Response(200, service.crypto_now(claims, body, ep.op))
        except Offloaded as work:
            if IN_BATCH.get():
                raise
            return work.answer(await asyncio.to_thread(work.run))

    def _body_claims(
        self,
        ep: Endpoint,
        raw: bytes,
        obj: object,
        decoded: bool,
        ident: Identity,
        seen: list[Any],
    ) -> tuple[TokenClaims, dict[str, Any]]:
        """_keyed's request without an Authorization header: its decoded body (request id
        taken out) and the claims of the token in it (none: NOT_ACTIVATED)."""
        body = _body_of(ep.request, raw, obj, decoded)
        rid = body.pop(_RID_FIELD, None)  # _request_id(body), inline: every single request
        if rid is not None:
            if _rid_ok(rid) is None:
                raise _bad_rid()
            _REQUEST_ID.set(rid)
        seen[3] = body
        token = body.pop(protocol.TOKEN_FIELD, None)
        # Service.authenticate(_bearer(token), None, ident), its claims cached by the token's
        # str too: the decoders hand out one str per token value (fastjson._text's cache, the
        # repeated-request path), whose hash Python keeps, so a repeated token costs no copy
        # into an Authorization value and no hash of its ~200 bytes.
        return self._token_claims(token, ident), body

    def _token_claims(self, token: Any, ident: Identity) -> TokenClaims:
        """Service.authenticate(_bearer(token), None, ident) for a token sent in a body, its
        claims cached by the token's str (the one place of that cache and of its checks: single
        requests here, batch items in batch_items.py)."""
        claims = self._opened.get(token) if type(token) is str else None
        if claims is None:
            claims = self.service.authenticate(_bearer(token), None, ident)
            if type(token) is str:
                if len(self._opened) >= _OPENED_MAX:
                    self._opened.clear()
                self._opened[token] = claims
        else:
            # authenticate's checks of cached claims: the identity, then the expiry.
            pipeline.check_token(claims, ident)
            if claims.expires <= time.time():
                raise expired()
        return claims

    async def _body(
        self,
        receive: Receive,
        length: bytes | None,
        limit: int,
        code: str,
        first: Message | None = None,
    ) -> bytes:
        """The request body, within limit (else code); first: its first message, when the
        caller received it already."""
        if length is not None:
            _declared(length, limit, code)
        chunks: list[bytes] = []
        total = 0
        while True:
            if first is not None:
                msg, first = first, None
            else:
                msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk: bytes = msg.get("body", b"")
            if chunk:
                total += len(chunk)
                if total > limit:
                    raise ApiError(code, f"the body is over {limit} bytes")
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


async def _ignored() -> None:
    """Any other ASGI scope type (websocket): nothing to do."""


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


_NO_PARAMS: Final[dict[str, str]] = {}
_OPENED_MAX: Final = 10000  # as handlers._TOKEN_CACHE_MAX
_UNPARSED: Final = object()  # _operation's obj when the body is still raw bytes


def _declared(length: bytes, limit: int, code: str) -> None:
    """A Content-Length over limit is refused before the body is read."""
    try:
        declared = int(length)
    except ValueError:
        raise ApiError("BAD_REQUEST", "invalid Content-Length") from None
    if declared > limit:
        raise ApiError(code, f"the body is over {limit} bytes")


_RID_FIELD: Final = protocol.REQUEST_ID_FIELD
_rid_ok: Final = protocol.REQUEST_ID_RE.fullmatch
_REQUEST_ID: Final = audit.REQUEST_ID


def _bad_rid() -> ApiError:
    return ApiError("BAD_REQUEST", f"{protocol.REQUEST_ID_FIELD}: 1-64 of A-Z a-z 0-9 _ . : -")


def _request_id(body: dict[str, Any]) -> None:
    """Take a crypto request's own request id (protocol.REQUEST_ID_FIELD) out of its body
    into the audit context (where the X-Request-Id header's goes)."""
    rid = body.pop(_RID_FIELD, None)
    if rid is not None:
        if _rid_ok(rid) is None:
            raise _bad_rid()
        _REQUEST_ID.set(rid)


def _twice() -> ApiError:
    return ApiError(
        "BAD_REQUEST",
        f"the activation token is given twice ({protocol.TOKEN_HEADER} header or batch item, "
        f"and the request's {protocol.TOKEN_FIELD} field): send it in one place",
    )


def _bearer(token: str | None) -> bytes | None:
    """A token from a body (a crypto request's, a batch item's) as the header carries it."""
    if token is None:
        return None
    if not token.isascii():  # never a sealed token (and a lone surrogate cannot be encoded)
        raise ApiError("NOT_ACTIVATED", "the activation token is not valid")
    return b"Bearer " + token.encode("ascii")


def _audit(seen: list[Any], resp: Response, code: str | None) -> None:
    """The audit line of a refused request or a change (pipeline.audit_outcome)."""
    if code is None and resp.status >= 400:
        code = _code_of(resp.body)
    pipeline.audit_outcome(seen[0], seen[1], seen[2], seen[3], resp.status, code, resp.body)


def _code_of(body: bytes) -> str | None:
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def _item_failure(op: str, exc: Exception) -> tuple[str, Response]:
    """A batch item's refusal (ApiError: its code and message) or internal error (logged)."""
    if isinstance(exc, ApiError):
        return exc.code, _error(exc.code, exc.message)
    error_log.error("internal error on a batched %s", op, exc_info=exc)
    return "INTERNAL", _error("INTERNAL", "internal error (logged by the service)")


def _error(code: str, message: str) -> Response:
    return Response(ERRORS[code].http, dumps({"code": code, "message": message}))


_FAST: Final = {name: fast for name in STRUCTS if (fast := fastjson.decoder(name)) is not None}


def _decode(struct: str, raw: bytes) -> dict[str, Any]:
    fast = _FAST.get(struct)
    if fast is not None:
        body = fast(raw)
        if body is not None:
            return body
    elif struct == "Batch":
        found = fastjson.batch(raw)
        if found is not None:
            rid, runs = found
            return (
                {"items": runs} if rid is None else {protocol.REQUEST_ID_FIELD: rid, "items": runs}
            )
    # Any other spelling: the generic strict path, which also words every refusal.
    return decode_generic(struct, raw)


def decode_generic(struct: str, raw: bytes) -> dict[str, Any]:
    """A request body through json (UTF-8 only, duplicate keys refused) and protocol.decode."""
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


def _body_of(struct: str, raw: bytes, obj: object, decoded: bool) -> dict[str, Any]:
    """An operation's decoded body: obj itself when the batch's fast path decoded it, else
    raw (a single request's bytes) or obj (a batch item's parsed JSON) strictly decoded."""
    if decoded:
        return obj  # type: ignore[return-value]
    if obj is _UNPARSED:
        return _decode(struct, raw)
    return decode_obj(struct, obj)


def decode_obj(struct: str, obj: object) -> dict[str, Any]:
    """A batch item's request, parsed with its batch: the same strict struct check."""
    try:
        return protocol.decode(STRUCTS[struct], obj)
    except RecursionError:
        raise ApiError("BAD_REQUEST", "the body is nested too deeply") from None


def _query(ep: Endpoint, qs: bytes) -> dict[str, str]:
    if not qs:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(
            qs.decode("ascii"), keep_blank_values=True, strict_parsing=True
        )
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
