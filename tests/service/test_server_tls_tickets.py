"""TLS 1.3 session tickets of the key service, over real mutual TLS.

The service writes ONE session ticket per full handshake (server/cli.py tls_context: each
stateless ticket re-decodes the session with the client certificate in it, and a client that
asks once and exits never uses it). A client that reconnects must still resume with it, and a
resumed connection is still the certificate's identity (the session carries the certificate).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

NEW_SESSION_TICKET = 4  # TLS handshake message type


def _ctx(svc: Any, tickets: list[int]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(svc.ca))
    ctx.load_cert_chain(str(svc.cert), str(svc.key))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    # CPython's TLS message hook (the one `ssl` uses for its debug traces): counts the
    # NewSessionTicket messages this client receives.
    def seen(
        conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: Any
    ) -> None:
        if direction == "read" and content_type == 22 and msg_type == NEW_SESSION_TICKET:
            tickets.append(1)

    ctx._msg_callback = seen  # type: ignore[attr-defined]
    return ctx


def _get(
    ctx: ssl.SSLContext, port: int, path: str, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data, s


def test_one_ticket_per_handshake_and_reconnects_resume_as_the_same_identity(service):
    tickets: list[int] = []
    ctx = _ctx(service, tickets)
    answer, first = _get(ctx, service.port, "/km/v1/softcards")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert not first.session_reused
    assert len(tickets) == 1  # OpenSSL's default would be two
    session = first.session
    assert session is not None and session.has_ticket
    first.close()

    answer, again = _get(ctx, service.port, "/km/v1/softcards", session=session)
    assert again.session_reused  # the one ticket is enough to resume
    # The resumed connection is still the admin certificate's identity: same listing answer.
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    again.close()


def _certificate_entries(message: bytes) -> list[bytes]:
    """The DER certificates of a TLS 1.3 Certificate handshake message (RFC 8446 4.4.2)."""
    body = message[4:]  # type (1), length (3)
    ctx_len = body[0]
    rest = body[1 + ctx_len :]
    total = int.from_bytes(rest[:3], "big")
    rest = rest[3 : 3 + total]
    out = []
    while rest:
        n = int.from_bytes(rest[:3], "big")
        out.append(rest[3 : 3 + n])
        ext = int.from_bytes(rest[3 + n : 5 + n], "big")
        rest = rest[5 + n + ext :]
    return out


def test_the_service_sends_its_certificate_and_the_root_that_issued_it(service):
    """The chain is loaded once at start (server/cli.py _load_cert_chain) instead of being
    built at every handshake; what a client receives stays the certificate and our CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    received: list[bytes] = []
    ctx = ssl.create_default_context(cafile=str(service.ca))
    ctx.load_cert_chain(str(service.cert), str(service.key))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def seen(conn: Any, direction: str, version: Any, ctype: Any, mtype: Any, data: Any) -> None:
        if direction == "read" and ctype == 22 and mtype == 11:  # Certificate
            received.append(bytes(data))

    ctx._msg_callback = seen  # type: ignore[attr-defined]
    answer, s = _get(ctx, service.port, "/health")
    assert answer.startswith(b"HTTP/1.1 200")
    leaf = s.getpeercert(binary_form=True)
    s.close()
    assert len(received) == 1
    chain = _certificate_entries(received[0])
    ca = x509.load_pem_x509_certificate(service.ca.read_bytes()).public_bytes(Encoding.DER)
    assert chain == [leaf, ca]
