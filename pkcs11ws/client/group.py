"""Group commit of the read-only crypto calls (issue 15): the queue, the slots, who sends.

Up to `limit` requests (BATCHINFLIGHT per key service) are in flight. A call that finds
none in flight sends its own single request at once: one thread alone never waits for anyone
(and takes no lock: it sends on the lane, a token taken and given back with GIL-atomic
operations, so the one-thread path costs what group commit off does).
Otherwise calls queue (waiting on a lock, the GIL released) until a slot is free and the queue
holds at least as many calls as the requests in flight carry on average; then the call that
completes that count sends them (no wake-up first), up to `size` calls (and at most
`max_bytes` of request bodies) to the batch endpoint; a lone call goes as its single request.
A lone request in flight lets the next call go at once, so two threads do not wait for each
other either. When a request ends, the queue leaves on its slot once the same rule lets it, at
the latest when nothing else is in flight (so a queued call waits only while others' requests
are in flight). So batches even out: at 8 threads and 2 slots mostly 3 and 4 calls, where
the first call back from a batch used to take the free slot alone (1 to 6, 2.6 on average).
Every call gets its own answer or its own error; a failure of the batch request as a whole
(no answer within the deadline of its oldest call, a 5xx after the retries) is every carried
call's error. So the slots keep both ends busy while calls pile up, and the per-request cost
of TLS, HTTP and the service's pipeline is shared by the calls of one batch.

The network part (the single request, the batch request, the decoding of its answers) is the
client's (api.py); this module only decides who sends what and hands answers back.
"""

from __future__ import annotations

import _thread  # not threading (start-up: pkcs11ws/_lite.py)
import sys
import time
from _thread import allocate_lock

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final, Protocol

    class Sender(Protocol):
        """What sends a group's requests: the client (api.py)."""

        def _single(self, op: str, token: str | None, data: bytes, /) -> tuple[int, Any]: ...

        def _send_batch(self, calls: list[Call], /) -> None: ...

    class Lane(Protocol):
        """The lane's token (_Lane below, or the module core's C one: wake.pxi)."""

        @property
        def free(self) -> bool: ...
        @property
        def sent(self) -> int: ...
        def reset(self, queue: list[Call], /) -> None: ...
        def take(self) -> bool: ...
        def give(self) -> None: ...
        def ended(self) -> bool: ...


# Below the service's default batch.max_bytes (1 MiB): the JSON around the items and base64
# growth are already in the bodies counted here.
MAX_BYTES: Final = 512 * 1024


class Call:
    """One queued call: what it sends, and the answer its sender leaves for it. Inside the
    module the core's Queued (wake.pxi) takes its place: the same fields and methods, made in
    C, its wake-ups deferred until the waking thread has released the GIL."""

    __slots__ = ("alone", "answer", "data", "done", "error", "lead", "op", "started", "status",
                 "token")  # fmt: skip

    def __init__(self, op: str, token: str | None, data: bytes) -> None:
        self.op = op
        self.token = token
        self.data = data
        self.started = time.monotonic()  # when the call began: its TIMEOUT counts from it
        # Released once when the call's answer (or its turn to send) is there: a bare lock,
        # acquired already (not a threading.Event: an Event is a Condition in Python code,
        # several frames and a lock allocation more per wait).
        self.done = _locked()
        self.status = 0
        self.answer: Any = None
        self.error: BaseException | None = None
        self.lead: list[Call] | None = None  # set on the call chosen to send the next request
        self.alone = False  # set when the batch endpoint is unusable: send the single request

    def wait(self) -> None:
        """Block until wake() (the GIL released meanwhile)."""
        self.done.acquire()

    def wake(self) -> None:
        self.done.release()


class _Lane:
    """The lane's token outside the module (no core loaded): a one-item list, whose pop and
    append are atomic under the GIL. Inside the module the core's Lane (wake.pxi) does the same
    with a C flag, which the core's fast path also reads directly. Same methods, same rules."""

    __slots__ = ("_token", "queue", "sent")

    def __init__(self, queue: list[Call]) -> None:
        self._token: list[None] = [None]
        self.queue = queue
        self.sent = 0  # requests the lane sent (written only by its holder)

    @property
    def free(self) -> bool:
        return bool(self._token)

    def reset(self, queue: list[Call]) -> None:
        self._token = [None]
        self.queue = queue

    def take(self) -> bool:
        try:
            self._token.pop()
        except IndexError:
            return False
        return True

    def give(self) -> None:
        self._token.append(None)

    def ended(self) -> bool:
        self.sent += 1
        self._token.append(None)  # first free the lane, then look at the queue
        return bool(self.queue)


