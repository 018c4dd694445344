"""A single keyed crypto request's direct path (sign, verify, encrypt, decrypt in the module's
spelling): SinglePath.answer(identity, endpoint, authorization, body) -> answer bytes, or None
for the full path.

The module sends each single request as its request id, then its token, key and mechanism,
then its data (fastjson.RidFirst): a body whose bytes from the end of the request id up to its
trailing values repeat the last body decoded in full has that body's token, key and mechanism
(RidFirst.kept), so only the request id and the trailing values are read (in C), and no dict is
made for the request. The checks are the full path's (App._body_claims, then
CryptoHandlers.crypto_now), in their order and by the same calls: the request id (one of
protocol.REQUEST_ID_RE's), the token's claims (App._token_claims: identity binding, expiry),
then the verdict (CryptoHandlers._key: live session, mechanism, key, type, usage, with its cache
and the store's change mark). An HMAC sign or verify with a full-length mechanism is then
answered from the key's prepared state in C (the MAC's base64 into the answer; a verify's MAC
compared in constant time); another operation runs its family's function on a body made as the
full path makes it. Anything else (an Authorization header, a store whose reads block, another
spelling, a refusal, a wrong MAC, offloaded work) returns None: the full path then decides and
answers it, with its audit line, as it does every request.

A plain function of its arguments (no ASGI scope, no coroutine): the app's request entry calls
it wherever it has the identity, the Authorization header and the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pkcs11ws import protocol
from pkcs11ws.protocol import Endpoint
from pkcs11ws.server import audit, fastjson
from pkcs11ws.server._hot import HmacState, mac_answer, mac_equals
from pkcs11ws.server.handlers_crypto import B64_ANSWERS, VERIFIED_BODY
from pkcs11ws.server.identity import Identity

if TYPE_CHECKING:
    from pkcs11ws.server.handlers import Service
    from pkcs11ws.server.sealing import TokenClaims

_TOKEN: Final = protocol.TOKEN_FIELD
_SIGN_HEAD: Final = B64_ANSWERS["sign"]
_B64_END: Final = b'"}'  # a B64_ANSWERS answer's end
_REQUEST_ID: Final = audit.REQUEST_ID


class SinglePath:
    """The direct path of the keyed ops (ops: App's _KEYED_OPS) on one app's service."""

    def __init__(
        self,
        service: Service,
        token_claims: Callable[[Any, Identity], TokenClaims],
        ops: frozenset[str],
    ) -> None:
        self._service = service
        self._token_claims = token_claims
        self._heads: dict[str, fastjson.RidFirst] = {}
        for op in ops:
            found = fastjson.decoder(protocol.ENDPOINT_BY_OP[op].request)
            if isinstance(found, fastjson.RidFirst):
                self._heads[op] = found

    def answer(
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
