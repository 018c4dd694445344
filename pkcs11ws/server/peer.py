"""How the ASGI app sees the client certificate under uvicorn, and refused handshakes.

uvicorn puts no TLS information in the ASGI scope. Its HTTP protocol object lives as long as the
connection, and every request's scope gets `"state": self.app_state.copy()`. So the protocol
subclass here, in connection_made (once per connection, after the handshake), takes the peer's
certificate from the transport's SSL object and puts a Peer into its own copy of app_state: every
request of that connection then finds it at scope["state"][PEER_KEY] through the copy uvicorn
makes anyway, at no extra cost per request (bench: see the report of issue 9).

Refused handshakes never reach a protocol object (asyncio and uvloop drop them silently unless
the loop runs in debug mode), so the TLS context's SSL object class is replaced by one whose
do_handshake() writes an audit line when OpenSSL refuses the peer.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

from pkcs11ws.server import audit
from pkcs11ws.server.conn import GuardedHttpToolsProtocol
from pkcs11ws.server.identity import Peer

PEER_KEY: Final = "pkcs11ws.peer"


def peer_of(transport: Any) -> Peer:
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return Peer(der)


class _PeerMixin:
    app_state: dict[str, Any]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.app_state = {**self.app_state, PEER_KEY: peer_of(transport)}


class GuardedPeerProtocol(_PeerMixin, GuardedHttpToolsProtocol):
    """The connection limits of conn.py, plus the peer certificate in each request's scope."""


PROTOCOL: Final[type] = GuardedPeerProtocol


class AuditedSSLObject(ssl.SSLObject):
    """Writes an audit line for each handshake OpenSSL refuses (unknown CA, no certificate...)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            audit.record(
                op="tls_handshake",
                client=None,
                outcome="refused",
                code=exc.reason or type(exc).__name__,
            )
            raise


def audit_handshakes(ctx: ssl.SSLContext) -> None:
    ctx.sslobject_class = AuditedSSLObject