def _locked() -> Any:
    lock = allocate_lock()
    lock.acquire()
    return lock


def _nothing() -> None:
    pass


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
        self._sizes: dict[int, int] = {}  # requests sent by the number of calls they carried
        self._lone = 0  # ... but lone calls' single requests: an int is cheaper per call
        # The lane (see reset()) counts its own. It is made once and renewed in place by
        # reset(): the core's fast path keeps a reference to it (Provider.fast).
        core = sys.modules.get("pkcs11ws._native.core")
        lane = getattr(core, "Lane", None) or _Lane
        self.lane: Lane = lane([])
        self.reset()

    @property
    def sizes(self) -> dict[int, int]:
        """Requests sent so far by the number of calls they carried (a copy)."""
        sizes = dict(self._sizes)
        lone = self._lone + self.lane.sent
        if lone:
            sizes[1] = sizes.get(1, 0) + lone
        return sizes

    def reset(self) -> None:
        """A fresh state (after fork: the parent's waiting threads do not exist here)."""
        # Inside the module, queued calls are the core's Queued, whose wake-ups wait until the
        # waking thread has released the GIL (pkcs11ws/_native/wake.pxi); flush() posts this
        # thread's deferred ones before it does anything that may block. The lock is the
        # core's Mutex there: a _thread.lock whose acquire() parses no arguments.
        core = sys.modules.get("pkcs11ws._native.core")
        self._lock: Any = _thread.allocate_lock()
        self._new_call: Callable[[str, str | None, bytes], Call] = Call
        self._flush: Callable[[], None] = _nothing
        if core is not None and hasattr(core, "Queued"):
            self._new_call, self._flush = core.Queued, core.flush_wakes
            self._lock = core.Mutex()
        self._busy = 0  # requests in flight
        self._carried = 0  # calls those requests carry
        self._queue: list[Call] = []
        # The lane: a call that finds nothing in flight takes its one token (take() and
        # ended() are atomic under the GIL) and sends without taking the lock; it is a lone
        # request in flight that _busy/_carried do not count. The locked side parks the token
        # (takes it itself, _parked) whenever it finds it free, and puts it back only when
        # nothing is in flight (_unpark): so a free token means _busy == 0 and no lane call.
        # The lane's holder puts the token back BEFORE it looks at the queue, and a queuing
        # call tries to park it AFTER it has queued: one of the two sees the other, so a
        # queued call is never left behind a lane call that has ended.
        self.lane.reset(self._queue)
        self._parked = False

    def _lane_busy(self) -> int:
        """(Under the lock.) 1 while a lane call is in flight, else 0, the token parked."""
        if self._parked:
            return 0
        if not self.lane.take():
            return 1
        self._parked = True
        return 0

    def _unpark(self) -> None:
        """(Under the lock.) Free the lane once nothing is in flight."""
        if self._parked and not self._busy:
            self._parked = False
            self.lane.give()

    def _ready(self, n: int, lane: int = 0) -> bool:
        """Whether n queued calls may leave now (under the lock): a slot is free and either
        nothing is in flight (so one thread alone never waits) or n calls are at least the
        mean batch in flight (bench/results/profile-issue15.md: the batch sizes with and
        without this balance). lane: the lane's call in flight (1) or not (0)."""
        busy = self._busy + lane
        if busy >= self.limit:
            return False
        return busy == 0 or n * busy >= self._carried + lane

    def _take(self) -> list[Call]:
        """The next request's calls off the queue's head (under the lock; takes a slot)."""
        queue = self._queue
        n, total = 0, 0
        for c in queue:
            total += len(c.data)
            if n and (n >= self.size or total > self.max_bytes):
                break
            n += 1
        group = queue[:n]
        del queue[:n]
        self._busy += 1
        self._carried += n
        return group

    def run(
        self,
        op: str,
        token: str | None,
        data: bytes,
        sender: Sender,
    ) -> tuple[int, Any]:
        """(status, answer) of one call, sent alone or with others: the answer is the body of
        a single request (bytes, not parsed) or a batch item's parsed answer. sender._single(op,
        token, data) sends one call's own request and returns (status, body) or raises;
        sender._send_batch(calls) sends them in one request and sets each call's status and
        answer, error, or alone; it must not raise. (The sender is passed per call, not kept:
        the client owns the group, and a reference back would make a cycle that keeps the
        client's curl handles alive past C_Finalize. The sender itself, not its two bound
        methods: calling sender._single(...) allocates no bound method, and a lone call never
        touches _send_batch.)"""
        the_lane = self.lane
        if the_lane.take():  # the lane: nothing was in flight, no lock taken on the way in or out
            # (The module's core takes this lane itself, in the same steps: _hand_off in
            # pkcs11ws/_native/fastpath.pxi. Keep the two alike.)
            self._flush()  # this thread's earlier wake-ups (a C_GenerateRandom in chunks)
            try:
                return sender._single(op, token, data)
            finally:
                if the_lane.ended():  # the token back first, then a look at the queue
                    self._lane_ended()
        group: list[Call] | None = None
        # lock.acquire()/release() in try/finally rather than `with`: half the cost, and every
        # call, one thread's included, passes here twice (bench/results/profile-issue15.md).
        lock = self._lock
        lock.acquire()
        try:
            lane = self._lane_busy()
            busy = self._busy + lane
            # _ready(1) with an empty queue, inlined: nothing in flight (then nothing is queued
            # either), or a free slot and lone calls in flight.
            if busy == 0 or (
                busy < self.limit and self._carried + lane <= busy and not self._queue
            ):
                self._busy += 1
                self._carried += 1
                call = None
            else:
                call = self._new_call(op, token, data)
                self._queue.append(call)
                if lane:  # queued first, now look again: the lane's call may have ended
                    lane = self._lane_busy()
                if self._ready(len(self._queue), lane):
                    group = self._take()
        finally:
            lock.release()
        if call is None:
            self._flush()  # this thread's earlier wake-ups (a C_GenerateRandom in chunks)
            try:
                return sender._single(op, token, data)
            finally:
                # _release(1) inlined for its usual case, nothing queued (one frame less on
                # every call of one thread).
                lock.acquire()
                try:
                    self._lone += 1
                    self._busy -= 1
                    self._carried -= 1
                    groups = self._dispatch(self._lane_busy()) if self._queue else None
                    self._unpark()
                finally:
                    lock.release()
                if groups:
                    _wake(groups)
        if group is not None:
            if call in group:
                group.remove(call)  # this thread sends (no wake-up): it leads its group
                group.insert(0, call)
            else:  # a longer queue than one request takes: its oldest calls leave first
                group[0].lead = group
                group[0].wake()
                group = None
        if group is None:
            # A wake-up this thread deferred (the group it just handed on) must not wait for
            # this thread to leave the module: that would be after its own wake-up, which may
            # need that group's request to end first.
            self._flush()
            call.wait()  # woken by the sender: the GIL is released while blocked
            group = call.lead
        if group is not None:
            try:
                if len(group) == 1:
                    try:
                        call.status, call.answer = sender._single(op, token, data)
                    except BaseException as e:  # handed to the caller below
                        call.error = e
                else:
                    sender._send_batch(group)
            finally:
                self._release(len(group))
                for other in group:
                    if other is not call:
                        other.wake()
        if call.alone:
            self._flush()
            return sender._single(op, token, data)
        if call.error is not None:
            self._flush()  # the caller's error handling may block (locks, a new login)
            raise call.error
        return call.status, call.answer

    def _release(self, carried: int) -> None:
        """A request ended: its slot goes to the next group of waiting calls, or is freed."""
        lock = self._lock
        lock.acquire()
        try:
            sizes = self._sizes
            sizes[carried] = sizes.get(carried, 0) + 1
            self._busy -= 1
            self._carried -= carried
            groups = self._dispatch(self._lane_busy()) if self._queue else None
            self._unpark()
        finally:
            lock.release()
        if groups:
            _wake(groups)

    def _lane_ended(self) -> None:
        """The lane's call ended (its token back) and calls are queued: send what may go."""
        lock = self._lock
        lock.acquire()
        try:
            groups = self._dispatch(self._lane_busy()) if self._queue else None
            self._unpark()
        finally:
            lock.release()
        if groups:
            _wake(groups)

    def _dispatch(self, lane: int) -> list[list[Call]]:
        """The groups the queue may send now (under the lock; each takes a slot)."""
        groups = []
        while self._queue and self._ready(len(self._queue), lane):
            groups.append(self._take())
        return groups


def _wake(groups: list[list[Call]]) -> None:
    """Each group's oldest call becomes its sender."""
    for group in groups:
        head = group[0]
        head.lead = group
        head.wake()
