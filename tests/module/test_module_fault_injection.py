"""Fault injection: 4 threads create objects and generate keys through the module while the key
service is killed (-9) and restarted 3 times and one answer is lost on the way (a real TCP relay
drops it, then resets connections for a moment).

An application that gets CKR_DEVICE_ERROR calls again with the same template. At the end every
acknowledged object is on the service exactly once (0 missing, 0 duplicates, counted by label
and in total), and no call took longer than the configured deadline (TIMEOUT, which cuts
MAXRETRIES x RETRYDELAY short) plus a margin for a loaded machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from ctypes import byref

from pkcs11ws import constants as C
from tests.support.fault_util import Relay, object_count, restart, setup_card, write_cfg
from tests.support.p11ctypes import CK_MECHANISM, CK_SESSION_INFO, CK_ULONG, Template

THREADS = 4
KILLS = 3
MAXRETRIES, RETRYDELAY, TIMEOUT = 20, 1, 15
BOUND = TIMEOUT + 10.0  # generous margin: CI is a loaded 2-core box
BASE = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]


def test_kill_restart_and_lost_answer_lose_and_duplicate_nothing(
    bare_mod, fresh_service, restarted, tmp_path
):
    svc = fresh_service()
    relay = Relay(svc.port)
    stop = threading.Event()
    acked: dict[str, int] = {}  # label -> handle, acknowledged by the module
    longest = [0.0]
    errors: list[str] = []
    lock = threading.Lock()
    try:
        cfg = write_cfg(
            svc,
            tmp_path / "relay.cfg",
            port=str(relay.port),
            maxretries=str(MAXRETRIES),
            retrydelay=str(RETRYDELAY),
            timeout=str(TIMEOUT),
        )
        h0, card = setup_card(svc, bare_mod, cfg)
        info = CK_SESSION_INFO()
        bare_mod.ok("C_GetSessionInfo", h0, byref(info))
        slot = info.slotID

        def worker(n: int) -> None:
            h = bare_mod.open(slot)  # the login is the process's, per slot
            i = 0
            while not stop.is_set():
                label = f"f{n}-{i}-{uuid.uuid4().hex[:6]}"
                if i % 2:
                    items = [
                        *BASE,
                        (C.CKA_CLASS, C.CKO_DATA),
                        (C.CKA_LABEL, label.encode()),
                        (C.CKA_VALUE, os.urandom(32)),
                    ]
                    mech = None
                else:
                    items = [
                        *BASE,
                        (C.CKA_CLASS, C.CKO_SECRET_KEY),
                        (C.CKA_KEY_TYPE, C.CKK_AES),
                        (C.CKA_VALUE_LEN, 16),
                        (C.CKA_LABEL, label.encode()),
                    ]
                    mech = CK_MECHANISM(C.CKM_AES_KEY_GEN, None, 0)
                t = Template(items)
                out = CK_ULONG()
                for _attempt in range(5):  # the application's own retries, same template
                    started = time.monotonic()
                    if mech is None:
                        rv = bare_mod.call("C_CreateObject", h, t.array, t.count, byref(out))
                    else:
                        rv = bare_mod.call(
                            "C_GenerateKey", h, byref(mech), t.array, t.count, byref(out)
                        )
                    took = time.monotonic() - started
                    with lock:
                        longest[0] = max(longest[0], took)
                    if rv == C.CKR_OK:
                        with lock:
                            acked[label] = out.value
                        break
                    if rv != C.CKR_DEVICE_ERROR:
                        with lock:
                            errors.append(f"{label}: {C.ckr_name(rv)}")
                        return
                i += 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for th in threads:
            th.start()
        current = svc
        for k in range(KILLS):
            time.sleep(1.5)
            if k == 1:
                # One answer lost: the service commits, the module never hears of it, and new
                # connections are reset for a moment.
                relay.drop_next_answer()
                relay.dropped.wait(10)
                time.sleep(0.5)
                relay.accept()
            os.kill(current.pid, signal.SIGKILL)
            current.proc.wait(10)
            current = restart(current, restarted, stop=False)
        time.sleep(1.5)
        stop.set()
        for th in threads:
            th.join(BOUND * 5)
        assert not any(th.is_alive() for th in threads)
        assert relay.dropped.is_set()
        assert not errors, errors
        assert len(acked) >= 3 * THREADS, len(acked)
        assert longest[0] < BOUND, longest[0]
        print(
            f"fault injection: {len(acked)} objects acknowledged, longest call {longest[0]:.1f} s"
        )

        # Every acknowledged object exactly once; nothing else on the card. One search: the
        # labels then come from the module's cache, without a round trip each.
        on_card: dict[str, list[int]] = {}
        for handle in bare_mod.find(h0, []):
            on_card.setdefault(bare_mod.attr(h0, handle, C.CKA_LABEL).decode(), []).append(handle)
        missing = [label for label in acked if label not in on_card]
        duplicated = {label: hs for label, hs in on_card.items() if len(hs) > 1}
        assert not missing and not duplicated, (missing, duplicated)
        assert {label: hs[0] for label, hs in on_card.items()} == acked
        assert object_count(current, card) == len(acked)
    finally:
        stop.set()
        relay.close()
