"""`pkcs11-tool -L` (the start-up the benchmark times, issue 15) against the real key service:
the slot list and every token's information come from one request, and with the service down it
fails the same way, at once, whatever the start-up path does early.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.pkcs11tool import Pkcs11Tool
from tests.support.service import Service

LIST = "GET /km/v1/softcards 200"


def _settled(svc: Service, at_least: int) -> int:
    """The service's access-log line count, once it holds at_least lines and has stopped
    growing (each line is written just after its answer is sent)."""
    deadline = time.monotonic() + 30
    last = -1
    while time.monotonic() < deadline:
        n = len([ln for ln in svc.log_text().splitlines() if "pkcs11ws.server.access" in ln])
        if n >= at_least and n == last:
            return n
        last = n
        time.sleep(0.3)
    return last


def test_listing_is_one_request(fresh_service, tmp_path: Path) -> None:
    svc: Service = fresh_service()
    client = KeyServiceClient(load_config(str(svc.client_cfg)))
    names = []
    try:
        for _ in range(3):
            names.append("l" + uuid.uuid4().hex[:12])
            client.create_softcard(names[-1], uuid.uuid4().hex.encode())
    finally:
        client.close()
    before = _settled(svc, 3)
    lists = svc.served(LIST)
    tool = Pkcs11Tool(svc.client_cfg, names[0], "unused")
    out = tool.run("-L", login=False, token=False).stdout
    for name in names:
        assert f"token label        : {name}" in out
    assert out.count("token flags        : login required, rng, token initialized") == 3
    # Slots, token information and PIN flags: all from the one softcard list.
    assert _settled(svc, before + 1) == before + 1
    assert svc.served(LIST) == lists + 1


def test_listing_with_the_service_down(fresh_service) -> None:
    svc: Service = fresh_service()
    svc.stop()
    tool = Pkcs11Tool(svc.client_cfg, "none", "unused")
    env = {**tool.env, "PKCS11WS_MAXRETRIES": "0"}
    r = tool.run("-L", login=False, token=False, ok=False, env=env)
    assert r.returncode == 1
    assert "C_GetSlotList(NULL) failed: rv = CKR_DEVICE_ERROR (0x30)" in r.stdout + r.stderr
    assert "Available slots" not in r.stdout
