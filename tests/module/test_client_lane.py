"""Group commit's lane (pkcs11ws/_native/group.pxi): the lone call that sends without the lock,
against the real key service over mutual TLS.

The lane's holder frees its token before it looks at the queue; a queuing call tries to take
the token again after it has queued. The tests below force each order of that race (the lane's
call held in its request by a gate; the group's test hook, called when a queuing call has found
the lane's call in flight, as the moment to let it end), and then start many threads at once:
every call gets its own answer, each is counted in exactly one request, and the group ends idle
with its token free.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import threading
from collections.abc import Callable
from typing import Any

from pkcs11ws.client import KeyServiceClient
from pkcs11ws.client.group import GroupCommit
from tests.module.test_client import make_client
from tests.module.test_client_batch import HMAC_KEY, _setup
from tests.support.queued import wait_queued


def _mac(data: bytes) -> bytes:
    return hmac.digest(HMAC_KEY, data, hashlib.sha256)


def _idle(group: GroupCommit) -> None:
    """Nothing in flight, nothing queued, the lane's token free."""
    assert group._busy == 0 and group._carried == 0 and not group._queue
    assert group.lane.free and not group._parked


def _gate_lane(c: KeyServiceClient) -> tuple[threading.Event, threading.Event, list[Any]]:
    """Hold the first lane call of the returned thread in its request until `go` is set:
    (entered, go, out); the call itself is sent for real once let go."""
    entered, go = threading.Event(), threading.Event()
    single = c._single
    lane: list[threading.Thread] = []

    def gated(op: str, token: str | None, data: bytes) -> tuple[int, Any]:
        if lane and threading.current_thread() is lane[0]:
            entered.set()
            assert go.wait(60)
        return single(op, token, data)

    c._single = gated  # type: ignore[method-assign]
    return entered, go, lane


def _thread(fn: Callable[[], Any], out: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    # Daemon: were a wake-up lost, the test fails on its join instead of hanging the run.
    return threading.Thread(target=run, daemon=True)


def test_a_lane_call_ending_while_another_queues_still_sends_it(service: Any) -> None:
    # The lane's call ends after the second call found its token taken but before that call
    # queued: the lane's holder sees no queue, so the queued call must take the token itself.
    c = make_client(service, maxretries=0, batchinflight=1)
    try:
        token, mac, _ = _setup(c)
        group = c.group
        assert group is not None
        entered, go, lane = _gate_lane(c)
        first: list[Any] = []
        t1 = _thread(lambda: c.sign(token, mac, "CKM_SHA256_HMAC", b"lane"), first)

        def let_the_lane_end() -> None:  # in the queuing thread, holding the group's lock
            go.set()
            t1.join(60)  # its token back and no queue seen: it took no lock on the way out
            assert not t1.is_alive()

        fired: list[bool] = []

        def hook() -> None:  # the queuing call found the lane's call in flight (lock held)
            assert group._lock.locked()
            if not fired:
                fired.append(True)
                let_the_lane_end()

        group._hook = hook
        lane.append(t1)
        t1.start()
        assert entered.wait(60)
        assert group._busy == 0 and not group.lane.free  # in flight on the lane, unlocked
        second: list[Any] = []
        t2 = _thread(lambda: c.sign(token, mac, "CKM_SHA256_HMAC", b"queued"), second)
        t2.start()
        t2.join(60)
        assert not t2.is_alive(), "the queued call was left behind the lane's ended call"
        assert fired
        assert first == [_mac(b"lane")] and second == [_mac(b"queued")]
        _idle(group)
    finally:
        c.close()


def test_a_lane_call_ending_after_another_queued_sends_it(service: Any) -> None:
    # The other order: the second call queued behind the lane's call; the lane's holder, once
    # its token is back, sees the queue and sends it.
    c = make_client(service, maxretries=0, batchinflight=1)
    try:
        token, mac, _ = _setup(c)
        group = c.group
        assert group is not None
        entered, go, lane = _gate_lane(c)
        first: list[Any] = []
        lane.append(_thread(lambda: c.sign(token, mac, "CKM_SHA256_HMAC", b"lane"), first))
        lane[0].start()
        assert entered.wait(60)
        second: list[Any] = []
        t2 = _thread(lambda: c.sign(token, mac, "CKM_SHA256_HMAC", b"queued"), second)
        t2.start()
        wait_queued(group, 1)  # one slot, the lane's call in it: the second call waits
        assert not second
        go.set()
        for t in (lane[0], t2):
            t.join(60)
            assert not t.is_alive()
        assert first == [_mac(b"lane")] and second == [_mac(b"queued")]
        _idle(group)
    finally:
        c.close()


def test_many_threads_starting_at_once_each_call_counted_once(service: Any) -> None:
    c = make_client(service, maxretries=0, batchinflight=2, batchsize=32)
    try:
        token, mac, _ = _setup(c)
        group = c.group
        assert group is not None
        threads, calls = 16, 15
        start = threading.Barrier(threads)
        before = group.sizes
        wrong: list[Any] = []

        def worker(i: int) -> None:
            start.wait(60)
            for j in range(calls):
                d = b"%d.%d" % (i, j)
                got = c.sign(token, mac, "CKM_SHA256_HMAC", d)
                if got != _mac(d):
                    wrong.append((d, got))

        out: list[Any] = []
        ts = [_thread(functools.partial(worker, i), out) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
            assert not t.is_alive()
        assert out == [None] * threads and not wrong
        after = group.sizes
        carried = sum(n * (k - before.get(n, 0)) for n, k in after.items())
        assert carried == threads * calls
        _idle(group)
    finally:
        c.close()
