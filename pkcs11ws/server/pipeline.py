"""What every request passes through between routing and its handler: who is calling (identity),
may they (authorization by protocol.ACCESS), and what is written to the audit trail.

- Identity: the connection's Peer (put in the scope by server/peer.py) resolved against the
  clients file once per connection, again after a reload. No identity: CLIENT_NOT_AUTHORIZED.
- Authorization: the endpoint's `access` (protocol.ACCESS). "card" and "owner" endpoints load the
  softcard here and hand it to the handler; a softcard the identity may not see answers exactly
  as a missing one. "token" endpoints are checked in Service.authenticate: the token names the
  identity it was issued to, and only that identity's connections may use it.
- Audit: every refused request and every successful state change (protocol Endpoint.changes)
  becomes one line through audit.record.

The request and response types the handlers use live here too. This module never imports a
handler.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pkcs11ws import protocol
from pkcs11ws._lite import dataclass
from pkcs11ws.protocol import STRUCTS, Endpoint
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import audit
from pkcs11ws.server.identity import Clients, Identity, Peer
from pkcs11ws.server.peer import PEER_KEY
from pkcs11ws.server.sealing import TokenClaims
from pkcs11ws.server.store import CardRow, ReadTx


@dataclass(frozen=True)
class Idem:
    key: str
    fingerprint: bytes


class Response:
    """A status and a JSON body (a plain slotted class: built once per request, kept cheap)."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


class Request:
    __slots__ = ("body", "card", "claims", "ep", "idem", "ident", "params", "query")

    def __init__(
        self,
        ep: Endpoint,
        params: dict[str, str],
        query: dict[str, str],
        body: dict[str, Any],
        claims: TokenClaims | None,
        idem: Idem | None,
        ident: Identity,
        card: CardRow | None = None,
    ) -> None:
        self.ep = ep
        self.params = params
        self.query = query
        self.body = body
        self.claims = claims
        self.idem = idem
        self.ident = ident
        self.card = card  # loaded and authorized by the pipeline for "card"/"owner" endpoints


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def ok(struct: str, values: dict[str, Any], status: int = 200) -> Response:
    return Response(status, dumps(protocol.encode(STRUCTS[struct], values)))


def not_found() -> ApiError:
    # One message for "missing" and "not yours": the two must be indistinguishable.
    return ApiError("SOFTCARD_NOT_FOUND", "no softcard with that ID")


# ------------------------------------------------------------------------------ identity

_NO_PEER: Final = Peer(None)


def identify(clients: Clients, scope: dict[str, Any]) -> tuple[Identity | None, Peer]:
    """The caller's identity: cached on the connection until the clients file is reloaded."""
    state = scope.get("state")
    peer: Peer = state.get(PEER_KEY, _NO_PEER) if state is not None else _NO_PEER
    if peer.generation == clients.generation:
        return peer.identity, peer
    if peer is _NO_PEER:
        return None, peer
    return clients.identify(peer), peer


def refuse_unknown(peer: Peer) -> ApiError:
    audit.record(op="request", client=None, outcome="refused", code="CLIENT_NOT_AUTHORIZED",
                 fingerprint=peer.fingerprint or None)  # fmt: skip
    why = {"revoked": "was revoked", "no certificate": "is missing"}.get(
        peer.refusal, "is not listed in the service's clients file"
    )
    return ApiError("CLIENT_NOT_AUTHORIZED", f"the client certificate {why}")


# ------------------------------------------------------------------------------ authorization


# The accesses whose softcard authorize loads (the others need no store read here).
CARD_ACCESS: Final = frozenset({"card", "owner"})


def sees(r: ReadTx, ident: Identity, card: CardRow) -> bool:
    """May this identity see (and so activate and use) the softcard?"""
    if ident.admin or card.owner == ident.name:
        return True
    return r.grant_exists(card.id, ident.name)


def authorize(r: ReadTx, ep: Endpoint, ident: Identity, params: dict[str, str]) -> CardRow | None:
    """Enforce protocol.ACCESS for the "card" and "owner" endpoints; returns their softcard.
    Reads only: a grant withdrawn a moment later also ends the sessions it allowed."""
    access = ep.access
    if access not in CARD_ACCESS:
        return None
    card = r.card_get(params["card"])
    if card is None:
        if not ident.admin:
            # The same store queries as for someone else's softcard, so that the time of the
            # answer does not tell "missing" from "not yours" either.
            r.grant_exists(params["card"], ident.name)
        raise not_found()
    if not sees(r, ident, card):
        raise not_found()
    if access == "owner" and not (ident.admin or card.owner == ident.name):
        raise ApiError("FORBIDDEN", "only the softcard's owner or an admin may do this")
    return card


def check_token(claims: TokenClaims, ident: Identity) -> None:
    if claims.client != ident.name:
        # The same answer as a forged token: it tells the caller nothing about the softcard.
        raise ApiError("NOT_ACTIVATED", "the activation token is not valid")


# ------------------------------------------------------------------------------ audit


def audit_outcome(
    ep: Endpoint | None,
    ident: Identity | None,
    params: dict[str, str],
    body: dict[str, Any] | None,
    status: int,
    code: str | None,
    resp_body: bytes,
) -> None:
    """One audit line for a refused request or a successful change; nothing for a good read."""
    if status < 400 and (ep is None or not ep.changes):
        return
    handle = params.get("handle")
    if handle is None and body is not None:
        key = body.get("key")
        handle = key if isinstance(key, str) else None
    if handle is None and status < 300 and ep is not None and ep.response == "Object":
        handle = json.loads(resp_body).get("handle")
    card = params.get("card")
    if card is None and status < 300 and ep is not None and ep.response == "Softcard":
        card = json.loads(resp_body).get("id")
    audit.record(
        op=ep.op if ep is not None else "request",
        client=ident.name if ident is not None else None,
        card=card,
        handle=handle,
        outcome="ok" if status < 400 else ("failed" if status >= 500 else "refused"),
        code=code,
        target=params.get("client"),
    )
