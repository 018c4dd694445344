"""The key service protocol client: one generic call() driven by protocol.ENDPOINTS, the retry
policy, the error mapping, and the typed wrappers the provider uses.

Retry policy (WSOP user guide 3.2.5 and design.md 4): an attempt that gets no answer (network,
TLS, timeout) or a 5xx answer is retried up to MAXRETRIES times, RETRYDELAY seconds apart; a 4xx
answer never is. Create and destroy requests carry an Idempotency-Key generated once per logical
call and reused by every retry, so a retry whose first attempt did reach the service never makes
a second object. A kept-alive connection the service closed while idle is replaced at once,
without counting as a retry. After the last attempt the caller gets TransportError
(CKR_DEVICE_ERROR) or the last ServiceError.

Error answers are JSON {"code", "message"} mapped through protocol.ckr_for(); anything else maps
by HTTP status alone. Request and response bodies are never logged.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pkcs11ws import constants as C
from pkcs11ws import protocol
from pkcs11ws.client.transport import BASE_HEADERS, CurlFailure, Transport
from pkcs11ws.config import Config
from pkcs11ws.errors import PKCS11Error, ServiceError, TransportError
from pkcs11ws.log import DEBUG3, DEBUG9, ERROR, LOG, WARNING, Logger

_PATH_PARAM_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
)
_MAX_TOKEN_HEADERS: Final = 64
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_decode_json = json.JSONDecoder().decode


def _loads(raw: bytes) -> Any:
    # Decoding the UTF-8 first skips json.loads' encoding detection on bytes.
    return _decode_json(raw.decode("utf-8"))


@dataclass(frozen=True)
class _Op:
    """What call() needs about one endpoint, computed once."""

    name: str
    method: str
    path: str
    templated: bool
    request: protocol.Struct
    response: protocol.Struct
    idempotent: bool
    has_body: bool


_OPS: Final[dict[str, _Op]] = {
    ep.op: _Op(
        ep.op,
        ep.method,
        ep.path,
        "{" in ep.path,
        protocol.STRUCTS[ep.request],
        protocol.STRUCTS[ep.response],
        ep.idempotent,
        ep.method == "POST",
    )
    for ep in protocol.ENDPOINTS
}


def _path_param(name: str, value: str) -> str:
    if not value or len(value) > 64 or not _PATH_PARAM_CHARS.issuperset(value):
        # Handles come from the service; anything else is a caller bug, never sent on the wire.
        raise PKCS11Error(C.CKR_ARGUMENTS_BAD, f"invalid {name} identifier {value!r}")
    return value


class KeyServiceClient:
    """Talks to one key service (HOST:PORT of a Config) with mutual TLS."""

    def __init__(
        self, cfg: Config, logger: Logger | None = None, transport: Transport | None = None
    ) -> None:
        self.cfg = cfg
        self.log = logger if logger is not None else LOG
        self.transport = transport if transport is not None else Transport(cfg)
        self.maxretries = cfg.maxretries
        self.retrydelay = cfg.retrydelay
        self._token_headers: dict[str, tuple[str, ...]] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return self.transport.stats()

    def reset_after_fork(self) -> None:
        self.transport.reset_after_fork()

    def close(self) -> None:
        self.transport.close()
        self._token_headers.clear()

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
        spec = _OPS[op]
        path = spec.path
        if spec.templated:
            params = path_params or {}
            path = path.format(**{k: _path_param(k, v) for k, v in params.items()})
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        data: bytes | None = None
        if spec.has_body:
            data = _dumps(protocol.encode(spec.request, body or {})).encode()
        if spec.idempotent and idempotency_key is None:
            idempotency_key = str(uuid.uuid4())
        headers = self._headers(token, idempotency_key)
        status, raw = self._send(spec, path, data, headers)
        if status == 204 or (not raw and spec.response.name == "Empty"):
            return {}
        try:
            return protocol.decode(spec.response, _loads(raw), "response")
        except (ValueError, protocol.ProtocolError) as e:
            self.log.error(f"{op}: malformed answer from the key service (HTTP {status}): {e}")
            raise ServiceError(
                C.CKR_DEVICE_ERROR, "BAD_RESPONSE", status, "malformed answer from the key service"
            ) from None

    def _send(
        self, spec: _Op, path: str, data: bytes | None, headers: Sequence[str]
    ) -> tuple[int, bytes]:
        """Send with the retry policy; return a 2xx answer or raise."""
        request = self.transport.request
        attempt = 0
        replaced_dead = False
        while True:
            started = time.monotonic() if self.log.enabled(DEBUG3) else 0.0
            if self.log.enabled(DEBUG9):
                # The trace of every attempt; sizes only, never a body.
                self.log.debug9(
                    f"{spec.name} {spec.method} {path}: attempt {attempt + 1}, "
                    f"{len(data) if data else 0} bytes"
                )
            try:
                status, raw = request(spec.method, path, data, headers)
            except CurlFailure as failure:
                if failure.dead_connection and not replaced_dead:
                    replaced_dead = True
                    if self.log.enabled(WARNING):
                        self.log.warning(
                            f"{spec.name} {spec.method} {path}: kept-alive connection was closed "
                            f"({failure}); reconnecting"
                        )
                    continue
                why = str(failure)
                if not failure.retryable or attempt >= self.maxretries:
                    self._give_up(spec, path, why, attempt)
                    raise TransportError(
                        f"{spec.name}: no answer from the key service at "
                        f"{self.transport.base_url}: {why}"
                        + (f" (after {attempt} retries)" if attempt else "")
                    ) from None
            else:
                if status < 300:
                    if self.log.enabled(DEBUG3):
                        ms = (time.monotonic() - started) * 1000
                        self.log.debug3(f"{spec.name} {spec.method} {path}: {status} {ms:.2f}ms")
                    return status, raw
                err = self._service_error(status, raw)
                if status < 500 or attempt >= self.maxretries:
                    if status >= 500:
                        self._give_up(spec, path, str(err), attempt)
                    elif self.log.enabled(DEBUG3):
                        self.log.debug3(f"{spec.name} {spec.method} {path}: {err}")
                    raise err
                why = str(err)
            attempt += 1
            if self.log.enabled(WARNING):
                self.log.warning(
                    f"{spec.name} {spec.method} {path}: {why}; "
                    f"retry {attempt}/{self.maxretries} in {self.retrydelay}s"
                )
            if self.retrydelay:
                time.sleep(self.retrydelay)

    def _give_up(self, spec: _Op, path: str, why: str, attempt: int) -> None:
        if self.log.enabled(ERROR):
            self.log.error(
                f"{spec.name} {spec.method} {path}: failed after {attempt + 1} attempt(s): {why}"
            )

    @staticmethod
    def _service_error(status: int, raw: bytes) -> ServiceError:
        try:
            obj = _loads(raw)
            err = protocol.decode(protocol.STRUCTS["Error"], obj, "error")
        except (ValueError, protocol.ProtocolError):
            reason = f"HTTP {status} without an error body"
            return ServiceError(protocol.ckr_for("", status), f"HTTP_{status}", status, reason)
        code: str = err["code"]
        return ServiceError(protocol.ckr_for(code, status), code, status, err["message"])

    # -- typed wrappers (the provider's interface) ---------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.call("health")

    def list_softcards(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("list_softcards")["softcards"]
        return result

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

    def deactivate(self, card: str, token: str) -> None:
        try:
            self.call("deactivate", path_params={"card": card}, token=token)
        finally:
            self._token_headers.pop(token, None)

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
        self, card: str, token: str, handle: str, attrs: protocol.Attrs
    ) -> dict[str, Any]:
        return self.call(
            "copy_object",
            path_params={"card": card, "handle": handle},
            token=token,
            body={"attrs": attrs},
        )

    def update_object(
        self, card: str, token: str, handle: str, attrs: protocol.Attrs
    ) -> dict[str, Any]:
        return self.call(
            "update_object",
            path_params={"card": card, "handle": handle},
            token=token,
            body={"attrs": attrs},
        )

    def create_object(self, card: str, token: str, attrs: protocol.Attrs) -> dict[str, Any]:
        return self.call(
            "create_object", path_params={"card": card}, token=token, body={"attrs": attrs}
        )

    def get_object(self, card: str, token: str, handle: str) -> dict[str, Any]:
        return self.call("get_object", path_params={"card": card, "handle": handle}, token=token)

    def delete_object(self, card: str, token: str, handle: str) -> None:
        self.call("delete_object", path_params={"card": card, "handle": handle}, token=token)

    def generate_key(
        self, card: str, token: str, mechanism: str, attrs: protocol.Attrs
    ) -> dict[str, Any]:
        return self.call(
            "generate_key",
            path_params={"card": card},
            token=token,
            body={"mechanism": mechanism, "attrs": attrs},
        )

    def encrypt(
        self, token: str, key: str, mechanism: str, iv: bytes, data: bytes
    ) -> tuple[bytes, bytes]:
        r = self.call(
            "encrypt",
            token=token,
            body={"key": key, "mechanism": mechanism, "iv": iv, "data": data},
        )
        return r["data"], r["last_block"]

    def decrypt(
        self, token: str, key: str, mechanism: str, iv: bytes, data: bytes
    ) -> tuple[bytes, bytes]:
        r = self.call(
            "decrypt",
            token=token,
            body={"key": key, "mechanism": mechanism, "iv": iv, "data": data},
        )
        return r["data"], r["last_block"]

    def sign(
        self, token: str, key: str, mechanism: str, data: bytes, mac_length: int | None = None
    ) -> bytes:
        r = self.call(
            "sign",
            token=token,
            body={"key": key, "mechanism": mechanism, "data": data, "mac_length": mac_length},
        )
        signature: bytes = r["signature"]
        return signature

    def verify(
        self,
        token: str,
        key: str,
        mechanism: str,
        data: bytes,
        signature: bytes,
        mac_length: int | None = None,
    ) -> None:
        r = self.call(
            "verify",
            token=token,
            body={
                "key": key,
                "mechanism": mechanism,
                "data": data,
                "signature": signature,
                "mac_length": mac_length,
            },
        )
        if r.get("valid") is not True:
            # The protocol reports a mismatch as an error; a 200 saying false is treated alike.
            raise ServiceError(
                C.CKR_SIGNATURE_INVALID, "SIGNATURE_INVALID", 200, "the MAC does not verify"
            )

    def random(self, length: int) -> bytes:
        data: bytes = self.call("random", body={"length": length})["data"]
        return data
