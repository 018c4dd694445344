# Included by core.pyx: what the group commit (group.pxi) waits on.
# A queued call is a Queued (its fields and a POSIX semaphore it waits on, the GIL released).
# The thread that sends a batch wakes its calls while it still runs Python: woken at once,
# each would find the GIL held by its waker and block a second time on the GIL's mutex (most
# of the 8-thread client's kernel time: bench/results/profile-issue15.md). So a wake-up made
# inside _in_python is deferred until that thread has let go of the GIL, and each woken caller
# finds it free; Group._run flushes them earlier when the thread is about to block (waiting
# itself, a request, an error). Outside _in_python (a Python host using the client directly)
# a wake-up is immediate.

cdef extern from *:
    """
    #include <semaphore.h>
    #include <errno.h>
    #define P11WS_MAX_DEFERRED 64
    static __thread sem_t *p11ws_deferred[P11WS_MAX_DEFERRED];
    static __thread int p11ws_ndeferred;
    static __thread int p11ws_in_core;

    /* Post the wake-ups deferred by this thread (called with or without the GIL). */
    static void p11ws_flush_wakes(void)
    {
        int i, n = p11ws_ndeferred;
        p11ws_ndeferred = 0;
        for (i = 0; i < n; i++)
            sem_post(p11ws_deferred[i]);
    }

    /* Wake at once, or when this thread leaves _in_python. */
    static void p11ws_wake(sem_t *s)
    {
        if (p11ws_in_core && p11ws_ndeferred < P11WS_MAX_DEFERRED)
            p11ws_deferred[p11ws_ndeferred++] = s;
        else
            sem_post(s);
    }

    static int p11ws_sem_wait(sem_t *s)
    {
        int r;
        while ((r = sem_wait(s)) != 0 && errno == EINTR)
            ;
        return r;
    }
    """
    ctypedef struct sem_t:
        pass
    int sem_init(sem_t* s, int pshared, unsigned int value) nogil
    int sem_destroy(sem_t* s) nogil
    int p11ws_sem_wait(sem_t* s) nogil
    void p11ws_wake(sem_t* s) nogil
    void p11ws_flush_wakes() nogil
    int p11ws_in_core


cdef class Queued:
    """One queued call of the group commit (group.pxi; client/group.py's Call): what it sends,
    the answer its sender leaves for it, and the POSIX semaphore it waits on, in one object
    made in C (no Python __init__ frame, no second object for the wait, the start time read
    here: per queued call at 8 threads, issue 15). wait() blocks (without the GIL) until
    wake(), which wakes at once or, inside _in_python, once the waking thread has released the
    GIL. Group._run makes it with Queued.__new__ and sets the fields itself."""

    cdef sem_t sem
    cdef public object op
    cdef public object token
    cdef public bytes data
    cdef public double started          # _now(), time.monotonic()'s clock: TIMEOUT counts from it
    cdef public object status
    cdef public object answer
    cdef public object error
    cdef public object lead             # set on the call chosen to send the next request
    cdef public bint alone              # set when the batch endpoint is unusable

    def __cinit__(self) -> None:
        if sem_init(&self.sem, 0, 0) != 0:
            raise OSError("sem_init failed")
        self.started = _now()
        self.status = 0

    def __init__(self, op: str, token: object, data: bytes) -> None:
        self.op = op
        self.token = token
        self.data = data

    def __dealloc__(self) -> None:
        sem_destroy(&self.sem)

    def wait(self) -> None:
        with nogil:
            p11ws_sem_wait(&self.sem)

    def wake(self) -> None:
        # The waiting thread holds this object until it wakes, so it outlives a deferred post.
        p11ws_wake(&self.sem)


def flush_wakes() -> None:
    """Post this thread's deferred wake-ups now (before it blocks on something else)."""
    p11ws_flush_wakes()


cdef class Lane:
    """Group commit's lane (group.pxi): the one token a lone call takes when nothing is in
    flight. A C flag tested and set with the GIL held, so at one thread group commit on costs
    the call a C test and a few stores more than off, no Python operation (issue 15: nothing
    slower at one thread). The object lives as long as its group; Group.reset() (after fork)
    renews it in place, so a reference kept to it (the provider's fast-path entries) never goes
    stale."""

    cdef readonly bint free
    cdef readonly Py_ssize_t sent       # requests the lane sent (written only by its holder)
    cdef readonly list queue            # the group's queue: looked at after the token is back

    def __cinit__(self, list queue not None) -> None:
        self.free = True
        self.queue = queue


from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)


cdef class Mutex:
    """Group commit's lock (group.pxi Group._lock; Group takes its C lock directly): a
    _thread.lock whose acquire() takes no arguments. _thread.lock.acquire() parses its
    (empty) arguments with PyArg_ParseTupleAndKeywords, ~300-400 instructions, and at 8
    threads every call takes the lock once or twice (issue 15, Round 7's notes). Uncontended,
    acquire() is one non-blocking try with the GIL held; contended, it waits without the GIL.
    The methods (acquire, release, locked, the with statement) are the tests' way in."""

    cdef PyThread_type_lock lock
    cdef bint held

    def __cinit__(self) -> None:
        self.lock = PyThread_allocate_lock()
        if self.lock is NULL:
            raise MemoryError()

    def __dealloc__(self) -> None:
        if self.lock is not NULL:
            if self.held:
                PyThread_release_lock(self.lock)
            PyThread_free_lock(self.lock)

    def acquire(self) -> bool:
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
        self.held = True
        return True

    def release(self) -> None:
        if not self.held:
            raise RuntimeError("release unlocked lock")
        self.held = False
        PyThread_release_lock(self.lock)

    def locked(self) -> bool:
        # The lock itself, not `held` (set only once the waiter has the GIL back).
        if PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            PyThread_release_lock(self.lock)
            return False
        return True

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
