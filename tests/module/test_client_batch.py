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

    with group._lock:
        held = group.limit - group._busy
        group._busy = group.limit
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(group._queue) < len(calls):
        assert time.monotonic() < deadline, "the calls did not queue"
        time.sleep(0.01)
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
