"""The floor for the key service: a minimal ASGI handler on the same server stack (uvicorn,
httptools, uvloop) with the same TLS context (TLS 1.2+, client certificate required, the
service's PKI) that does only the HMAC: it reads the body and answers {"signature": base64 of
HMAC-SHA256(body)}. No routing, no JSON parsing, no store, no access log.

Run: python -m bench.floor_app --port N --cert server.pem --key server.key --ca ca.pem
"""

from __future__ import annotations

import argparse
import binascii
import hmac
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]

_KEY = os.urandom(32)
_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    mac = hmac.digest(_KEY, b"".join(chunks), "sha256")
    body = b'{"signature":"' + binascii.b2a_base64(mac, newline=False) + b'"}'
    headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    from pkcs11ws.server.cli import LOOP_FACTORY, tls_context

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    a = ap.parse_args()
    # The key service's own settings (pkcs11ws/server/cli.py), minus its app.
    uvicorn.run(
        app,
        host=a.host,
        port=a.port,
        ssl_certfile=a.cert,
        ssl_keyfile=a.key,
        ssl_ca_certs=a.ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        ssl_context_factory=tls_context,
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
        loop=LOOP_FACTORY,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
