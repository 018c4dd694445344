"""Slot IDs used before C_GetSlotList in a fresh process (a host that remembered a slot ID, as
ckinfo-style tools and some configurations do): the module looks at the service once instead
of answering CKR_SLOT_ID_INVALID for a softcard it simply has not listed yet."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config

SCRIPT = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[2])
from tests.support.p11ctypes import Module, CK_TOKEN_INFO, CK_SLOT_INFO, text
from pkcs11ws import constants as C
mod = Module(sys.argv[1])
mod.initialize()
info = CK_TOKEN_INFO()
print("token", mod.call("C_GetTokenInfo", ctypes.c_ulong(1), ctypes.byref(info)), text(info.label))
sinfo = CK_SLOT_INFO()
print("slot", mod.call("C_GetSlotInfo", ctypes.c_ulong(1), ctypes.byref(sinfo)))
count = ctypes.c_ulong(0)
print("mechs", mod.call("C_GetMechanismList", ctypes.c_ulong(1), None, ctypes.byref(count)))
print("bad", mod.call("C_GetTokenInfo", ctypes.c_ulong(999999), ctypes.byref(info)))
"""


def test_slot_ids_work_before_get_slot_list(service):
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    try:
        client.create_softcard("s" + uuid.uuid4().hex[:10], b"pass-word")
    finally:
        client.close()
    env = {**os.environ, "PKCS11WS_CONFIG": str(service.client_cfg)}
    root = str(Path(__file__).resolve().parents[2])  # the tests package is imported from here
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, module_path(), root],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["token"].startswith("0 "), r.stdout
    assert lines["slot"] == "0" and lines["mechs"] == "0", r.stdout
    assert lines["bad"] == str(0x3), r.stdout  # CKR_SLOT_ID_INVALID
