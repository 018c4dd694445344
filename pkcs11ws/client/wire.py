"""The protocol client's wire forms: what api.py's KeyServiceClient puts on the wire and how it
reads the answers, without any I/O or retry policy (those stay in api.py).

This file owns: the endpoint table as the client sees it (Endpoint, read once from
protocol.ENDPOINTS), the compact JSON encoder and the fast decoder of the service's answers
(loads), path parameter checks, the mapping of an error answer to ServiceError, and the
pieces of the fast-path bodies: a crypto request's head (token, key, mechanism) and tail (MAC
length, mechanism parameters), the per-operation answer shapes (CryptoOp), and a batch
request's body and answer shape. Every struct and field name comes from protocol.py (the one
schema); what is built here is what protocol.encode() would build, only assembled faster.
"""

from __future__ import annotations

from pkcs11ws import constants as C
from pkcs11ws import protocol
from pkcs11ws._lite import dataclass
from pkcs11ws.errors import PKCS11Error, ServiceError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, Final

    from pkcs11ws.client.group import Call

_PATH_PARAM_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
)

# JSON through the standard library's C encoder and scanner (`_json`) without the `json`
# package: json imports re, and re imports enum, ~12 M instructions of every process that loads
# the module (pkcs11-tool -L makes one request). dumps and loads give exactly what
# json.dumps(obj, separators=(",", ":")) and json.loads give, through the same C code; what the
# compact fast path does not take (whitespace around a document, trailing data, an error to
# word, an interpreter without `_json`) goes to the json package, imported then.


def _full_loads(text: str) -> Any:
    import json

    return json.loads(text)


def _default(o: Any) -> Any:
    """json.JSONEncoder.default: what cannot be encoded is a TypeError with the same words."""
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


