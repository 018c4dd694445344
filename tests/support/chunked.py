"""A POST whose body arrives in pieces (chunked, sent apart), so the service's app receives it in
several messages rather than one."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from typing import Any

from tests.support.service import Api, Service


def post_in_pieces(svc: Service, api: Api, path: str, pieces: list[bytes]) -> tuple[int, Any]:
    """(status, parsed JSON answer) of POST path with pieces as its chunked body."""
    conn = http.client.HTTPSConnection("127.0.0.1", svc.port, context=api.ctx, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        with contextlib.suppress(OSError):  # (a refusal may come, and close, before the end)
            for piece in pieces:
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                time.sleep(0.05)
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()
