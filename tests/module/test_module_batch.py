"""Group commit inside the module: C_Sign from several host threads (ctypes lets go of the GIL,
so each call enters the core as a C host's does) queues behind slots the test holds, then
leaves in one batch. The sender wakes the others only once it has released the GIL
(pkcs11ws/_native/wake.pxi): every caller must still wake, each with its own answer; and each
its own CKR when the batch's deadline has passed (C_Finalize meanwhile:
test_module_batch_finalize.py). (Daemon
threads: a call never woken fails its test instead of hanging the run.)
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import threading
import time
from ctypes import byref
from typing import Any

import pytest

from pkcs11ws import constants as C
from tests.support.p11ctypes import CKError, Module, mechanism
from tests.support.queued import (
    hmac_key,
    hmac_sign,
    queue_signs,
    queued_hmac_signs,
    release_and_join,
)

HMAC_KEY = b"k" * 32


def test_queued_c_sign_calls_each_wake_with_their_own_answer(
    mod: Module, logged_card: tuple[int, int, bytes]
) -> None:
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    core = sys.modules["pkcs11ws._native.core"]
    group = core.current_provider().client.group
    assert type(group) is core.Group and type(group._lock) is core.Mutex
    n = 6
    datas = [b"message %d" % i for i in range(n)]
    before = group.sizes.get(n, 0)
    out = queued_hmac_signs(mod, slot, key, group, datas)
    assert out == [hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas]
    assert group.sizes.get(n, 0) == before + 1


def test_a_call_that_hands_on_a_full_batch_wakes_its_sender_before_it_waits(
    mod: Module, logged_card: tuple[int, int, bytes]
) -> None:
    # A third call completes a queue longer than one request takes: it hands the first two to
    # their sender and queues itself. Inside the module that wake-up is deferred; it must be
    # posted before the third call blocks, or the first two wait for the third and the third
    # for a slot.
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    core = sys.modules["pkcs11ws._native.core"]
    group = core.current_provider().client.group
    assert group is not None
    sessions = [mod.open(slot) for _ in range(3)]
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    for s in sessions:
        mod.ok("C_SignInit", s, byref(m), key)
    datas = [b"handed on %d" % i for i in range(3)]
    out: list[Any] = [None] * 3

    def sign(i: int) -> None:
        out[i] = mod.single("C_Sign", sessions[i], datas[i], 32)

    def wait_queued(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(group._queue) < n:
            assert time.monotonic() < deadline, "the calls did not queue"
            time.sleep(0.01)

    size = group.size
    group.size = 2
    with group._lock:  # the test's own request of 3 calls is "in flight" on one of 2 slots
        assert group.limit == 2 and group._busy == 0
        group._busy, group._carried = 1, 3
        group._lane_busy()  # the lane's token parked while anything is in flight, as run() does
    threads = [threading.Thread(target=sign, args=(i,), daemon=True) for i in range(3)]
    try:
        threads[0].start()
        wait_queued(1)
        threads[1].start()
        wait_queued(2)  # 2 calls < 3 in flight: they wait
        threads[2].start()  # 3 calls: the first two leave on the free slot, the third waits
        for t in threads[:2]:
            t.join(60)
            assert not t.is_alive(), "the handed-on batch was never sent"
        assert out[:2] == [hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas[:2]]
    finally:
        group._release(3)  # the test's request ends: the third call leaves
        group.size = size
    threads[2].join(60)
    assert not threads[2].is_alive()
    assert out[2] == hmac.digest(HMAC_KEY, datas[2], hashlib.sha256)
    for s in sessions:
        mod.call("C_CloseSession", s)


def test_the_cores_mutex_excludes_and_waits_without_the_gil(
    mod: Module, logged_card: tuple[int, int, bytes]
) -> None:
    # group commit's lock (wake.pxi Mutex): a waiter blocks until the holder
    # releases it, and lets go of the GIL meanwhile (the holder's thread runs on); releasing
    # it unheld is an error, as for a _thread.lock.
    core = sys.modules["pkcs11ws._native.core"]
    m = core.Mutex()
    assert not m.locked()
    with pytest.raises(RuntimeError):
        m.release()
    order: list[str] = []
    with m:
        assert m.locked()

        def waiter() -> None:
            m.acquire()
            order.append("waiter")
            m.release()

        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        time.sleep(0.2)  # the waiter blocks in acquire() meanwhile
        spins = sum(1 for _ in range(100_000))  # Python code: the waiter let go of the GIL
        assert spins == 100_000 and t.is_alive() and not order
        order.append("holder")
    t.join(60)
    assert not t.is_alive()
    assert order == ["holder", "waiter"] and not m.locked()


def test_queued_calls_past_their_deadline_fail_each_without_a_request(
    mod: Module, logged_card: tuple[int, int, bytes]
) -> None:
    # The batch's deadline is its oldest call's start + TIMEOUT (the core's batch request,
    # pkcs11ws/_native/batchpath.pxi): once it has passed, no request goes out and every call
    # gets the CKR of a call that got no answer in time, each its own; the group ends idle.
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    client = sys.modules["pkcs11ws._native.core"].current_provider().client
    group = client.group
    out, threads, held = queue_signs(mod, slot, key, HMAC_KEY, group, 4)
    try:
        for call in group._queue:
            call.started -= client.timeout + 1  # as if they had waited for TIMEOUT already
        requests = client.transport.stats()["requests"]
    finally:
        release_and_join(group, held, threads)
    assert [type(e) for e in out] == [CKError] * 4, out
    assert {e.rv for e in out} == {C.CKR_DEVICE_ERROR} and len({id(e) for e in out}) == 4
    assert client.transport.stats()["requests"] == requests
    assert group._busy == 0 and group._carried == 0 and not group._queue and group.lane.free
    assert hmac_sign(mod, h, key, b"after") == hmac.digest(HMAC_KEY, b"after", hashlib.sha256)
