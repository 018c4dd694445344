"""The key service protocol client: one generic call() driven by protocol.ENDPOINTS, the retry
policy, the fast path of the per-operation calls, group commit's batch sending, and the typed
wrappers the provider uses. What goes on the wire (the endpoint table, JSON in and out, request
body pieces, the batch body and answer shape, error answers to ServiceError) is wire.py's.

Retry policy (WSOP user guide 3.2.5 and design.md 4): an attempt that gets no answer (network,
TLS, timeout) or a 5xx answer is retried up to MAXRETRIES times, RETRYDELAY seconds apart; a 4xx
answer never is. Create and destroy requests carry an Idempotency-Key generated once per logical
call and reused by every retry, so a retry whose first attempt did reach the service never makes
a second object. When every attempt fails, the key is kept (PendingKeys) for the next call of
the same operation with the same path and body bytes: an application that retries a create whose
first attempt the service committed but whose answer was lost gets the first object back (the
service replays its stored answer), never a second one. A kept-alive connection the service
closed while idle is replaced at once, without counting as a retry. After the last attempt the
caller gets TransportError (CKR_DEVICE_ERROR) or the last ServiceError.

With several servers in HOST, one attempt is one round over them (the transport fails over at
once, with the same Idempotency-Key: another replica on the same store answers a repeat with the
first answer); MAXRETRIES and RETRYDELAY count rounds in which every server failed.

Why every request may be sent again, to the same service or another replica: create_softcard,
create_object, copy_object, generate_key, delete_object and delete_softcard carry the
Idempotency-Key (the service answers a repeat with the first answer); update_object sets
absolute values; deactivate revokes (twice is once); activate makes one more token (a wrong
passphrase whose answer was lost counts twice toward the lockout, as with the seed's retries);
the rest only read or compute.

Deadline (issue 10): a call ends within TIMEOUT seconds, whatever MAXRETRIES x RETRYDELAY
says: each attempt's timeout is cut to the time left, and a retry that could not start before
the deadline is not waited for (the call fails at once, "connection refused" included).

Certificate rejection (issue 10): the service refuses an expired client certificate, or one
from another CA, by dropping the connection right after the TLS handshake; libcurl reports that
like a broken connection (curl error 52 or 56 on a new connection whose handshake completed, see
transport.REJECTION). One more attempt on a new connection, at once, tells it from a service
that died at that moment; a second such failure is a configuration error: no retry, one ERROR
line saying "the service refused this client certificate (expired? other CA?)", and
CertificateRejected (CKR_GENERAL_ERROR: nothing but the operator can fix it, as for an invalid
configuration; an unreachable service stays CKR_DEVICE_ERROR).

Error answers are JSON {"code", "message"} mapped through protocol.ckr_for() (wire.service_error);
anything else maps by HTTP status alone. Request and response bodies are never logged.

Every logical request carries a request id (request_ids.py: an X-Request-Id header, or a
single crypto request's body field; its retries reuse it), logged here at DEBUG3 and written by
the service in its audit trail, so one operation can be followed across both logs.

The per-operation calls (sign, verify, encrypt, decrypt) share one path, crypto(), driven by
the operation: the request JSON is assembled directly (wire.py; a cached head per token, key and
mechanism: the token travels in the body, see protocol.TOKEN_FIELD; the optional fields the
operation's request has, binascii base64), the first attempt goes straight
to the transport (the retry loop runs only after a failure, and only when no debug tracing is
on), and the answer is checked against the operation's response struct by a few exact tests; an
answer those tests do not accept goes through the generic strict protocol.decode(), so what is
accepted and every error are the same as on the generic path. Inside the module, the core's
fast path (pkcs11ws/_native/fastpath.pxi) writes the same body itself for a request with no IV
or parameter, sends it through the group commit and _single(), and hands every answer it does
not read itself to answer().
"""

from __future__ import annotations

import binascii
import time

