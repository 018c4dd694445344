# Included by core.pyx (after wake.pxi): group commit of the read-only crypto calls (issue 15):
# the queue, the slots, who sends. client/group.py is the client's name for it (GroupCommit,
# Call); this is the one place of its rules, in C: at 8 threads most calls queue, and each
# queued call that ran group.py's Python (the locked section, two helper frames, the sender's
# release and dispatch) paid that cold after its wait (bench/results/profile-issue15-client-cpu.md).
#
# Up to `limit` requests (BATCHINFLIGHT per key service) are in flight. A call that finds
# none in flight sends its own single request at once: one thread alone never waits for anyone
# (and takes no lock: it sends on the lane, a C flag tested and set with the GIL held, so the
# one-thread path costs what group commit off does).
# Otherwise calls queue (waiting on their semaphore, the GIL released) until a slot is free and
# the queue holds at least as many calls as the requests in flight carry on average; then the
# call that completes that count sends them (no wake-up first), up to `size` calls (and at most
# `max_bytes` of request bodies) to the batch endpoint; a lone call goes as its single request.
# A lone request in flight lets the next call go at once, so two threads do not wait for each
# other either. When a request ends, the queue leaves on its slot once the same rule lets it,
# at the latest when nothing else is in flight (so a queued call waits only while others'
# requests are in flight). So batches even out: at 8 threads and 2 slots mostly 3 and 4 calls,
# where the first call back from a batch used to take the free slot alone (1 to 6, 2.6 on
# average). Every call gets its own answer or its own error; a failure of the batch request as
# a whole (no answer within the deadline of its oldest call, a 5xx after the retries) is every
# carried call's error. So the slots keep both ends busy while calls pile up, and the
# per-request cost of TLS, HTTP and the service's pipeline is shared by the calls of one batch.
#
# The network part (the single request, the batch request, the decoding of its answers) is the
# client's (client/api.py, and fastpath.pxi's _send_one for the core's own calls); this file
# only decides who sends what and hands answers back.
#
# The state is C fields changed only under the group's Mutex (its C lock taken here without a
# Python call), but the lane's token: a lone call takes and gives it back with the GIL held and
# no lock. The locked sections run no Python code (list and dict operations on the group's own
# objects), so a call that queues and is woken runs no Python frame here at all.

cimport cython
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE

# Below the service's default batch.max_bytes (1 MiB): the JSON around the items and base64
# growth are already in the bodies counted here.
GROUP_MAX_BYTES = 512 * 1024


cdef inline void _mutex_take(Mutex m):
    """m.acquire() without the Python call: one try with the GIL held, else wait without it."""
    if not PyThread_acquire_lock(m.lock, NOWAIT_LOCK):
        with nogil:
            PyThread_acquire_lock(m.lock, WAIT_LOCK)
    m.held = True


cdef inline void _mutex_give(Mutex m) noexcept:
    m.held = False
    PyThread_release_lock(m.lock)


cdef void _wake_groups(list groups):
    """Each group's oldest call becomes its sender."""
    cdef Queued head
    for group in groups:
        head = <Queued>(<list>group)[0]
        head.lead = group
        p11ws_wake(&head.sem)


