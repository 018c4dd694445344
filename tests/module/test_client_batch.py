"""Group commit in the client (client/group.py) against the real key service over mutual TLS.

The queue is filled deterministically (no timing): the test holds every in-flight slot, starts
threads whose calls must queue, waits until they have, and hands the slot back; the queued calls
then leave in one batch request. Each thread must get its own result or its own error.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pkcs11ws import constants as C
from pkcs11ws.client import KeyServiceClient
from pkcs11ws.client.group import GroupCommit
from pkcs11ws.errors import PKCS11Error, TransportError
from tests.module.test_client import make_client, unique_name
from tests.support.queued import hold_slots, wait_queued

PASS = b"batch horse 1"
HMAC_KEY = b"h" * 32
AES_KEY = bytes(range(16))


def _setup(batch_cl: KeyServiceClient) -> tuple[str, str, str]:
    card = batch_cl.create_softcard(unique_name(), PASS)["id"]
    token, _ = batch_cl.activate(card, PASS)
    mac = batch_cl.create_object(
        card,
        token,
        {"CKA_CLASS": C.CKO_SECRET_KEY, "CKA_KEY_TYPE": C.CKK_SHA256_HMAC, "CKA_VALUE": HMAC_KEY},
    )["handle"]
    aes = batch_cl.create_object(
        card,
        token,
        {"CKA_CLASS": C.CKO_SECRET_KEY, "CKA_KEY_TYPE": C.CKK_AES, "CKA_VALUE": AES_KEY},
    )["handle"]
    return token, mac, aes


@pytest.fixture(scope="module")
def batch_cl(service: Any) -> Iterator[KeyServiceClient]:
    c = make_client(service, maxretries=0, batchinflight=1, batchsize=32)
    yield c
    c.close()


def queued(group: GroupCommit, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run calls in threads while the test holds every slot, so all of them queue; then free
    one slot: they leave together. Returns each call's result or exception."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as e:
            out[i] = e

    held = hold_slots(group)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    wait_queued(group, len(calls))
    for _ in range(held - 1):
        group._release(0)
    group._release(0)  # the held slot's "request" ends: the queue leaves as one batch
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return out


def test_queued_calls_leave_together_each_with_its_own_answer(batch_cl: KeyServiceClient) -> None:
    token, mac, aes = _setup(batch_cl)
    group = batch_cl.group
    assert group is not None
    good = hmac.digest(HMAC_KEY, b"data", hashlib.sha256)
    iv = bytes(16)
    before = dict(group.sizes)
    out = queued(
        group,
        [
            lambda: batch_cl.sign(token, mac, "CKM_SHA256_HMAC", b"data"),
            lambda: batch_cl.verify(token, mac, "CKM_SHA256_HMAC", b"data", good),
            lambda: batch_cl.verify(token, mac, "CKM_SHA256_HMAC", b"data", bytes(32)),
            lambda: batch_cl.sign(token, str(uuid.uuid4()), "CKM_SHA256_HMAC", b"data"),
            lambda: batch_cl.encrypt(token, aes, "CKM_AES_CBC", iv, bytes(32)),
            lambda: batch_cl.decrypt(token, aes, "CKM_AES_CBC", iv, bytes(15)),
            lambda: batch_cl.random(40),
            lambda: batch_cl.sign("v1.AAAA", mac, "CKM_SHA256_HMAC", b"data"),
        ],
    )
    assert out[0] == good and out[1] is None
    rv = [e.ckr if isinstance(e, PKCS11Error) else None for e in out]
    assert rv[2] == C.CKR_SIGNATURE_INVALID
    assert rv[3] == C.CKR_KEY_HANDLE_INVALID
    assert rv[5] == C.CKR_ENCRYPTED_DATA_LEN_RANGE
    assert rv[7] == C.CKR_USER_NOT_LOGGED_IN
    assert isinstance(out[4], bytes) and len(out[4]) == 32
    assert isinstance(out[6], bytes) and len(out[6]) == 40
    # One request carried the eight calls.
    assert group.sizes.get(8, 0) == before.get(8, 0) + 1


def test_one_thread_never_batches(batch_cl: KeyServiceClient) -> None:
    token, mac, _ = _setup(batch_cl)
    group = batch_cl.group
    assert group is not None
    before = {k: v for k, v in group.sizes.items() if k != 1}
    for _ in range(20):
        batch_cl.sign(token, mac, "CKM_SHA256_HMAC", b"x")
    assert {k: v for k, v in group.sizes.items() if k != 1} == before


def test_many_threads_same_results_as_alone(batch_cl: KeyServiceClient) -> None:
    token, mac, _ = _setup(batch_cl)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                data = b"%d-%d" % (n, i)
                sig = batch_cl.sign(token, mac, "CKM_SHA256_HMAC", data)
                assert sig == hmac.digest(HMAC_KEY, data, hashlib.sha256)
                batch_cl.verify(token, mac, "CKM_SHA256_HMAC", data, sig)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


def test_over_the_service_limit_falls_back_to_single_requests(fresh_service: Any) -> None:
    svc = fresh_service(overrides={"batch": {"max_items": 2}})
    c = make_client(svc, maxretries=0, batchinflight=1, batchsize=8)
    try:
        token, mac, _ = _setup(c)
        assert c.group is not None
        datas = [b"%d" % i for i in range(5)]
        out = queued(
            c.group,
            [
                lambda d=d: c.sign(token, mac, "CKM_SHA256_HMAC", d)  # type: ignore[misc]
                for d in datas
            ],
        )
        assert out == [hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas]
        assert c.group.size == 8  # a refused size is no reason to stop batching
    finally:
        c.close()


def test_batch_without_answer_fails_every_call_within_timeout(fresh_service: Any) -> None:
    svc = fresh_service()
    c = make_client(svc, maxretries=3, retrydelay=1, timeout=4, batchinflight=1)
    try:
        token, mac, _ = _setup(c)
        assert c.group is not None
        svc.stop()
        started = time.monotonic()
        out = queued(c.group, [lambda: c.sign(token, mac, "CKM_SHA256_HMAC", b"x")] * 4)
        assert all(isinstance(e, TransportError) for e in out), out
        assert all(e.ckr == C.CKR_DEVICE_ERROR for e in out)
        assert time.monotonic() - started < 4 + 30  # the deadline, with a loaded-machine margin
    finally:
        c.close()


def _in_flight(group: GroupCommit, requests: int, calls: int) -> None:
    """Pretend the test's own requests are in flight (their calls counted), as `queued` does."""
    with group._lock:
        group._busy += requests
        group._carried += calls
        group._lane_busy()  # the lane's token parked while anything is in flight, as run() does