class _ScanContext:
    """The attributes the C scanner reads from a json.JSONDecoder() made with no arguments."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    # json.decoder's constants (float(), not math's: math is one more shared object to load)
    parse_constant = {
        "-Infinity": float("-inf"),
        "Infinity": float("inf"),
        "NaN": float("nan"),
    }.__getitem__


try:
    from _json import encode_basestring_ascii as _json_str
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # an interpreter without json's C accelerator: the json package does it all
    import json
    import json.encoder

    _json_str = json.encoder.encode_basestring_ascii
    _scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

    def dumps(obj: Any) -> str:
        """json.dumps(obj, separators=(",", ":")): ASCII only, circular references refused."""
        return json.dumps(obj, separators=(",", ":"))

else:
    # (typeshed types the context as a scanner: any object with the attributes will do)
    _scan_json = _make_scanner(_ScanContext())  # type: ignore[arg-type]

    def dumps(obj: Any) -> str:
        """json.dumps(obj, separators=(",", ":")): ASCII only, circular references refused."""
        if type(obj) is str:
            return _json_str(obj)
        encode = _make_encoder({}, _default, _json_str, None, ":", ",", False, False, True)
        return "".join(encode(obj, 0))


def loads(raw: bytes) -> Any:
    """raw parsed as JSON. A compact answer (the service's) is one call of the C scanner;
    anything else (whitespace around, trailing data) and every error (the scanner words them
    with json's own exception class: it needs the json package) go to json.loads. Decoding the
    UTF-8 first skips json.loads' encoding detection on bytes."""
    text = raw.decode("utf-8")
    try:
        obj, end = _scan_json(text, 0)
    except Exception:  # StopIteration (nothing to start on), or an error json.loads words again
        end = -1
    return obj if end == len(text) else _full_loads(text)


@dataclass(frozen=True)
class Endpoint:
    """What call() needs about one endpoint, computed once."""

    name: str
    method: str
    path: str
    templated: bool
    request: protocol.Struct
    response: protocol.Struct
    idempotent: bool
    has_body: bool


ENDPOINTS: Final[dict[str, Endpoint]] = {
    ep.op: Endpoint(
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


@dataclass(frozen=True)
class CryptoOp:
    """A per-operation endpoint as crypto() sees it, read from its response struct: the output
    field (bytes, or Verified's bool) and the other bytes fields the answer must carry."""

    spec: Endpoint
    out: str
    boolean: bool
    size: int
    more: tuple[str, ...]


def _crypto_op(op: str) -> CryptoOp:
    spec = ENDPOINTS[op]
    first, *rest = spec.response.fields
    assert all(f.kind == "bytes" for f in rest) and first.kind in ("bytes", "bool")
    return CryptoOp(
        spec, first.name, first.kind == "bool", 1 + len(rest), tuple(f.name for f in rest)
    )


CRYPTO: Final = {op: _crypto_op(op) for op in ("encrypt", "decrypt", "sign", "verify")}
RANDOM: Final = ENDPOINTS["random"]
BATCH: Final = ENDPOINTS["batch"]
_ITEM_HEADS: Final = {op: b'{"op":"%s","request":' % op.encode() for op in protocol.BATCHABLE}
# A batch the service cannot take: an older service without the endpoint, or a batch over its
# limits. The calls then go as single requests (and, without the endpoint, from then on).
NO_BATCH: Final = frozenset({"NOT_FOUND", "METHOD_NOT_ALLOWED", "BATCH_TOO_LARGE"})


def path_param(name: str, value: str) -> str:
    if not value or len(value) > 64 or not _PATH_PARAM_CHARS.issuperset(value):
        # Handles come from the service; anything else is a caller bug, never sent on the wire.
        raise PKCS11Error(C.CKR_ARGUMENTS_BAD, f"invalid {name} identifier {value!r}")
    return value


def crypto_head(token: str, key: str, mechanism: str) -> bytes:
    """A crypto request's JSON up to the opening quote of its data: the token travels in the
    body (protocol.TOKEN_FIELD), not in a header."""
    text = (
        f'{{"{protocol.TOKEN_FIELD}":{_json_str(token)},"key":{_json_str(key)},'
        f'"mechanism":{_json_str(mechanism)},"data":"'
    )
    return text.encode("ascii")


def crypto_tail(spec: Endpoint, mac_length: int | None, params: dict[str, Any] | None) -> bytes:
    """The end of a fast-path body after its last base64 field: the MAC length of a _GENERAL
    mechanism and the mechanism's parameters (PSS, OAEP, GCM) as the protocol encodes them."""
    if not params:
        return b'","mac_length":%d}' % mac_length if mac_length is not None else b'"}'
    values = {k: v for k, v in params.items() if v is not None}
    if mac_length is not None:
        values["mac_length"] = mac_length
    fields = protocol.encode(spec.request, values)
    if not fields:
        return b'"}'
    return b'",' + dumps(fields)[1:].encode("ascii")


def batch_body(calls: Sequence[Call], rid_field: bytes | None, n: int) -> bytes:
    """A batch request carrying calls' bodies as they are. Each request carries its own token
    (crypto()): the items need none of theirs. Its request id is the body's first field
    (rid_field: request_ids.RequestIds.field, then the number n), not an X-Request-Id header:
    a header that changes per request makes pycurl rebuild the handle's header list. With
    rid_field None the body has no request id (a service from before Batch.request_id: the
    caller sends it as a header)."""
    parts = [_ITEM_HEADS[c.op] + c.data + b"}" for c in calls]
    if rid_field is None:
        return b'{"items":[%s]}' % b",".join(parts)
    return b'%s%d","items":[%s]}' % (rid_field, n, b",".join(parts))


def batch_results(raw: bytes) -> list[dict[str, Any]] | None:
    """A batch answer's results when it has exactly the BatchResult shape (what the strict
    protocol.decode accepts), else None: a few exact tests instead of the generic walk."""
    try:
        obj = loads(raw)
    except ValueError:
        return None
    results = obj.get("results") if type(obj) is dict and len(obj) == 1 else None
    if type(results) is not list:
        return None
    for r in results:
        if not (
            type(r) is dict
            and len(r) == 2
            and type(r.get("answer")) is dict
            and type(r.get("status")) is int
            and r["status"] >= 0
        ):
            return None
    return results


def service_error(status: int, raw: bytes) -> ServiceError:
    """A non-2xx answer as ServiceError: its JSON {"code", "message"} mapped through
    protocol.ckr_for(), or the HTTP status alone when the body is not that."""
    try:
        obj = loads(raw)
        err = protocol.decode(protocol.STRUCTS["Error"], obj, "error")
    except (ValueError, protocol.ProtocolError):
        reason = f"HTTP {status} without an error body"
        return ServiceError(protocol.ckr_for("", status), f"HTTP_{status}", status, reason)
    code: str = err["code"]
    return ServiceError(protocol.ckr_for(code, status), code, status, err["message"])