from pkcs11ws import constants as C
from pkcs11ws import protocol
from pkcs11ws._native.core import ClientFields
from pkcs11ws.client.group import Call, GroupCommit
from pkcs11ws.client.idempotency import PendingKeys, new_idempotency_key
from pkcs11ws.client.request_ids import RequestIds, request_id
from pkcs11ws.client.transport import BASE_HEADERS, CurlFailure, Transport
from pkcs11ws.client.wire import (
    BATCH,
    CRYPTO,
    ENDPOINTS,
    NO_BATCH,
    RANDOM,
    Endpoint,
    batch_body,
    batch_results,
    crypto_head,
    crypto_tail,
    dumps,
    loads,
    path_param,
    service_error,
)
from pkcs11ws.config import Config
from pkcs11ws.errors import (
    CertificateRejected,
    Finalizing,
    PKCS11Error,
    ServiceError,
    TransportError,
)
from pkcs11ws.log import DEBUG1, DEBUG3, DEBUG9, ERROR, LOG, WARNING, Logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Final

_MAX_TOKEN_HEADERS: Final = 64
_MAX_PREFIXES: Final = 256
_b64 = binascii.b2a_base64
_monotonic = time.monotonic
_canonical_b64 = protocol.canonical_b64
REJECTED: Final = "the service refused this client certificate (expired? other CA?)"
_REQUEST_IDS: Final = RequestIds()


