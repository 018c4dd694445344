"""The module rides through replica deaths: 2 key service replicas on one PostgreSQL database,
4 application threads creating objects, generating keys and signing through libpkcs11ws.so
(HOST lists both replicas) for about 25 s while each replica in turn is killed -9 and restarted.
The application sees no error at all, and every object it was told exists does, exactly once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from ctypes import byref
from typing import Any

from pkcs11ws import constants as C
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.p11ctypes import Module, mechanism
from tests.support.service import Service, launch, start_replica, start_service

RUN_SECONDS = 25.0
THREADS = 4
HMAC_GEN = [
    (C.CKA_TOKEN, True),
    (C.CKA_PRIVATE, True),
    (C.CKA_CLASS, C.CKO_SECRET_KEY),
    (C.CKA_VALUE_LEN, 32),
    (C.CKA_SIGN, True),
    (C.CKA_VERIFY, True),
]


def kill9(svc: Service) -> None:
    os.kill(svc.pid, signal.SIGKILL)
    svc.proc.wait(10)


def test_module_rides_through_replica_kills(
    postgres: Any, bare_mod: Module, tmp_path_factory
) -> None:
    work = tmp_path_factory.mktemp("replica-kill")
    a = start_service(tmp_path_factory.mktemp("pgrep"), store=postgres.new_database())
    running = [a, start_replica(a)]
    made = list(running)
    try:
        _run(running, made, bare_mod, work)
    finally:
        for svc in made:
            svc.stop()


def _run(running: list[Service], made: list[Service], bare_mod: Module, work: Any) -> None:
    a, b = running
    setup = KeyServiceClient(load_config(str(a.client_cfg)))
    name = "k" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex.encode()
    card = setup.create_softcard(name, pin)["id"]
    setup.close()
    log = work / "module.log"
    lines = [
        ln
        for ln in a.client_cfg.read_text().splitlines()
        if not ln.strip()
        or ln.split()[0].upper()
        not in ("HOST", "PORT", "MAXRETRIES", "RETRYDELAY", "LOGLEVEL", "LOGFILEPATH")
    ]
    cfg = work / "p11.cfg"
    cfg.write_text(
        "\n".join(
            [
                *lines,
                f"HOST 127.0.0.1:{a.port},127.0.0.1:{b.port}",
                "MAXRETRIES 10",
                "RETRYDELAY 1",
                "LOGLEVEL 3",
                f"LOGFILEPATH {log}",
            ]
        )
        + "\n"
    )
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    slot = bare_mod.slot_by_label(name)
    h = bare_mod.open(slot)
    assert bare_mod.login(h, pin) == C.CKR_OK

    stop = threading.Event()
    errors: list[str] = []
    acknowledged: list[list[int]] = [[] for _ in range(THREADS)]  # object handles per thread
    labels: list[list[bytes]] = [[] for _ in range(THREADS)]
    signed = [0] * THREADS

    def work_thread(i: int) -> None:
        session = bare_mod.open(slot)
        m, _ = mechanism(C.CKM_SHA256_HMAC)
        n = 0
        try:
            while not stop.is_set():
                label = b"t%d-%d" % (i, n)
                n += 1
                try:
                    obj = bare_mod.create(
                        session,
                        [
                            (C.CKA_TOKEN, True),
                            (C.CKA_PRIVATE, True),
                            (C.CKA_CLASS, C.CKO_DATA),
                            (C.CKA_LABEL, label),
                            (C.CKA_VALUE, label),
                        ],
                    )
                    acknowledged[i].append(obj)
                    labels[i].append(label)
                    key = bare_mod.generate(
                        session, C.CKM_GENERIC_SECRET_KEY_GEN, [*HMAC_GEN, (C.CKA_LABEL, label)]
                    )
                    acknowledged[i].append(key)
                    labels[i].append(label)
                    bare_mod.ok("C_SignInit", session, byref(m), key)
                    if len(bare_mod.single("C_Sign", session, label)) != 32:
                        errors.append("short MAC")
                        return
                    signed[i] += 1
                except Exception as e:
                    errors.append(f"thread {i}: {e!r}")
                    return
        finally:
            bare_mod.call("C_CloseSession", session)

    threads = [threading.Thread(target=work_thread, args=(i,)) for i in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        for victim in (0, 1):  # each replica in turn: killed -9, restarted on its port
            time.sleep(RUN_SECONDS / 5)
            dead = running[victim]
            kill9(dead)
            time.sleep(RUN_SECONDS / 10)
            again = launch(
                dead.dir,
                dead.server_yaml,
                dead.port,
                1,
                f"restart-{dead.port}.out",
                explicit_port=True,
            )
            running[victim] = again
            made.append(again)
        time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors
    assert all(n > 0 for n in signed), signed

    # Every acknowledged object exists exactly once on the service (and nothing else does).
    expected = [lb for per in labels for lb in per]
    client = KeyServiceClient(load_config(str(a.client_cfg)))
    try:
        token, _ = client.activate(card, pin)
        found = client.search_objects(card, token, {})
    finally:
        client.close()
    got = sorted(o["attrs"]["CKA_LABEL"] for o in found)
    assert got == sorted(expected)
    assert len({(o["attrs"]["CKA_CLASS"], o["attrs"]["CKA_LABEL"]) for o in found}) == len(found)
    text = log.read_text(errors="replace")
    for svc in (a, b):  # the module did see each replica die, and carried on
        assert f"key service 127.0.0.1:{svc.port} failed" in text
    print(f"acknowledged objects {len(expected)}, signatures {sum(signed)}")
