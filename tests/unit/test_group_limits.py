"""Group commit's limits (pkcs11ws/_native/group.pxi, named by client/group.py) in process, with
a sender that answers at once: a queue longer than `size` calls, or than `max_bytes` of bodies,
leaves in several requests in queue order; a lone call left over goes as its single request;
every call gets its own answer or its own error, and the group ends idle. Calls queue behind
the group's one slot, held by the test (tests/support/queued.py); daemon threads, so a call
never woken fails the test instead of hanging the run.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pkcs11ws.client.group import Call, GroupCommit
from tests.support.queued import hold_slots, release_and_join, wait_queued


class Sender:
    """Answers each call with its own body; records what went in which request."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.requests: list[list[bytes]] = []
        self.fail = fail

    def _single(self, op: str, token: str | None, data: bytes) -> tuple[int, Any]:
        self.requests.append([data])
        return 200, b"single " + data

    def _send_batch(self, calls: list[Call]) -> None:
        self.requests.append([c.data for c in calls])
        for c in calls:
            if self.fail is not None:
                c.error = self.fail
            else:
                c.status, c.answer = 200, b"batched " + c.data


def _queued(group: GroupCommit, sender: Sender, datas: list[bytes]) -> list[Any]:
    """Each body's group.run() queued, in this order, behind the held slot; their outcomes."""
    out: list[Any] = [None] * len(datas)

    def run(i: int) -> None:
        try:
            out[i] = group.run("sign", None, datas[i], sender)
        except BaseException as e:
            out[i] = e

    held = hold_slots(group)
    threads = []
    try:
        for i in range(len(datas)):
            t = threading.Thread(target=run, args=(i,), daemon=True)
            t.start()
            threads.append(t)
            wait_queued(group, i + 1)  # the queue's order is the bodies' order
    finally:
        release_and_join(group, held, threads)
    assert group._busy == 0 and group._carried == 0 and not group._queue
    assert group.lane.free and not group._parked
    return out


@pytest.mark.parametrize(
    "size,max_bytes,want",
    [
        (3, 1 << 20, [[0, 1, 2], [3, 4, 5], [6]]),  # by count; the last one alone
        (32, 10, [[0, 1], [2, 3], [4, 5], [6]]),  # by bytes: 4-byte bodies, 2 fit in 10
        (32, 3, [[0], [1], [2], [3], [4], [5], [6]]),  # a body over max_bytes still goes
    ],
)
def test_a_long_queue_leaves_in_requests_within_the_limits(
    size: int, max_bytes: int, want: list[list[int]]
) -> None:
    group = GroupCommit(1, size, max_bytes)
    sender = Sender()
    datas = [b"d%03d" % i for i in range(7)]
    out = _queued(group, sender, datas)
    assert sender.requests == [[datas[i] for i in r] for r in want]
    assert out == [
        (200, (b"single " if [i] in want else b"batched ") + d) for i, d in enumerate(datas)
    ]
    counts: dict[int, int] = {0: 1}  # the test's held "request"
    for r in want:
        counts[len(r)] = counts.get(len(r), 0) + 1
    assert group.sizes == counts


def test_a_failed_batch_is_each_carried_calls_error() -> None:
    group = GroupCommit(1, 4)
    failure = RuntimeError("the batch request failed")
    sender = Sender(fail=failure)
    datas = [b"e%d" % i for i in range(4)]
    out = _queued(group, sender, datas)
    assert sender.requests == [datas]
    assert all(o is failure for o in out)


def test_call_has_the_fields_the_client_uses() -> None:
    c = Call("verify", "tok", b"{}")
    assert (c.op, c.token, c.data, c.status, c.answer, c.error, c.lead, c.alone) == (
        "verify", "tok", b"{}", 0, None, None, None, False
    )  # fmt: skip
    assert c.started > 0
    with pytest.raises(TypeError):
        Call("sign", None, "not bytes")  # type: ignore[arg-type]
