"""Group commit of the read-only crypto calls (issue 15): the queue, the slots, who sends.

A call takes a slot when fewer than `limit` requests (BATCHINFLIGHT per key service) are in
flight and sends its own single request at once: one thread alone never waits for anyone.
A call that finds every slot busy queues and waits on a lock (the GIL is released).
When a request ends, its slot goes to the queue: the oldest waiting call becomes the sender of
the next request, carrying up to `size` queued calls (and at most `max_bytes` of request bodies)
to the batch endpoint; a lone call goes as its single request. Every call gets its own answer
or its own error; a failure of the batch request as a whole (no answer within the deadline
of its oldest call, a 5xx after the retries) is every carried call's error. So the slots keep
both ends busy while calls pile up, and the per-request cost of TLS, HTTP and the service's
pipeline is shared by the calls of one batch.

The network part (the single request, the batch request, the decoding of its answers) is the
client's (api.py); this module only decides who sends what and hands answers back.
"""

from __future__ import annotations

import threading
import time
from _thread import allocate_lock

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final

# Below the service's default batch.max_bytes (1 MiB): the JSON around the items and base64
# growth are already in the bodies counted here.
MAX_BYTES: Final = 512 * 1024


class Call:
    """One queued call: what it sends, and the answer its sender leaves for it."""

    __slots__ = ("alone", "answer", "data", "done", "error", "lead", "op", "started", "status",
                 "token")  # fmt: skip

    def __init__(self, op: str, token: str | None, data: bytes, started: float) -> None:
        self.op = op
        self.token = token
        self.data = data
        self.started = started  # time.monotonic() when the call began: its TIMEOUT counts from it
        # Released once when the call's answer (or its turn to send) is there. A bare lock, not
        # a threading.Event: an Event is a Condition in Python code, several frames and a lock
        # allocation more per wait (bench/results/profile-issue15.md).
        self.done = allocate_lock()
        self.done.acquire()
        self.status = 0
        self.answer: Any = None
        self.error: BaseException | None = None
        self.lead: list[Call] | None = None  # set on the call chosen to send the next request
        self.alone = False  # set when the batch endpoint is unusable: send the single request


class GroupCommit:
    def __init__(
        self,
        limit: int,
        size: int,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.limit = limit
        self.size = size
        self.max_bytes = max_bytes
        self.sizes: dict[int, int] = {}  # requests sent by the number of calls they carried
        self.reset()

    def reset(self) -> None:
        """A fresh state (after fork: the parent's waiting threads do not exist here)."""
        self._lock = threading.Lock()
        self._busy = 0
        self._queue: list[Call] = []

    def run(
        self,
        op: str,
        token: str | None,
        data: bytes,
        single: Callable[[str, str | None, bytes], tuple[int, Any]],
        batch: Callable[[list[Call]], None],
    ) -> tuple[int, Any]:
        """(status, parsed answer) of one call, sent alone or with others. single(op, token,
        data) sends one call's own request and returns (status, answer) or raises; batch(calls)
        sends them in one request and sets each call's status and answer, error, or alone; it
        must not raise. (Passed per call, not kept: the client owns the group, and a reference
        back would make a cycle that keeps the client's curl handles alive past C_Finalize.)"""
        lock = self._lock
        # acquire()/release(), not `with`: on this path of every call a with statement costs
        # about 1.4k instructions more per lock (callgrind, bench/results/profile-issue15.md).
        lock.acquire()
        try:
            if self._busy < self.limit:
                self._busy += 1
                call = None
            else:
                call = Call(op, token, data, time.monotonic())
                self._queue.append(call)
        finally:
            lock.release()
        if call is None:
            try:
                return single(op, token, data)
            finally:
                self._release(1)
        call.done.acquire()  # released by the sender: the GIL is released while blocked
        group = call.lead
        if group is not None:
            try:
                if len(group) == 1:
                    try:
                        call.status, call.answer = single(op, token, data)
                    except BaseException as e:  # handed to the caller below
                        call.error = e
                else:
                    batch(group)
            finally:
                self._release(len(group))
                for other in group:
                    if other is not call:
                        other.done.release()
        if call.alone:
            return single(op, token, data)
        if call.error is not None:
            raise call.error
        return call.status, call.answer

    def _release(self, carried: int) -> None:
        """A request ended: its slot goes to the next group of waiting calls, or is freed."""
        lock = self._lock
        lock.acquire()  # not `with`: see run()
        try:
            sizes = self.sizes
            sizes[carried] = sizes.get(carried, 0) + 1
            queue = self._queue
            if not queue:
                self._busy -= 1
                return
            n, total = 0, 0
            for c in queue:
                total += len(c.data)
                if n and (n >= self.size or total > self.max_bytes):
                    break
                n += 1
            group = queue[:n]
            del queue[:n]
        finally:
            lock.release()
        head = group[0]
        head.lead = group
        head.done.release()
