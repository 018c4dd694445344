"""Issue 16, transport side: curl handles outlive the host threads that used them.

A Python host (python-pkcs11 with `threading`, in its own process) starts 500 short-lived
threads, at most 4 at a time; each opens a session, finds the HMAC key, signs once and ends.
Handles are pooled per server, so a new thread takes an idle, connected handle: the module makes
only a handful of TLS connections (libcurl's CURLINFO_NUM_CONNECTS, summed by the transport),
where a handle per thread made one per thread. The real key service, over real mutual TLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws.client import KeyServiceClient
from pkcs11ws.config import load_config
from pkcs11ws.protocol import Attrs

HOST = r"""
import hashlib, hmac, json, os, sys, threading
import pkcs11
from pkcs11 import Mechanism

lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
login = token.open(user_pin=os.environ["TEST_PIN"])  # logs the application in
value = bytes.fromhex(sys.argv[3])
errors = []
gate = threading.Semaphore(4)


def one(i):
    try:
        with token.open() as s:
            key = s.get_key(label="churn")
            data = b"thread %d" % i
            if key.sign(data, mechanism=Mechanism.SHA256_HMAC) != hmac.new(
                    value, data, hashlib.sha256).digest():
                errors.append("wrong MAC")
    except BaseException as e:
        errors.append(repr(e))
    finally:
        gate.release()


threads = []
for i in range(500):
    gate.acquire()
    t = threading.Thread(target=one, args=(i,))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
from pkcs11ws._native import core  # the module runs in this interpreter: its provider

client = core.current_provider().client
out = {"errors": errors[:5], "n_errors": len(errors), **client.stats(),
       "handles": client.transport.handles()}
login.close()
print(json.dumps(out))
"""


def test_500_python_threads_open_a_handful_of_connections(service, tmp_path) -> None:
    setup = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "churn" + uuid.uuid4().hex[:10]
    pin = uuid.uuid4().hex
    value = os.urandom(32)
    card = setup.create_softcard(name, pin.encode())
    token, _ = setup.activate(card["id"], pin.encode())
    attrs: Attrs = {
        "CKA_CLASS": C.CKO_SECRET_KEY,
        "CKA_KEY_TYPE": C.CKK_SHA256_HMAC,
        "CKA_VALUE": value,
        "CKA_LABEL": b"churn",
        "CKA_SIGN": True,
        "CKA_TOKEN": True,
        "CKA_PRIVATE": True,
    }
    setup.create_object(card["id"], token, attrs)
    setup.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKCS11WS_")}
    env.update(
        PKCS11WS_CONFIG=str(service.client_cfg),
        TEST_PIN=pin,
        PKCS11WS_LOGFILEPATH=str(tmp_path / "module.log"),
    )
    r = subprocess.run(
        [sys.executable, "-c", HOST, module_path(), name, value.hex()],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_errors"] == 0, out["errors"]
    # Each thread: a search and a sign (signs of concurrent threads may share a batch request).
    assert out["requests"] >= 500
    assert out["failures"] == 0
    # At most one handle per request in flight (4 threads, and the main thread's login), and
    # each handle connected once: not one connection per thread.
    assert out["handles"] <= 6, out
    assert out["connects"] <= 6, out
