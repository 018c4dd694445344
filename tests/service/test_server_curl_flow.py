"""The foundation issue's walk-through with nothing but curl and the client certificate.

Create a softcard, activate it, generate an AES key and an HMAC key, encrypt/decrypt and
sign/verify: the service is usable by any HTTPS client that holds a certificate from its CA.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Curl:
    def __init__(self, service: Any) -> None:
        self.base = f"https://127.0.0.1:{service.port}"
        self.argv = [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(service.ca),
            "--cert",
            str(service.cert),
            "--key",
            str(service.key),
        ]

    def __call__(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        idem: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        argv = [*self.argv, "-X", method, "-w", "\n%{http_code}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        if token:
            argv += ["-H", f"Authorization: Bearer {token}"]
        if idem:
            argv += ["-H", f"Idempotency-Key: curl-{uuid.uuid4().hex}"]
        res = subprocess.run(
            [*argv, self.base + path], capture_output=True, text=True, timeout=30, check=False
        )
        assert res.returncode == 0, res.stderr
        out, code = res.stdout.rsplit("\n", 1)
        return int(code), json.loads(out)


def test_curl_walkthrough(service: Any) -> None:
    curl = Curl(service)
    name = "curlflow" + uuid.uuid4().hex[:8]
    status, card = curl(
        "POST", "/km/v1/softcards", {"name": name, "passphrase": _b64(b"curl pass")}, idem=True
    )
    assert status == 200, card
    status, act = curl(
        "POST", f"/km/v1/softcards/{card['id']}/activate", {"passphrase": _b64(b"curl pass")}
    )
    assert status == 200, act
    token = act["token"]
    common = {"CKA_CLASS": 4, "CKA_TOKEN": True, "CKA_PRIVATE": True}
    status, aes = curl(
        "POST",
        f"/km/v1/softcards/{card['id']}/keys/generate",
        {
            "mechanism": "CKM_AES_KEY_GEN",
            "attrs": {
                **common,
                "CKA_KEY_TYPE": 0x1F,
                "CKA_VALUE_LEN": 32,
                "CKA_LABEL": _b64(b"curl-aes"),
            },
        },
        token=token,
        idem=True,
    )
    assert status == 200, aes
    assert "CKA_VALUE" not in aes["attrs"]
    status, mac = curl(
        "POST",
        f"/km/v1/softcards/{card['id']}/keys/generate",
        {
            "mechanism": "CKM_SHA256_KEY_GEN",
            "attrs": {
                **common,
                "CKA_KEY_TYPE": 0x2B,
                "CKA_VALUE_LEN": 32,
                "CKA_LABEL": _b64(b"curl-hmac"),
            },
        },
        token=token,
        idem=True,
    )
    assert status == 200, mac

    iv, msg = bytes(range(16)), b"seventeen bytes!!"
    status, ct = curl(
        "POST",
        "/crypto/v1/encrypt",
        {"key": aes["handle"], "mechanism": "CKM_AES_CBC_PAD", "iv": _b64(iv), "data": _b64(msg)},
        token=token,
    )
    assert status == 200, ct
    assert len(base64.b64decode(ct["data"])) == 32
    status, pt = curl(
        "POST",
        "/crypto/v1/decrypt",
        {"key": aes["handle"], "mechanism": "CKM_AES_CBC_PAD", "iv": _b64(iv), "data": ct["data"]},
        token=token,
    )
    assert status == 200, pt
    assert base64.b64decode(pt["data"]) == msg

    status, sig = curl(
        "POST",
        "/crypto/v1/sign",
        {"key": mac["handle"], "mechanism": "CKM_SHA256_HMAC", "data": _b64(msg)},
        token=token,
    )
    assert status == 200, sig
    status, ver = curl(
        "POST",
        "/crypto/v1/verify",
        {
            "key": mac["handle"],
            "mechanism": "CKM_SHA256_HMAC",
            "data": _b64(msg),
            "signature": sig["signature"],
        },
        token=token,
    )
    assert (status, ver) == (200, {"valid": True})
    bad = _b64(bytes(32))
    status, err = curl(
        "POST",
        "/crypto/v1/verify",
        {"key": mac["handle"], "mechanism": "CKM_SHA256_HMAC", "data": _b64(msg), "signature": bad},
        token=token,
    )
    assert (status, err["code"]) == (422, "SIGNATURE_INVALID")
    # The AES key may not sign: usage and key type are enforced.
    status, err = curl(
        "POST",
        "/crypto/v1/sign",
        {"key": aes["handle"], "mechanism": "CKM_SHA256_HMAC", "data": _b64(msg)},
        token=token,
    )
    assert status >= 400 and err["code"] in ("KEY_TYPE_INCONSISTENT", "KEY_FUNCTION_NOT_PERMITTED")