def test_a_free_second_slot_takes_a_lone_call_behind_a_lone_request(fresh_service: Any) -> None:
    # Two threads, each with its own request in flight: neither waits for the other.
    c = make_client(fresh_service(), maxretries=0, batchinflight=2)
    try:
        token, mac, _ = _setup(c)
        group = c.group
        assert group is not None
        _in_flight(group, 1, 1)
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(c.sign(token, mac, "CKM_SHA256_HMAC", b"1")))
        t.start()
        t.join(60)  # it would queue until the test's request ends, which it never does
        assert out == [hmac.digest(HMAC_KEY, b"1", hashlib.sha256)]
        assert not group._queue
    finally:
        c.close()


def test_second_slot_waits_for_a_batch_as_big_as_the_one_in_flight(fresh_service: Any) -> None:
    # One request of 3 calls in flight, a second slot free: the calls that arrive meanwhile
    # wait until 3 have come and then leave together at once (batches of 3 and 3, not 1 and 5).
    c = make_client(fresh_service(), maxretries=0, batchinflight=2, batchsize=32)
    try:
        token, mac, _ = _setup(c)
        group = c.group
        assert group is not None
        _in_flight(group, 1, 3)
        before = dict(group.sizes)
        datas = [b"%d" % i for i in range(3)]
        out: dict[bytes, Any] = {}

        def sign(d: bytes) -> None:
            out[d] = c.sign(token, mac, "CKM_SHA256_HMAC", d)

        threads = [threading.Thread(target=sign, args=(d,)) for d in datas]
        for t in threads[:2]:
            t.start()
        wait_queued(group, 2)  # two are not enough: they wait
        assert group._busy == 1
        threads[2].start()  # the third fills the batch: all three leave on the free slot
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert out == {d: hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas}
        assert group.sizes.get(3, 0) == before.get(3, 0) + 1
        assert group._busy == 1 and not group._queue  # the test's request is still "in flight"
    finally:
        c.close()


def test_calls_below_the_batch_in_flight_leave_when_it_ends(fresh_service: Any) -> None:
    c = make_client(fresh_service(), maxretries=0, batchinflight=2, batchsize=32)
    try:
        token, mac, _ = _setup(c)
        group = c.group
        assert group is not None
        _in_flight(group, 1, 4)
        out = []
        t = threading.Thread(target=lambda: out.append(c.sign(token, mac, "CKM_SHA256_HMAC", b"q")))
        t.start()
        wait_queued(group, 1)
        assert group._busy == 1  # one call is less than the 4 in flight: it waits
        group._release(4)  # the test's request ends: nothing is in flight, the call leaves
        t.join(60)
        assert not t.is_alive()
        assert out == [hmac.digest(HMAC_KEY, b"q", hashlib.sha256)]
        assert group._busy == 0 and group._carried == 0
    finally:
        c.close()


def test_a_service_without_the_batch_request_id_field_gets_the_header(
    service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service from before Batch.request_id refuses the field as it refuses any unknown one
    # (UNKNOWN_FIELD, before any item runs). Stand in for its schema by naming the field
    # something this service does not know: the batch is sent again with the id as a header,
    # and so is every later batch; every call gets its own answer.
    from pkcs11ws.client import api, wire

    real = wire.batch_body

    def unknown_field(calls: Any, rid_field: bytes | None, n: int) -> bytes:
        body = real(calls, rid_field, n)
        if rid_field is not None:
            assert body.startswith(b'{"request_id":"')
            body = b'{"request_idx":"' + body[len(b'{"request_id":"') :]
        return body

    monkeypatch.setattr(api, "batch_body", unknown_field)
    c = make_client(service, maxretries=0, batchinflight=1, batchsize=8)
    try:
        token, mac, _ = _setup(c)
        assert c.group is not None
        for round_ in range(2):
            datas = [b"%d-%d" % (round_, i) for i in range(4)]
            before = c.group.sizes.get(4, 0)
            out = queued(
                c.group,
                [
                    lambda d=d: c.sign(token, mac, "CKM_SHA256_HMAC", d)  # type: ignore[misc]
                    for d in datas
                ],
            )
            assert out == [hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas]
            assert c.group.sizes.get(4, 0) == before + 1  # still one batch, not four singles
        assert c._batch_rid_in_body is False
    finally:
        c.close()
