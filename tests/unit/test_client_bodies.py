"""The request bodies the protocol client writes for the crypto operations are in the spelling
the service's fast decoder (server/fastjson.py) takes: same fields, protocol order, compact. A
body off that path is still served (the generic strict decoder), only slower, so nothing else
would notice a client that drifts from the schema's field order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import protocol
from pkcs11ws.client import KeyServiceClient
from pkcs11ws.log import Logger
from pkcs11ws.server import fastjson
from tests.support.configs import make_cfg

KEY = "0f8e3c9a-1111-2222-3333-444455556666"


class Recorder:
    """A transport that records each request and gives the scripted answer."""

    base_url = "https://localhost:18001"

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sent: list[tuple[str, bytes]] = []

    def request(
        self, method: str, path: str, body: bytes | None, headers: Any, deadline: float = 0.0
    ) -> tuple[int, bytes]:
        self.sent.append((path, body or b""))
        return 200, self.answer

    def pause(self, seconds: float) -> None:
        pass


def client(tmp_path: Path, answer: dict[str, Any]) -> tuple[KeyServiceClient, Recorder]:
    cfg = make_cfg(tmp_path, host="localhost")
    t = Recorder(json.dumps(answer, separators=(",", ":")).encode())
    return KeyServiceClient(cfg, Logger(), transport=t), t  # type: ignore[arg-type]


SIG = {"signature": "AAECAwQFBgcICQoLDA0ODw=="}
OUT = {"data": "AAECAwQFBgcICQoLDA0ODw==", "last_block": "AAECAwQFBgcICQoLDA0ODw=="}
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("sign", "CKM_SHA256_HMAC", {}, SIG),
    ("sign", "CKM_SHA256_HMAC_GENERAL", {"mac_length": 16}, SIG),
    ("sign", "CKM_RSA_PKCS_PSS", {"params": {"hash": "sha256", "mgf": "sha256",
                                             "salt_length": 32}}, SIG),
    ("verify", "CKM_SHA256_HMAC", {"signature": bytes(32)}, {"valid": True}),
    ("encrypt", "CKM_AES_CBC", {"iv": bytes(16)}, OUT),
    ("decrypt", "CKM_AES_CBC_PAD", {"iv": bytes(16)}, OUT),
    ("encrypt", "CKM_AES_GCM", {"iv": bytes(12), "params": {"aad": b"hdr", "tag_bits": 128}},
     OUT),
    ("decrypt", "CKM_RSA_PKCS_OAEP", {"params": {"hash": "sha256", "mgf": "sha256"}}, OUT),
]  # fmt: skip


@pytest.mark.parametrize(
    ("op", "mech", "kw", "answer"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_crypto_bodies_take_the_fast_decoder(
    tmp_path: Path, op: str, mech: str, kw: dict[str, Any], answer: dict[str, Any]
) -> None:
    cl, t = client(tmp_path, answer)
    data = b"\x01" * 64
    if op in ("encrypt", "decrypt"):
        getattr(cl, op)("tok", KEY, mech, kw.get("iv"), data, kw.get("params"))
    else:
        getattr(cl, op)("tok", KEY, mech, data, **kw)
    assert t.sent, "no request was sent"
    path, body = t.sent[-1]
    assert path == next(e for e in protocol.ENDPOINTS if e.op == op).path
    struct = protocol.STRUCTS[next(e for e in protocol.ENDPOINTS if e.op == op).request]
    fast = fastjson.decoder(struct.name)
    assert fast is not None
    got = fast(body)
    assert got is not None, f"{op} body is off the fast path: {body[:160]!r}"
    assert got == protocol.decode(struct, json.loads(body))
