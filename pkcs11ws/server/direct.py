"""The keyed crypto requests' direct paths, in the module's spelling: a single request
(Direct.single(identity, endpoint, authorization, body)) and a batch that is one run of HMAC
signs or verifies (Direct.batch(identity, body)), each -> the answer bytes, or None for the
full path.

Single: the module sends each single request as its request id, then its token, key and
mechanism, then its data (fastjson.RidFirst): a body whose bytes from the end of the request
id up to its trailing values repeat the last body decoded in full has that body's token, key
and mechanism (RidFirst.kept), so only the request id and the trailing values are read (in C),
and no dict is made for the request. Batch: a body whose items all repeat the last batch's
first item up to their trailing values (fastjson.one_run, in C): one token for all of them,
in each item's request (the module's spelling) or as each item's token.

The checks are the full paths' (App._body_claims then CryptoHandlers.crypto_now; a batch run's
first item in batch_items._keyed_item, then its verdict for the others), in their order and by
the same calls: the request id (one of protocol.REQUEST_ID_RE's), the token's claims
(App._token_claims: identity binding, expiry), then the verdict (CryptoHandlers._key: live
session, mechanism, key, type, usage, with its cache and the store's change mark). An HMAC sign
or verify with a full-length mechanism is then answered from the key's prepared state in C
(the MAC's base64 into the answer; a verify's MAC compared in constant time), a batch's items
each while the verdict's time holds (_hot.mac_run, verify_run); another single operation runs
its family's function on a body made as the full path makes it. Anything else (an
Authorization header, a store whose reads block, another spelling, a refusal, a wrong MAC, an
item the verdict cannot answer, more items than batch.max_items, offloaded work) returns None:
the full path then decides and answers the whole request, with its audit lines, as it does
every request. What these paths leave behind (the claims and verdict caches, the request id)
is what the full path leaves.

Plain functions of their arguments (no ASGI scope, no coroutine): the app's request entry
calls them wherever it has the identity, the Authorization header and the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pkcs11ws import protocol
from pkcs11ws.protocol import Endpoint
from pkcs11ws.server import audit, fastjson
from pkcs11ws.server._hot import HmacState, mac_answer, mac_equals, mac_run, verify_run
from pkcs11ws.server.handlers_crypto import B64_ANSWERS, VERIFIED_BODY
from pkcs11ws.server.identity import Identity

if TYPE_CHECKING:
    from pkcs11ws.server.handlers import Service
    from pkcs11ws.server.sealing import TokenClaims

_TOKEN: Final = protocol.TOKEN_FIELD
_RID: Final = protocol.REQUEST_ID_FIELD
_SIGN_HEAD: Final = B64_ANSWERS["sign"]
_B64_END: Final = b'"}'  # a B64_ANSWERS answer's end
_REQUEST_ID: Final = audit.REQUEST_ID

# A batch item's answer bytes (batch_items.py's too): a success's start, a B64_ANSWERS answer's
# end and its item's, a verify's whole item.
ITEM_OK: Final = b'{"status":200,"answer":'
ITEM_B64_END: Final = _B64_END + b"}"
ITEM_VERIFIED: Final = ITEM_OK + VERIFIED_BODY + b"}"
# A run's trailing values (fastjson.BatchRun's names): a sign's data alone; a verify's data
# and signature.
RUN_DATA: Final = ("data",)
RUN_DATA_AND_MAC: Final = ("data", "signature")


class Direct:
    """The direct paths of the keyed ops (ops: App's _KEYED_OPS) on one app's service."""

    def __init__(
        self,
        service: Service,
        token_claims: Callable[[Any, Identity], TokenClaims],
        ops: frozenset[str],
        batch_max_items: int,
    ) -> None:
        self._service = service
        self._token_claims = token_claims
        self._ops = ops
        self._max_items = batch_max_items
        self._heads: dict[str, fastjson.RidFirst] = {}
        for op in ops:
            found = fastjson.decoder(protocol.ENDPOINT_BY_OP[op].request)
            if isinstance(found, fastjson.RidFirst):
                self._heads[op] = found
        batch = protocol.ENDPOINT_BY_OP["batch"]
        if batch.changes or batch.auth or batch.idempotent:
            raise RuntimeError("the batch endpoint needs more than Direct.batch checks")

    def single(
        self, ident: Identity, ep: Endpoint, authorization: bytes | None, raw: bytes
    ) -> bytes | None:
        """ep's answer to raw from identity ident (200), or None: the full path's to answer."""
        head = self._heads.get(ep.op)
        if head is None or authorization is not None:
            return None
        found = head.scan(raw)
        if found is None:
            return None
        kept = head.kept  # (the last full decode's: read here, never changed)
        token = kept.get(_TOKEN)
        service = self._service
        if token is None or service._reads_block:
            return None
        rid, value = found
        op = ep.op
        try:
            claims = self._token_claims(token, ident)
            v = service._key(claims, kept["key"], kept["mechanism"], op, None)
        except Exception:  # the full path decides it again and words the refusal
            return None
        if v.offload:
            return None
        _REQUEST_ID.set(rid)
        state = v.direct
        if type(state) is HmacState:
            if op == "sign":
                return mac_answer(state, value, _SIGN_HEAD, _B64_END)
            if op == "verify":
                return VERIFIED_BODY if mac_equals(state, value[0], value[1]) else None
        body = {k: x for k, x in kept.items() if k != _TOKEN}
        fastjson.put(body, head.names, value)
        try:
            return v.answer(v.work(v.mech, v.key, body))
        except Exception:
            return None

    def batch(self, ident: Identity, raw: bytes) -> bytes | None:
        """The batch endpoint's answer to raw from identity ident (200), or None: the full
        path's to answer."""
        found = fastjson.one_run(raw)
        if found is None:
            return None
        rid, (op, token, request, names, values) = found
        service = self._service
        if op not in self._ops or service._reads_block or names is None or values is None:
            return None
        if len(values) > self._max_items or _RID in request:  # (an item's own request id)
            return None
        if token is None:  # the module's spelling: the token in each item's request
            token = request.get(_TOKEN)
            if token is None:
                return None
        elif _TOKEN in request:  # given twice: the full path's to refuse
            return None
        try:
            claims = self._token_claims(token, ident)
            v = service._key(claims, request["key"], request["mechanism"], op, None)
        except Exception:  # the full path decides it again and words the refusal
            return None
        state = v.direct
        if v.offload or not v.until or type(state) is not HmacState:
            return None
        parts: list[bytes] = []
        if op in B64_ANSWERS and names == RUN_DATA:
            head = ITEM_OK + B64_ANSWERS[op]
            done = mac_run(state, values, 0, v.until, head, ITEM_B64_END, parts)
        elif op == "verify" and names == RUN_DATA_AND_MAC:
            done = verify_run(state, values, 0, v.until, ITEM_VERIFIED, parts)
        else:
            return None
        if done != len(values):
            return None
        if rid is not None:
            _REQUEST_ID.set(rid)
        return b'{"results":[' + b",".join(parts) + b"]}"