class KeyServiceClient(ClientFields):
    """Talks to one key service (HOST:PORT of a Config) with mutual TLS. (`transport` and `log`
    are the core's ClientFields, read by its lone request: pkcs11ws/_native/fastpath.pxi.)"""

    def __init__(
        self,
        cfg: Config,
        logger: Logger | None = None,
        transport: Transport | None = None,
        pending: PendingKeys | None = None,
    ) -> None:
        self.cfg = cfg
        self.pending = pending if pending is not None else PendingKeys()
        self.log = logger if logger is not None else LOG
        self.transport = transport if transport is not None else Transport(cfg, log=self.log)
        self.maxretries = cfg.maxretries
        self.retrydelay = cfg.retrydelay
        self.timeout = cfg.timeout
        self._token_headers: dict[str, tuple[str, ...]] = {}
        # (token, key, mechanism) -> a crypto request's JSON up to the opening quote of its
        # data: the token travels in the body (protocol.TOKEN_FIELD), not in a header.
        self._heads: dict[tuple[str, str, str], bytes] = {}
        # Group commit (group.py): BATCHINFLIGHT requests in flight per server; 0: off.
        self.group: GroupCommit | None = None
        if cfg.batchinflight:
            self.group = GroupCommit(cfg.batchinflight * len(cfg.servers), cfg.batchsize)
        # A batch's request id goes in its body (Batch.request_id) until a service refuses the
        # field (one from before it): then as the X-Request-Id header (_send_batch).
        self._batch_rid_in_body = True

    # -- plumbing -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return self.transport.stats()

    def reset_after_fork(self) -> None:
        _REQUEST_IDS.reset()
        if self.group is not None:
            self.group.reset()
        self.transport.reset_after_fork()
        self.pending.clear()  # the parent may retry with them: the child must not

    def abort(self) -> None:
        """End the calls in progress now (C_Finalize while threads are inside calls): their
        transfers fail, retry waits end, and they raise Finalizing (CKR_CRYPTOKI_NOT_INITIALIZED);
        later calls fail the same way without touching the network. close() does this too."""
        self.transport.abort()

    def close(self) -> None:
        self.transport.close()
        self._token_headers.clear()
        self._heads.clear()

    def _forget(self, token: str) -> None:
        """Drop what is cached with a token that ends (renewed or deactivated)."""
        self._token_headers.pop(token, None)
        for k in [k for k in self._heads if k[0] == token]:
            del self._heads[k]

    def _headers(self, token: str | None, idempotency_key: str | None) -> Sequence[str]:
        if token is None:
            if idempotency_key is None:
                return BASE_HEADERS
            return (*BASE_HEADERS, f"{protocol.IDEMPOTENCY_HEADER}: {idempotency_key}")
        auth = self._token_headers.get(token)
        if auth is None:
            if "\r" in token or "\n" in token:
                raise PKCS11Error(C.CKR_ARGUMENTS_BAD, "invalid activation token")
            if len(self._token_headers) >= _MAX_TOKEN_HEADERS:
                self._token_headers.clear()
            auth = (*BASE_HEADERS, f"{protocol.TOKEN_HEADER}: Bearer {token}")
            self._token_headers[token] = auth
        if idempotency_key is None:
            return auth
        return (*auth, f"{protocol.IDEMPOTENCY_HEADER}: {idempotency_key}")

    def call(
        self,
        op: str,
        *,
        path_params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        query: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """One logical request of the protocol (with its retries); returns the decoded answer."""
        spec = ENDPOINTS[op]
        path = spec.path
        if spec.templated:
            params = path_params or {}
            path = path.format(**{k: path_param(k, v) for k, v in params.items()})
        if query:
            import urllib.parse  # rare (delete_softcard ?force=true): kept out of start-up

            path = f"{path}?{urllib.parse.urlencode(query)}"
        data: bytes | None = None
        if spec.has_body:
            data = dumps(protocol.encode(spec.request, body or {})).encode()
        slot: tuple[str, str, bytes] | None = None
        reused = False
        if spec.idempotent and idempotency_key is None:
            if self.pending:
                slot = PendingKeys.slot(op, path, data)
                idempotency_key = self.pending.take(slot)
                reused = idempotency_key is not None
                if reused and self.log.enabled(DEBUG1):
                    self.log.debug1(f"{op}: reusing the Idempotency-Key of an unanswered request")
            if idempotency_key is None:
                idempotency_key = new_idempotency_key()
            try:
                headers = (*self._headers(token, idempotency_key), _REQUEST_IDS.header())
                status, raw = self._send(spec, path, data, headers)
            except PKCS11Error as e:
                # Without an answer (or with a 5xx) the service may have committed an attempt:
                # the same request again must carry this key to get that answer back. A key
                # kept from such a failure stays kept through later refusals (e.g. a login
                # that ended in between).
                if (
                    reused
                    or isinstance(e, (TransportError, Finalizing))  # Finalizing: cut short
                    or (isinstance(e, ServiceError) and e.http >= 500)
                ):
                    self.pending.keep(slot or PendingKeys.slot(op, path, data), idempotency_key)
                raise
        else:
            headers = (*self._headers(token, idempotency_key), _REQUEST_IDS.header())
            status, raw = self._send(spec, path, data, headers)
        if status == 204 or (not raw and spec.response.name == "Empty"):
            return {}
        return self._decode(spec, status, raw)

    def _decode(self, spec: Endpoint, status: int, raw: bytes | object) -> dict[str, Any]:
        """The strict decoding of a 2xx answer (raw: its body, or that body already parsed)."""
        try:
            obj = loads(raw) if isinstance(raw, bytes) else raw
            return protocol.decode(spec.response, obj, "response")
        except (ValueError, protocol.ProtocolError) as e:
            self.log.error(
                f"{spec.name}: malformed answer from the key service (HTTP {status}): {e}"
            )
            raise ServiceError(
                C.CKR_DEVICE_ERROR, "BAD_RESPONSE", status, "malformed answer from the key service"
            ) from None

    def _single(self, op: str, token: str | None, data: bytes) -> tuple[int, bytes]:
        """One crypto request on the fast path: (status, the answer's body, not parsed: the
        core's fast path reads the expected shape from the bytes, answer() parses the rest).

        The retry policy is the same as call()'s: the first attempt's outcome is handed to
        _send() when it is not a 2xx answer, or when debug tracing wants every attempt logged.
        The core's fast path writes the same steps in C for a lone call (fastpath.pxi
        _send_one(): keep the two alike).
        """
        spec = ENDPOINTS[op]
        # The token, if any, is in data (crypto(), _head()), and so is the request id.
        if op in CRYPTO:
            headers: Sequence[str] = BASE_HEADERS
            ids = _REQUEST_IDS  # the request id as the body's first field (request_ids.py)
            data = b'%s%d",%s' % (ids.field, next(ids.count), data[1:])
        else:
            headers = (*BASE_HEADERS, _REQUEST_IDS.header())
        if self.log.level >= DEBUG3:
            status, raw = self._send(spec, spec.path, data, headers)
        else:
            started = _monotonic()
            try:
                status, raw = self.transport.request(spec.method, spec.path, data, headers)
            except CurlFailure as failure:
                status, raw = self._send(spec, spec.path, data, headers, failure, started)
            else:
                if status >= 300:
                    status, raw = self._send(spec, spec.path, data, headers, (status, raw), started)
        return status, raw

    def _send_batch(
        self,
        calls: list[Call],
        body: bytes | None = None,
        first: tuple[int, bytes] | CurlFailure | None = None,
    ) -> None:
        """Send calls in one batch request; leave each its answer or error (never raises).
        body, first: the request (its id in the body) that the core already sent for them
        (batchpath.pxi _send_batch), and its outcome, counted as attempt 1: the core reads the
        usual answer itself and hands every other outcome here."""
        ids = _REQUEST_IDS  # the request id as the body's first field (request_ids.py)
        headers: Sequence[str]
        if body is not None:
            headers = BASE_HEADERS
        elif self._batch_rid_in_body:
            body = batch_body(calls, ids.field, next(ids.count))
            headers = BASE_HEADERS
        else:
            body = batch_body(calls, None, 0)
            headers = (*BASE_HEADERS, ids.header())
        try:
            # One request for all: the deadline counts from the oldest call's start.
            status, raw = self._send(
                BATCH, BATCH.path, body, headers, first, min(c.started for c in calls)
            )
            results = batch_results(raw)
            if results is None:  # not the expected shape: the strict decoder says why
                results = self._decode(BATCH, status, raw)["results"]
            if len(results) != len(calls):
                self.log.error(f"batch: {len(results)} answers to {len(calls)} calls")
                raise ServiceError(
                    C.CKR_DEVICE_ERROR,
                    "BAD_RESPONSE",
                    status,
                    "malformed answer from the key service",
                )
        except ServiceError as e:
            if e.code == "UNKNOWN_FIELD" and self._batch_rid_in_body:
                # A service from before Batch.request_id refuses the field (and so the whole
                # batch, before any item ran): the header spelling from now on, this batch again.
                self._batch_rid_in_body = False
                if self.log.enabled(WARNING):
                    self.log.warning(
                        "batch refused (no request id field in the service's schema): "
                        "sending batch request ids as a header"
                    )
                self._send_batch(calls)
                return
            if e.code in NO_BATCH:
                if e.code != "BATCH_TOO_LARGE" and self.group is not None:
                    self.group.size = 1  # no batch endpoint there: single requests from now on
                if self.log.enabled(WARNING):
                    self.log.warning(f"batch refused ({e}): sending the calls one by one")
                for c in calls:
                    c.alone = True
                return
            for c in calls:
                c.error = e
            return
        except BaseException as e:  # every carried call fails with it
            for c in calls:
                c.error = e
            return
        for c, r in zip(calls, results, strict=True):
            st = r["status"]
            if 200 <= st < 300:
                c.status, c.answer = st, r["answer"]
            else:
                c.error = service_error(st, dumps(r["answer"]).encode())

    def _send(
        self,
        spec: Endpoint,
        path: str,
        data: bytes | None,
        headers: Sequence[str],
        first: tuple[int, bytes] | CurlFailure | None = None,
        started: float = 0.0,
    ) -> tuple[int, bytes]:
        """Send with the retry policy; return a 2xx answer or raise. first: the outcome of a
        first attempt the caller already made (the fast path), counted as attempt 1, which
        started at started."""
        transport = self.transport
        request = transport.request
        deadline = (started or _monotonic()) + self.timeout
        log = self.log
        # The request id, for the log: read at once only for tracing, else on a failure (every
        # batch request passes here: no work for a log line that is not written).
        rid = request_id(headers, data) if log.level >= DEBUG3 else ""
        attempt = 0
        replaced_dead = False
        confirmed = False
        err: ServiceError | None
        while True:
            traced = log.level >= DEBUG3
            t0 = _monotonic() if traced else 0.0
            if first is None and log.level >= DEBUG9:
                # The trace of every attempt; sizes only, never a body.
                self.log.debug9(
                    f"{spec.name} {spec.method} {path} [{rid}]: attempt {attempt + 1}, "
                    f"{len(data) if data else 0} bytes"
                )
            try:
                if first is None:
                    status, raw = request(spec.method, path, data, headers, deadline)
                else:
                    outcome, first = first, None
                    if isinstance(outcome, CurlFailure):
                        raise outcome
                    status, raw = outcome
            except CurlFailure as failure:
                rid = rid or request_id(headers, data)
                if failure.dead_connection and not replaced_dead:
                    replaced_dead = True
                    if self.log.enabled(WARNING):
                        self.log.warning(
                            f"{spec.name} {spec.method} {path}: kept-alive connection was closed "
                            f"({failure}); reconnecting"
                        )
                    continue
                if failure.rejected:
                    if not confirmed and _monotonic() < deadline:
                        confirmed = True  # once more on a new connection, at once (see above)
                        continue
                    self._rejected(spec, path, failure)
                why = str(failure)
                if not failure.retryable or attempt >= self.maxretries:
                    self._give_up(spec, f"{path} [{rid}]", why, attempt)
                    raise self._no_answer(spec, why, attempt) from None
                err = None
            else:
                if status < 300:
                    if traced:
                        ms = (_monotonic() - t0) * 1000
                        log.debug3(f"{spec.name} {spec.method} {path} [{rid}]: {status} {ms:.2f}ms")
                    return status, raw
                rid = rid or request_id(headers, data)
                err = service_error(status, raw)
                if status < 500 or attempt >= self.maxretries:
                    if status >= 500:
                        self._give_up(spec, f"{path} [{rid}]", str(err), attempt)
                    elif self.log.enabled(DEBUG3):
                        self.log.debug3(f"{spec.name} {spec.method} {path} [{rid}]: {err}")
                    raise err
                why = str(err)
            if _monotonic() + self.retrydelay >= deadline:
                # The retry could not start before the deadline: fail now rather than wait.
                why = f"{why}; no retry within TIMEOUT {self.timeout}s"
                self._give_up(spec, path, why, attempt)
                if err is not None:
                    raise err
                raise self._no_answer(spec, why, attempt)
            attempt += 1
            if self.log.enabled(WARNING):
                self.log.warning(
                    f"{spec.name} {spec.method} {path} [{rid}]: {why}; "
                    f"retry {attempt}/{self.maxretries} in {self.retrydelay}s"
                )
            if self.retrydelay:
                transport.pause(self.retrydelay)  # C_Finalize cuts it short

    def _no_answer(self, spec: Endpoint, why: str, attempt: int) -> TransportError:
        return TransportError(
            f"{spec.name}: no answer from the key service at {self.transport.base_url}: {why}"
            + (f" (after {attempt} retries)" if attempt else "")
        )

    def _rejected(self, spec: Endpoint, path: str, failure: CurlFailure) -> None:
        """The service refused the client certificate: log it once, raise; never retried."""
        from pkcs11ws.client.certinfo import expiry_warning  # rare: kept out of start-up

        where = failure.server or self.transport.base_url
        note = expiry_warning(self.cfg.cert, time.time())
        text = (
            f"{spec.name} {spec.method} {path}: {REJECTED}: key service {where}, CERT "
            f"{self.cfg.cert} ({failure})" + (f"; {note}" if note else "")
        )
        if self.log.enabled(ERROR):
            self.log.error(text)
        raise CertificateRejected(
            f"{spec.name}: {REJECTED} (key service {where}, CERT {self.cfg.cert})"
        )

    def _give_up(self, spec: Endpoint, path: str, why: str, attempt: int) -> None:
        if self.log.enabled(ERROR):
            self.log.error(
                f"{spec.name} {spec.method} {path}: failed after {attempt + 1} attempt(s): {why}"
            )

    # -- typed wrappers (the provider's interface) ---------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.call("health")

    def list_softcards(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("list_softcards")["softcards"]
        return result

    def get_softcard(self, card: str) -> dict[str, Any]:
        return self.call("get_softcard", path_params={"card": card})

    def create_softcard(self, name: str, passphrase: bytes) -> dict[str, Any]:
        return self.call("create_softcard", body={"name": name, "passphrase": passphrase})

    def delete_softcard(self, card: str, force: bool = False) -> None:
        self.call(
            "delete_softcard",
            path_params={"card": card},
            query={"force": "true"} if force else None,
        )

    def activate(self, card: str, passphrase: bytes) -> tuple[str, int]:
        r = self.call("activate", path_params={"card": card}, body={"passphrase": passphrase})
        return r["token"], r["expires_in"]

    def renew(self, card: str, token: str) -> tuple[str, int]:
        """A fresh token for a live activation (the old one stays valid until it expires)."""
        r = self.call("renew", path_params={"card": card}, token=token)
        self._forget(token)
        return r["token"], r["expires_in"]

    def deactivate(self, card: str, token: str) -> None:
        try:
            self.call("deactivate", path_params={"card": card}, token=token)
        finally:
            self._forget(token)

    def search_objects(self, card: str, token: str, attrs: protocol.Attrs) -> list[dict[str, Any]]:
        r = self.call(
            "search_objects", path_params={"card": card}, token=token, body={"attrs": attrs}
        )
        objects: list[dict[str, Any]] = r["objects"]
        return objects

    def search_public(self, card: str, attrs: protocol.Attrs) -> list[dict[str, Any]]:
        """The card's public objects (no activation needed)."""
        r = self.call("search_public", path_params={"card": card}, body={"attrs": attrs})
        objects: list[dict[str, Any]] = r["objects"]
        return objects

    def copy_object(
        self, card: str, token: str, uuid: str, attrs: protocol.Attrs
    ) -> dict[str, Any]:
        return self.call(
            "copy_object",
            path_params={"card": card, "handle": uuid},
            token=token,
            body={"attrs": attrs},
        )

    def update_object(
        self, card: str, token: str, uuid: str, attrs: protocol.Attrs
    ) -> dict[str, Any]:
        return self.call(
            "update_object",
            path_params={"card": card, "handle": uuid},
            token=token,
            body={"attrs": attrs},
        )

    def create_object(self, card: str, token: str, attrs: protocol.Attrs) -> dict[str, Any]:
        return self.call(
            "create_object", path_params={"card": card}, token=token, body={"attrs": attrs}
        )

    def get_object(self, card: str, token: str, uuid: str) -> dict[str, Any]:
        return self.call("get_object", path_params={"card": card, "handle": uuid}, token=token)

    def delete_object(self, card: str, token: str, uuid: str) -> None:
        self.call("delete_object", path_params={"card": card, "handle": uuid}, token=token)

    def generate_key(
        self, card: str, token: str, mechanism: str, attrs: protocol.Attrs
    ) -> dict[str, Any]:
        return self.call(
            "generate_key",
            path_params={"card": card},
            token=token,
            body={"mechanism": mechanism, "attrs": attrs},
        )

    def generate_key_pair(
        self,
        card: str,
        token: str,
        mechanism: str,
        public: protocol.Attrs,
        private: protocol.Attrs,
    ) -> dict[str, Any]:
        return self.call(
            "generate_key_pair",
            path_params={"card": card},
            token=token,
            body={"mechanism": mechanism, "public_attrs": public, "private_attrs": private},
        )

    # The per-operation calls: one path (see the module docstring).

    def crypto(
        self,
        op: str,
        token: str,
        key: str,
        mechanism: str,
        data: bytes,
        iv: bytes | None = None,
        signature: bytes | None = None,
        mac_length: int | None = None,
        params: dict[str, Any] | None = None,
    ) -> bytes | None:
        """One sign, verify, encrypt or decrypt (op): the output (the signature, the data), or
        None for a signature that verifies. iv, signature, mac_length and params are the
        optional fields of the operation's request struct; a signature that does not verify
        raises ServiceError SIGNATURE_INVALID."""
        c = CRYPTO[op]
        head = self._heads.get((token, key, mechanism))
        if head is None:
            head = self._head(token, key, mechanism)
        parts = [head, _b64(data, newline=False)]
        if iv is not None:
            parts += (b'","iv":"', _b64(iv, newline=False))
        if signature is not None:
            parts += (b'","signature":"', _b64(signature, newline=False))
        parts.append(
            b'"}' if mac_length is None and not params else crypto_tail(c.spec, mac_length, params)
        )
        body = b"".join(parts)
        group = self.group
        if group is None:
            status, r = self._single(op, token, body)
        else:
            status, r = group.run(op, token, body, self)
        return self.answer(op, status, r)

    def answer(self, op: str, status: int, r: Any) -> bytes | None:
        """The output of a crypto answer (r: a single request's body, or a batch item's parsed
        answer): the exact shape by a few tests, else the strict decoder, which says what is
        wrong (BAD_RESPONSE). None: a signature that verifies."""
        c = CRYPTO[op]
        if type(r) is bytes:
            try:
                r = loads(r)
            except ValueError:
                r = self._decode(c.spec, status, r)  # raises BAD_RESPONSE
        if type(r) is dict and len(r) == c.size:
            value = r.get(c.out)
            if type(value) is str:
                out = _canonical_b64(value)
                if out is not None:
                    for name in c.more:
                        more = r.get(name)
                        if type(more) is not str or _canonical_b64(more) is None:
                            break
                    else:
                        return out
            elif value is True and c.boolean:
                return None
        decoded = self._decode(c.spec, status, r)[c.out]
        if decoded is False:
            # The protocol reports a mismatch as an error; a 200 saying false is treated alike.
            raise ServiceError(
                C.CKR_SIGNATURE_INVALID, "SIGNATURE_INVALID", 200, "the MAC does not verify"
            )
        if decoded is True:
            return None
        result: bytes = decoded
        return result

    def head(self, token: str, key: str, mechanism: str) -> bytes:
        """A crypto request's JSON up to the opening quote of its data (cached): what the
        core's fast path puts before the data it encodes itself."""
        head = self._heads.get((token, key, mechanism))
        return head if head is not None else self._head(token, key, mechanism)

    def _head(self, token: str, key: str, mechanism: str) -> bytes:
        """A crypto request's JSON up to the opening quote of its data (cached)."""
        if len(self._heads) >= _MAX_PREFIXES:
            self._heads.clear()
        head = self._heads[(token, key, mechanism)] = crypto_head(token, key, mechanism)
        return head

    # Typed shorthands of crypto() for Python callers (the provider calls crypto() itself).

    def sign(
        self,
        token: str,
        key: str,
        mechanism: str,
        data: bytes,
        mac_length: int | None = None,
        params: dict[str, Any] | None = None,
    ) -> bytes:
        out = self.crypto("sign", token, key, mechanism, data, None, None, mac_length, params)
        assert out is not None
        return out

    def verify(
        self,
        token: str,
        key: str,
        mechanism: str,
        data: bytes,
        signature: bytes,
        mac_length: int | None = None,
    ) -> None:
        self.crypto("verify", token, key, mechanism, data, None, signature, mac_length)

    def encrypt(
        self,
        token: str,
        key: str,
        mechanism: str,
        iv: bytes | None,
        data: bytes,
        params: dict[str, Any] | None = None,
    ) -> bytes:
        out = self.crypto("encrypt", token, key, mechanism, data, iv, None, None, params)
        assert out is not None
        return out

    def decrypt(
        self,
        token: str,
        key: str,
        mechanism: str,
        iv: bytes | None,
        data: bytes,
        params: dict[str, Any] | None = None,
    ) -> bytes:
        out = self.crypto("decrypt", token, key, mechanism, data, iv, None, None, params)
        assert out is not None
        return out

    def random(self, length: int) -> bytes:
        if self.group is None:
            data: bytes = self.call("random", body={"length": length})["data"]
            return data
        status, r = self.group.run("random", None, b'{"length":%d}' % length, self)
        if type(r) is bytes:
            try:
                r = loads(r)
            except ValueError:
                r = self._decode(RANDOM, status, r)  # raises BAD_RESPONSE
        if type(r) is dict and len(r) == 1:
            value = r.get("data")
            out = _canonical_b64(value) if type(value) is str else None
            if out is not None:
                return out
        result: bytes = self._decode(RANDOM, status, r)["data"]
        return result
