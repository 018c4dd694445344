"""The module rides out a key service restart and network trouble (WSOP MAXRETRIES/RETRYDELAY).

One process, one C_Initialize, logged in (libpkcs11ws.so via ctypes, in this process), with
RETRYDELAY 1 and MAXRETRIES 10, while the real key service is stopped (SIGTERM by PID) and
started again on the same port with the same directory:

- between calls: the session, the login and the handles keep working, without a new login;
- during a call: C_GenerateKey issued while the service is down completes once it is back, and
  makes exactly one key (counted on the service);
- a first attempt that reached the service but whose answer was lost (a TCP relay between module
  and service drops that answer and then refuses connections while the service restarts): the
  retry carries the same Idempotency-Key, so the service makes exactly one key;
- down for good: the call returns CKR_DEVICE_ERROR after the retries and the log says why.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from ctypes import byref

from pkcs11ws import constants as C
from tests.support.fault_util import Relay, object_count, restart, setup_card, write_cfg
from tests.support.p11ctypes import CK_ULONG, Module, mechanism

KEY_BASE = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]
AES_GEN = [
    *KEY_BASE,
    (C.CKA_CLASS, C.CKO_SECRET_KEY),
    (C.CKA_VALUE_LEN, 16),
    (C.CKA_ENCRYPT, True),
    (C.CKA_DECRYPT, True),
]


def sign(bare_mod: Module, h: int, key: int, data: bytes) -> bytes:
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    bare_mod.ok("C_SignInit", h, byref(m), key)
    return bare_mod.single("C_Sign", h, data)


def test_service_restart_between_and_during_calls(bare_mod, fresh_service, restarted, tmp_path):
    svc = fresh_service()
    log = tmp_path / "module.log"
    cfg = write_cfg(
        svc,
        tmp_path / "p11.cfg",
        maxretries="10",
        retrydelay="1",
        loglevel="3",
        logfilepath=str(log),
    )
    h, card = setup_card(svc, bare_mod, cfg)
    key = bare_mod.create(
        h,
        [
            *KEY_BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC),
            (C.CKA_SIGN, True),
            (C.CKA_VALUE, b"k" * 32),
        ],
    )
    aes = bare_mod.generate(h, C.CKM_AES_KEY_GEN, AES_GEN)
    mac = sign(bare_mod, h, key, b"before")
    objects = sorted(bare_mod.find(h, []))
    assert len(objects) == 2 == object_count(svc, card)

    # Between calls: same session, same login, same handles.
    svc = restart(svc, restarted)
    assert sign(bare_mod, h, key, b"before") == mac
    assert sorted(bare_mod.find(h, [])) == objects

    # During a call: the service is down when C_GenerateKey starts and back a moment later.
    svc.stop()
    result: dict[str, object] = {}

    def generate() -> None:
        try:
            result["key"] = bare_mod.generate(h, C.CKM_AES_KEY_GEN, AES_GEN)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=generate)
    t.start()
    time.sleep(1.5)  # at least one failed attempt and one retry
    svc = restart(svc, restarted, stop=False)
    t.join(30)
    assert not t.is_alive() and "error" not in result, result
    new_key = result["key"]
    assert object_count(svc, card) == 3
    assert sorted(bare_mod.find(h, [])) == sorted([*objects, new_key])
    iv = os.urandom(16)
    m, _buf = mechanism(C.CKM_AES_CBC, iv)
    for k in (aes, new_key):
        bare_mod.ok("C_EncryptInit", h, byref(m), k)
        assert len(bare_mod.single("C_Encrypt", h, bytes(32))) == 32
    text = log.read_text()
    assert "retry 1/10 in 1s" in text and "Couldn't connect to server" in text


def test_lost_answer_and_restart_make_one_object(bare_mod, fresh_service, restarted, tmp_path):
    svc = fresh_service()
    relay = Relay(svc.port)
    try:
        log = tmp_path / "module.log"
        cfg = write_cfg(
            svc,
            tmp_path / "relay.cfg",
            port=str(relay.port),
            maxretries="10",
            retrydelay="1",
            loglevel="3",
            logfilepath=str(log),
        )
        h, card = setup_card(svc, bare_mod, cfg)
        bare_mod.generate(h, C.CKM_AES_KEY_GEN, AES_GEN)
        assert object_count(svc, card) == 1

        # The service makes the key but its answer is lost; the network stays down while the
        # service restarts; the module's retries then reach the restarted service. The call
        # runs on this thread, whose kept-alive connection carries the request.
        def outage() -> None:
            if not relay.dropped.wait(15):
                return
            restart(svc, restarted)
            deadline = time.monotonic() + 10
            while relay.refused == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # a retry met the outage
            relay.accept()

        helper = threading.Thread(target=outage)
        helper.start()
        relay.drop_next_answer()
        try:
            key = bare_mod.generate(h, C.CKM_AES_KEY_GEN, AES_GEN)
        finally:
            helper.join(30)
        assert relay.dropped.is_set() and relay.refused >= 1 and len(restarted) == 1
        svc = restarted[0]
        assert object_count(svc, card) == 2  # not 3: the retry did not make a second key
        assert len(bare_mod.find(h, [])) == 2
        m, _buf = mechanism(C.CKM_AES_CBC, bytes(16))
        bare_mod.ok("C_EncryptInit", h, byref(m), key)
        assert len(bare_mod.single("C_Encrypt", h, bytes(16))) == 16
        assert "retry 1/10" in log.read_text()
        # The service did get the request whose answer was lost: three generate requests (the
        # first key, the lost answer, the retry after the restart) made two keys.
        # (access lines are written up to accesslog.FLUSH_SECONDS after their answer: poll)
        deadline = time.monotonic() + 10
        while True:
            generated = [
                ln
                for ln in svc.log_text().splitlines()
                if f"POST /km/v1/softcards/{card}/keys/generate 200" in ln
            ]
            if len(generated) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(generated) == 3, generated
    finally:
        relay.close()


def test_service_down_for_good_is_device_error(bare_mod, fresh_service, tmp_path):
    svc = fresh_service()
    log = tmp_path / "module.log"
    cfg = write_cfg(
        svc,
        tmp_path / "p11.cfg",
        maxretries="2",
        retrydelay="1",
        loglevel="3",
        logfilepath=str(log),
    )
    h, _ = setup_card(svc, bare_mod, cfg)
    key = bare_mod.create(
        h,
        [
            *KEY_BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC),
            (C.CKA_SIGN, True),
            (C.CKA_VALUE, os.urandom(32)),
        ],
    )
    sign(bare_mod, h, key, b"up")
    svc.stop()
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    bare_mod.ok("C_SignInit", h, byref(m), key)
    out = ctypes.create_string_buffer(32)
    n = CK_ULONG(32)
    started = time.monotonic()
    assert bare_mod.call("C_Sign", h, b"down", 4, out, byref(n)) == C.CKR_DEVICE_ERROR
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 10, elapsed  # two retries, a second apart
    # The error ended the operation.
    assert bare_mod.call("C_Sign", h, b"down", 4, out, byref(n)) == C.CKR_OPERATION_NOT_INITIALIZED
    lines = log.read_text().splitlines()
    retries = [ln for ln in lines if " WARNING " in ln and "sign POST /crypto/v1/sign" in ln]
    assert len(retries) == 2 and "retry 2/2 in 1s" in retries[1]
    errors = [ln for ln in lines if " ERROR " in ln and "sign POST /crypto/v1/sign" in ln]
    assert len(errors) == 1
    assert "failed after 3 attempt(s)" in errors[0] and "Couldn't connect to server" in errors[0]
    assert str(svc.port) in errors[0]