@cython.final
cdef class Group:
    """Group commit of one client (client/group.py GroupCommit). run() is one call's
    (status, answer): the answer is the body of a single request (bytes, not parsed) or a
    batch item's parsed answer. The sender (the client) is passed per call, not kept: the
    client owns the group, and a reference back would make a cycle that keeps the client's curl
    handles alive past C_Finalize. sender._single(op, token, data) sends one call's own request
    and returns (status, body) or raises; sender._send_batch(calls) sends them in one request
    and sets each call's status and answer, error, or alone; it must not raise."""

    cdef public Py_ssize_t limit
    cdef public Py_ssize_t size
    cdef public Py_ssize_t max_bytes
    cdef public Py_ssize_t _busy        # requests in flight (the lane's call not counted)
    cdef public Py_ssize_t _carried     # calls those requests carry
    cdef public Py_ssize_t _lone        # lone calls' single requests sent on a slot
    cdef public bint _parked            # the lane's token taken by the locked side
    cdef dict _sizes                    # other requests sent, by the number of calls carried
    cdef readonly list _queue
    cdef readonly Lane lane
    cdef readonly Mutex _lock
    # Tests only: called (holding the lock) when a queuing call has found the lane's call in
    # flight, before it queues; the one point where that call can end in between (the locked
    # section runs no Python code otherwise). None in use.
    cdef public object _hook

    def __init__(self, Py_ssize_t limit, Py_ssize_t size, Py_ssize_t max_bytes=GROUP_MAX_BYTES):
        self.limit = limit
        self.size = size
        self.max_bytes = max_bytes
        self._sizes = {}
        # Made once and renewed in place by reset(): the provider's fast-path entries keep it.
        self._queue = []
        self.lane = Lane(self._queue)
        self.reset()

    @property
    def sizes(self) -> dict:
        """Requests sent so far by the number of calls they carried (a copy)."""
        sizes = dict(self._sizes)
        lone = self._lone + self.lane.sent
        if lone:
            sizes[1] = sizes.get(1, 0) + lone
        return sizes

    def reset(self) -> None:
        """A fresh state (after fork: the parent's waiting threads do not exist here)."""
        self._lock = Mutex()
        self._busy = 0
        self._carried = 0
        self._queue = []
        # The lane: a call that finds nothing in flight takes its one token (tested and set
        # with the GIL held) and sends without taking the lock; it is a lone request in flight
        # that _busy/_carried do not count. The locked side parks the token (takes it itself,
        # _parked) whenever it finds it free, and puts it back only when nothing is in flight
        # (_unpark): so a free token means _busy == 0 and no lane call. The lane's holder puts
        # the token back BEFORE it looks at the queue, and a queuing call tries to park it
        # AFTER it has queued: one of the two sees the other, so a queued call is never left
        # behind a lane call that has ended.
        self.lane.free = True
        self.lane.queue = self._queue
        self._parked = False

    cpdef int _lane_busy(self) noexcept:
        """(Under the lock.) 1 while a lane call is in flight, else 0, the token parked."""
        if self._parked:
            return 0
        if not self.lane.free:
            return 1
        self.lane.free = False
        self._parked = True
        return 0

    cdef inline void _unpark(self):
        """(Under the lock.) Free the lane once nothing is in flight."""
        if self._parked and not self._busy:
            self._parked = False
            self.lane.free = True

    cdef inline bint _ready(self, Py_ssize_t n, int lane):
        """Whether n queued calls may leave now (under the lock): a slot is free and either
        nothing is in flight (so one thread alone never waits) or n calls are at least the
        mean batch in flight (bench/results/profile-issue15.md: the batch sizes with and
        without this balance). lane: the lane's call in flight (1) or not (0)."""
        cdef Py_ssize_t busy = self._busy + lane
        if busy >= self.limit:
            return False
        return busy == 0 or n * busy >= self._carried + lane

    cdef list _take(self):
        """The next request's calls off the queue's head (under the lock; takes a slot)."""
        cdef list queue = self._queue
        cdef Py_ssize_t n = 0, total = 0, i
        for i in range(PyList_GET_SIZE(queue)):
            total += PyBytes_GET_SIZE((<Queued>queue[i]).data)
            if n and (n >= self.size or total > self.max_bytes):
                break
            n += 1
        group = queue[:n]
        del queue[:n]
        self._busy += 1
        self._carried += n
        return group

    cdef list _dispatch(self, int lane):
        """The groups the queue may send now (under the lock; each takes a slot), or None."""
        cdef list groups = None
        while PyList_GET_SIZE(self._queue) and self._ready(PyList_GET_SIZE(self._queue), lane):
            if groups is None:
                groups = []
            groups.append(self._take())
        return groups

    cpdef _release(self, Py_ssize_t carried):
        """A request that carried `carried` calls ended: its slot goes to the next group of
        waiting calls, or is freed (carried 0: the tests' pretended requests)."""
        cdef Mutex lock = self._lock
        cdef list groups = None
        _mutex_take(lock)
        try:
            self._sizes[carried] = self._sizes.get(carried, 0) + 1
            self._busy -= 1
            self._carried -= carried
            if PyList_GET_SIZE(self._queue):
                groups = self._dispatch(self._lane_busy())
            self._unpark()
        finally:
            _mutex_give(lock)
        if groups is not None:
            _wake_groups(groups)

    cdef void _lane_ended(self) except *:
        """The lane's call ended (its token back) and calls are queued: send what may go."""
        cdef Mutex lock = self._lock
        cdef list groups = None
        _mutex_take(lock)
        try:
            if PyList_GET_SIZE(self._queue):
                groups = self._dispatch(self._lane_busy())
            self._unpark()
        finally:
            _mutex_give(lock)
        if groups is not None:
            _wake_groups(groups)

    cdef inline object _send(self, int which, str op, object token, bytes data, object sender):
        """One call's own single request: the core's (fastpath.pxi _send_one) for the core's
        fast path (which: its OP_*), else the client's _single()."""
        if which >= 0:
            return _send_one(sender, which, data)
        return sender._single(op, token, data)

    def run(self, str op not None, object token, bytes data not None, object sender):
        """(status, answer) of one call, sent alone or with others (see the class)."""
        return self._run(-1, op, token, data, sender)

    cdef object _run(self, int which, str op, object token, bytes data, object sender):
        cdef Lane ln = self.lane
        cdef Mutex lock
        cdef Queued call = None
        cdef list group = None
        cdef list groups = None
        cdef int lane
        cdef Py_ssize_t busy, i
        cdef bint alone = False
        if ln.free:  # the lane: nothing was in flight, no lock taken on the way in or out
            ln.free = False
            p11ws_flush_wakes()  # this thread's earlier wake-ups (a C_GenerateRandom in chunks)
            try:
                return self._send(which, op, token, data, sender)
            finally:
                ln.sent += 1
                ln.free = True  # the token back first, then a look at the queue
                if PyList_GET_SIZE(ln.queue):
                    self._lane_ended()
        lock = self._lock
        _mutex_take(lock)
        try:
            lane = self._lane_busy()
            if lane and self._hook is not None:
                self._hook()
            busy = self._busy + lane
            # _ready(1) with an empty queue: nothing in flight (then nothing is queued
            # either), or a free slot and lone calls in flight.
            if busy == 0 or (busy < self.limit and self._carried + lane <= busy
                             and not PyList_GET_SIZE(self._queue)):
                self._busy += 1
                self._carried += 1
                alone = True
            else:
                call = Queued.__new__(Queued)
                call.op = op
                call.token = token
                call.data = data
                self._queue.append(call)
                if lane:  # queued first, now look again: the lane's call may have ended
                    lane = self._lane_busy()
                if self._ready(PyList_GET_SIZE(self._queue), lane):
                    group = self._take()
        finally:
            _mutex_give(lock)
        if alone:
            p11ws_flush_wakes()
            try:
                return self._send(which, op, token, data, sender)
            finally:
                _mutex_take(lock)
                try:
                    self._lone += 1
                    self._busy -= 1
                    self._carried -= 1
                    if PyList_GET_SIZE(self._queue):
                        groups = self._dispatch(self._lane_busy())
                    self._unpark()
                finally:
                    _mutex_give(lock)
                if groups is not None:
                    _wake_groups(groups)
        if group is not None:
            for i in range(PyList_GET_SIZE(group)):
                if group[i] is call:
                    if i:  # this thread sends (no wake-up): it leads its group
                        del group[i]
                        group.insert(0, call)
                    break
            else:  # a longer queue than one request takes: its oldest calls leave first
                _wake_groups([group])
                group = None
        if group is None:
            # A wake-up this thread deferred (the group it just handed on) must not wait for
            # this thread to leave the module: that would be after its own wake-up, which may
            # need that group's request to end first.
            p11ws_flush_wakes()
            with nogil:  # woken by the sender
                p11ws_sem_wait(&call.sem)
            group = call.lead
            call.lead = None  # no cycle left for the garbage collector
        if group is not None:
            try:
                if PyList_GET_SIZE(group) == 1:
                    try:
                        call.status, call.answer = self._send(which, op, token, data, sender)
                    except BaseException as e:  # handed to the caller below
                        call.error = e
                elif which >= 0:  # the core's fast path leads: its batch request in C
                    _send_batch(sender, group)
                else:
                    sender._send_batch(group)
            finally:
                self._release(PyList_GET_SIZE(group))
                for other in group:
                    if other is not call:
                        p11ws_wake(&(<Queued>other).sem)
        if call.alone:
            p11ws_flush_wakes()
            return self._send(which, op, token, data, sender)
        if call.error is not None:
            p11ws_flush_wakes()  # the caller's error handling may block (locks, a new login)
            raise call.error
        return call.status, call.answer
