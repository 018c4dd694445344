"""What `pkcs11-tool -L` makes the module do (C_Initialize, C_GetSlotList, C_Finalize) imports
nothing it does not need, against the real key service (start-up time and RSS, issue 15: each
needless import costs milliseconds and memory of every process that loads the module).
tests/unit/test_startup_imports.py checks the import path itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.support.service import Service

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("dataclasses", "inspect", "ast", "dis", "typing", "contextlib", "pycurl.async_multi")

# Not needed to list slots: the public-key code (cryptography), the group commit's batch path
# (only its queue is made), ctypes (the log finds its library name through the core), socket
# (C_Finalize with no call in progress shuts down no socket), the uuid module, datetime.py and
# importlib (pycurl loads without them: pkcs11ws/client/_curl_boot.py). (hashlib may come: a
# softcard of the shared service with a name over 32 characters needs it for its label.)
LIST_SLOTS_NEVER = ("cryptography", "pkcs11ws.pubkey", "ctypes", "socket", "selectors", "uuid",
                    "urllib", "traceback", "datetime", "importlib", "warnings", *HEAVY)  # fmt: skip


def test_listing_slots_imports_only_what_it_needs(service: Service) -> None:
    # What pkcs11-tool -L makes the module do, with the log on (DEBUG1 names its library), in a
    # fresh interpreter booted as the loader boots it (no site: only what the module imports).
    code = (
        "import sys, json\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "from pkcs11ws._native import core\n"
        "from pkcs11ws.provider import Provider\n"
        f"p = Provider({str(service.client_cfg)!r}, core)\n"
        "p.refresh_slots()\n"
        "p.finalize()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PKCS11WS_LOGLEVEL": "4"}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout  # fmt: skip
    mods = json.loads(out)
    assert "pycurl._pycurl" in mods and "pkcs11ws.client.group" in mods
    leaked = [m for m in mods if m.split(".")[0] in LIST_SLOTS_NEVER or m in LIST_SLOTS_NEVER]
    assert leaked == []
