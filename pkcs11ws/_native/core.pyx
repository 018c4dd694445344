# cython: language_level=3
"""Cython core of pkcs11ws: the PKCS#11 function lists and everything that needs no network.

The loader (libpkcs11ws.so) takes the CK_FUNCTION_LIST_3_0 from p11ws_core_function_list() and
jumps straight into the f_* functions here. They run without the GIL: argument checks, the
session/object/slot tables, operation state, CK_ATTRIBUTE and buffer handling, length queries.
The GIL is taken only to reach the Python provider (pkcs11ws.provider), once per operation, and
every such block catches everything and maps it through _ckr(), the one error funnel.

Files: tables.pxi (C tables), objects.pxi (objects, find, attributes), params.pxi (one parser
per mechanism parameter kind), crypto.pxi (keys, single-part encrypt, decrypt, sign, verify,
random), multipart.pxi (C_*Update, C_*Final), digest.pxi (C_Digest*, in the module), funcs.pxi
(generated: stubs and the list filling), wake.pxi (the group commit's waits), group.pxi
(group commit: the queue, the slots, who sends), fastpath.pxi and batchpath.pxi (the
steady-state crypto request and the batch request, built, sent and read in C).
"""

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strcmp
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pkcs11ws._native.ck cimport *  # noqa: F403
from pkcs11ws._native.ck_gen cimport *  # noqa: F403
from pkcs11ws._native.tables cimport *  # noqa: F403

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)
import sys

from pkcs11ws import __version__ as _version
from pkcs11ws import mechanisms as _mechanisms
from pkcs11ws.errors import ConfigError, PKCS11Error
from pkcs11ws.log import SESSION as _log_session

include "tables.pxi"
include "wake.pxi"
include "group.pxi"

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char*, size_t)

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_equal(pthread_t, pthread_t)

cdef extern from "probe.h" nogil:
    long p11ws_copy_cstring(const void* src, char* out, size_t cap)

# The longest pReserved string read (with its NUL): `config=` and a path.
cdef enum:
    RESERVED_MAX = 4096

# C_GetInfo's libraryVersion: major.minor of the package version (pkcs11ws/__init__.py).
cdef unsigned char g_version_major = int(_version.split(".")[0])
cdef unsigned char g_version_minor = int(_version.split(".")[1])
cdef pthread_mutex_t g_state_lock
cdef pthread_t g_state_owner            # the thread holding g_state_lock, while g_state_busy
cdef int g_state_busy = 0
cdef int g_state = 0                    # 1 between C_Initialize and C_Finalize
cdef object g_provider = None           # pkcs11ws.provider.Provider while initialised
cdef list g_leaked = []                 # providers inherited through fork(): never closed
cdef double g_slots_refreshed = -1e9    # monotonic time of the last slot refresh
cdef CK_FUNCTION_LIST g_fl240
cdef CK_FUNCTION_LIST_3_0 g_fl30
cdef CK_INTERFACE g_ifaces[2]
cdef char* IFACE_NAME = b"PKCS 11"

# A buffer-carrying C_GetSlotList right after a length query reuses that query's answer.
cdef double SLOT_REFRESH_S = 2.0


# ---- the error funnel and helpers ------------------------------------------------------------

cdef CK_RV _ckr(object e) noexcept:
    """The one place an exception becomes a CKR (called with the GIL, never raises)."""
    try:
        if isinstance(e, PKCS11Error):
            return <CK_RV>(int(e.ckr) & 0xFFFFFFFFFFFFFFFF)
        if isinstance(e, MemoryError):
            return CKR_HOST_MEMORY
        _log_unexpected(e)
    except BaseException:
        pass
    return CKR_GENERAL_ERROR


def _log_unexpected(e: BaseException) -> None:
    import traceback

    from pkcs11ws.log import LOG

    frames = traceback.extract_tb(e.__traceback__)
    last = frames[len(frames) - 1] if frames else None
    at = f" at {last.filename}:{last.lineno}" if last is not None else ""
    LOG.error(f"internal error: {type(e).__name__}: {e}{at}")


cdef inline CK_RV _ready() noexcept nogil:
    return CKR_OK if p11ws_aload(&g_state) else CKR_CRYPTOKI_NOT_INITIALIZED


cdef CK_RV _unsupported(CK_RV rv) noexcept nogil:
    if not p11ws_aload(&g_state):
        return CKR_CRYPTOKI_NOT_INITIALIZED
    return rv


# The value this thread last gave log.SESSION.session (a C thread-local: its lifetime is the
# thread's, as is the Python thread-local's value). Setting the Python thread-local costs ~800
# instructions and touches the thread-state dict, the local's dict and weakref (cold after every
# wait for an answer: bench/results/profile-issue15-client-cpu.md, round 9); a thread mostly
# works for one session, so the core sets it only when it changes. The core is the only writer
# inside the module (log.set_session() is for Python callers, and an unset value reads as 0,
# the C cache's start).
cdef extern from *:
    """
    static __thread unsigned long p11ws_log_session_set;
    """
    unsigned long p11ws_log_session_set


cdef inline void _log_session_set(CK_SESSION_HANDLE h):
    global p11ws_log_session_set
    if p11ws_log_session_set != h:
        _log_session.session = h
        p11ws_log_session_set = h


cdef object _prov_s(CK_SESSION_HANDLE h):
    """The provider, for work on behalf of session h (0: none): the log lines it causes carry
    h (log.set_session, inlined: the thread-local set only when it changes, no Python frame)."""
    p = g_provider
    if p is None:
        raise PKCS11Error(CKR_CRYPTOKI_NOT_INITIALIZED)
    _log_session_set(h)
    return p


cdef object _prov():
    return _prov_s(0)


# ---- the one door into Python ----------------------------------------------------------------

cdef struct Call:
    # The C values a work function (below, and in the .pxi files) reads and writes; which ones
    # depends on the work. Made by _call() with everything else zero.
    CK_SESSION_HANDLE h         # the session the work is for (its log lines carry it), or 0
    CK_SLOT_ID slot
    Session* s
    int which                   # OP_ENCRYPT ... OP_VERIFY
    OpState* op                 # a copy of the session's operation state
    CK_MECHANISM_TYPE mech
    CK_OBJECT_HANDLE obj
    CK_BYTE* data
    CK_ULONG data_len
    CK_BYTE* data2
    CK_ULONG data2_len
    CK_BYTE* out
    CK_ULONG* out_len
    CK_ATTRIBUTE* tmpl
    CK_ULONG count
    CK_ATTRIBUTE* tmpl2         # C_GenerateKeyPair: the private key's template
    CK_ULONG count2
    CK_ULONG result             # a handle, a size, a flag: the work's one number
    CK_ULONG result2            # C_GenerateKeyPair: the private key's handle
    CK_OBJECT_HANDLE* found


# A work function runs with the GIL and may raise anything; it returns the CKR (CKR_OK, or one
# such as CKR_BUFFER_TOO_SMALL that is an answer rather than a failure). 0xFFFFFFFF is its
# "look for an exception" marker (a literal: Cython compares it as written, and an enum constant
# there is truncated to int).
ctypedef CK_RV (*PyWork)(Call* c) except? 0xFFFFFFFF


cdef inline Call _call(CK_SESSION_HANDLE h, CK_SLOT_ID slot) noexcept nogil:
    cdef Call c
    memset(&c, 0, sizeof(Call))
    c.h = h
    c.slot = slot
    return c


cdef CK_RV _in_python(PyWork work, Call* c) noexcept nogil:
    """Every f_* that needs the provider goes through here: adopt the calling thread once
    (pyglue.h), take the GIL, run `work`, and turn whatever it raises into a CKR through
    _ckr(), the one error funnel."""
    global p11ws_in_core
    cdef CK_RV rv
    p11ws_adopt_thread()
    with gil:
        p11ws_in_core += 1
        try:
            rv = work(c)
        except BaseException as e:
            rv = _ckr(e)
        p11ws_in_core -= 1
    if p11ws_in_core == 0:
        p11ws_flush_wakes()  # the group commit's wake-ups, now that the GIL is free (wake.pxi)
    return rv


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef CK_RV _session_slot(CK_SESSION_HANDLE h, CK_SLOT_ID* slot, CK_FLAGS* flags) noexcept nogil:
    cdef Session* s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        slot[0] = s.slot
        if flags != NULL:
            flags[0] = s.flags
        return CKR_OK
    finally:
        _session_put(s)


cdef CK_RV _py_refresh_slots(Call* c) except? 0xFFFFFFFF:
    _prov().refresh_slots()
    return CKR_OK


cdef CK_RV _refresh_slots() noexcept nogil:
    global g_slots_refreshed
    cdef Call c = _call(0, 0)
    cdef CK_RV rv = _in_python(_py_refresh_slots, &c)
    if rv == CKR_OK:
        g_slots_refreshed = _now()
    return rv


cdef CK_RV _slot_find(CK_SLOT_ID slotID, SlotRow* row) noexcept nogil:
    """A slot's row. An ID this process has not seen yet (a call before any C_GetSlotList, or a
    softcard created since) costs one look at the service, then CKR_SLOT_ID_INVALID."""
    cdef CK_RV rv
    if _slot_get(slotID, row) == 0:
        return CKR_OK
    rv = _refresh_slots()
    if rv != CKR_OK:
        return rv
    if _slot_get(slotID, row) != 0:
        return CKR_SLOT_ID_INVALID
    return CKR_OK


cdef CK_RV _py_logout(Call* c) except? 0xFFFFFFFF:
    _prov_s(c.h).logout(c.slot)
    return CKR_OK


cdef void _logout_quietly(CK_SLOT_ID slot) noexcept nogil:
    """The slot's last session closed: the login state returns to public (spec)."""
    cdef Call c = _call(0, slot)
    if not _slot_logged_in(slot):
        return
    _slot_set_login(slot, 0)
    _in_python(_py_logout, &c)  # the CKR is logged by the funnel; the close succeeds anyway


# ---- hooks the provider calls (with the GIL) -------------------------------------------------

def slot_update(slot_id: int, present: bool, label: bytes, description: bytes,
                serial: bytes) -> None:
    """Record a slot (IDs are 1, 2, ...) and the strings of its slot and token info."""
    global g_slots, g_nslots
    cdef CK_ULONG sid = slot_id
    cdef SlotRow* grown
    cdef CK_ULONG i
    if sid < 1 or sid > 1 << 20:
        raise ValueError("slot ID out of range")
    pthread_mutex_lock(&g_slot_lock)
    if sid > g_nslots:
        grown = <SlotRow*>realloc(g_slots, sid * sizeof(SlotRow))
        if grown == NULL:
            pthread_mutex_unlock(&g_slot_lock)
            raise MemoryError()
        for i in range(g_nslots, sid):
            memset(&grown[i], 0, sizeof(SlotRow))
        g_slots = grown
        g_nslots = sid
    g_slots[sid - 1].known = 1
    g_slots[sid - 1].present = 1 if present else 0
    _pad(g_slots[sid - 1].label, 32, label, len(label))
    _pad(g_slots[sid - 1].desc, 64, description, len(description))
    _pad(g_slots[sid - 1].serial, 16, serial, len(serial))
    pthread_mutex_unlock(&g_slot_lock)


def slot_set_login(slot_id: int, logged_in: bool) -> None:
    """Mirror of the provider's login state (C_*Init and C_GetSessionInfo read it)."""
    _slot_set_login(slot_id, 1 if logged_in else 0)


def slot_set_pin_flags(slot_id: int, flags: int) -> None:
    """The token's CKF_USER_PIN_* flags (wrong passphrases counted by the key service)."""
    cdef CK_ULONG sid = slot_id
    pthread_mutex_lock(&g_slot_lock)
    if 1 <= sid <= g_nslots:
        g_slots[sid - 1].pin_flags = flags
    pthread_mutex_unlock(&g_slot_lock)


def object_put(handle: int, slot_id: int, cls: int, key_type: int, encrypt: bool,
               decrypt: bool, sign: bool, verify: bool, size: int = 0,
               private: bool = True) -> int:
    """Record an object (handle 0: allocate one); returns its handle. size: a key pair's
    output length (RSA modulus bytes, ECDSA signature bytes); private: CKA_PRIVATE."""
    cdef CK_ULONG usage = ((USE_ENCRYPT if encrypt else 0) | (USE_DECRYPT if decrypt else 0)
                           | (USE_SIGN if sign else 0) | (USE_VERIFY if verify else 0))
    cdef CK_OBJECT_HANDLE h = _obj_put(handle, slot_id, cls, key_type, usage, size,
                                       1 if private else 0)
    if h == 0:
        raise MemoryError()
    return h


def object_drop(handle: int) -> None:
    _obj_drop(handle)


cdef extern from "<link.h>":
    struct dl_phdr_info:
        const char* dlpi_name
    int dl_iterate_phdr(int (*callback)(dl_phdr_info*, size_t, void*) noexcept, void* data)


cdef int _add_loaded(dl_phdr_info* info, size_t size, void* data) noexcept:
    # Called by dl_iterate_phdr in loaded_objects()'s thread, which holds the GIL.
    if info.dlpi_name != NULL and info.dlpi_name[0] != 0:
        try:
            (<list>data).append(<bytes>info.dlpi_name)
        except BaseException:
            return 1
    return 0


def loaded_objects() -> list:
    """The file names of the loaded shared objects as they were loaded (a symlink keeps its
    name): what the log's library name is found from, without importing ctypes."""
    names = []
    dl_iterate_phdr(_add_loaded, <void*>names)
    return names


def current_provider() -> object:
    """The live Provider (None when not initialised): for tests and diagnostics."""
    return g_provider


def cryptoki_version() -> tuple[int, int]:
    """The PKCS#11 version C_GetInfo reports, as (major, minor)."""
    return (2, 40)


def _after_fork_child() -> None:
    # Python side of the fork child (os.register_at_fork, run by PyOS_AfterFork_Child): the
    # inherited provider's curl handles share TLS streams with the parent. The provider is
    # kept referenced forever and its client drops (never closes) those handles.
    global g_provider
    p = g_provider
    g_provider = None
    _digests_clear()
    if p is not None:
        g_leaked.append(p)
        try:
            p.after_fork_child()
        except BaseException as e:
            _ckr(e)


# ---- the capsule API the loader uses ---------------------------------------------------------

cdef api CK_FUNCTION_LIST_3_0* p11ws_core_function_list() noexcept nogil:
    return &g_fl30


cdef api void p11ws_core_fork(int phase) noexcept nogil:
    """pthread_atfork from the loader: 0 prepare, 1 parent, 2 child."""
    if phase == 0:
        pthread_mutex_lock(&g_sess_lock)
        pthread_mutex_lock(&g_slot_lock)
        pthread_mutex_lock(&g_obj_lock)
        return
    pthread_mutex_unlock(&g_obj_lock)
    pthread_mutex_unlock(&g_slot_lock)
    pthread_mutex_unlock(&g_sess_lock)
    if phase == 2:
        # The child starts uninitialised: C_Initialize again before any other call.
        pthread_mutex_init(&g_state_lock, NULL)
        p11ws_astore(&g_state_busy, 0)
        p11ws_astore(&g_state, 0)
        _sessions_forget_all()


# ---- general purpose -------------------------------------------------------------------------

cdef CK_RV _initialize(const char* reserved, bint no_threads) noexcept:
    global g_provider
    path = None
    try:
        if reserved != NULL:
            text = <bytes>reserved[:strnlen(reserved, RESERVED_MAX)]
            if text.startswith(b"config="):
                path = os.fsdecode(text[7:])
        from pkcs11ws.provider import Provider

        _log_session_set(0)
        g_provider = Provider(path, sys.modules[__name__], no_threads=no_threads)
        return CKR_OK
    except ConfigError as e:
        # The log may not be configured (its settings are in the file that failed): stderr too.
        try:
            sys.stderr.write(f"libpkcs11ws: C_Initialize: {e.message}\n")
            sys.stderr.flush()
            from pkcs11ws.log import report_config_error

            report_config_error(f"C_Initialize: {e.message}", path)
        except BaseException:
            pass
        return _ckr(e)
    except BaseException as e:
        if not isinstance(e, PKCS11Error):
            # No log is configured yet, so the reason goes to stderr.
            try:
                sys.stderr.write(f"libpkcs11ws: C_Initialize: {type(e).__name__}: {e}\n")
                sys.stderr.flush()
            except BaseException:
                pass
        return _ckr(e)


cdef bint _state_lock() noexcept nogil:
    """Take g_state_lock (C_Initialize, C_Finalize); False, not taken, when this thread holds it
    already. Such a call comes back from inside C_Initialize: an import the provider makes
    initialises OpenSSL, whose configuration loads pkcs11-provider early, which calls
    C_Initialize on this module. Waiting would wait for ourselves, for ever."""
    global g_state_owner
    if p11ws_aload(&g_state_busy) and pthread_equal(g_state_owner, pthread_self()):
        return False
    p11ws_lock_gil_aware(&g_state_lock)
    g_state_owner = pthread_self()
    p11ws_astore(&g_state_busy, 1)
    return True


cdef void _state_unlock() noexcept nogil:
    p11ws_astore(&g_state_busy, 0)
    pthread_mutex_unlock(&g_state_lock)


cdef CK_RV f_Initialize(CK_VOID_PTR pInitArgs) noexcept nogil:
    cdef CK_C_INITIALIZE_ARGS* a = <CK_C_INITIALIZE_ARGS*>pInitArgs
    cdef const char* reserved = NULL
    cdef char reserved_copy[RESERVED_MAX]
    cdef int nmutex
    cdef CK_RV rv
    cdef bint no_threads = False
    if a != NULL:
        nmutex = ((a.CreateMutex != NULL) + (a.DestroyMutex != NULL) + (a.LockMutex != NULL)
                  + (a.UnlockMutex != NULL))
        if nmutex != 0 and nmutex != 4:
            return CKR_ARGUMENTS_BAD
        if nmutex == 4 and not (a.flags & CKF_OS_LOCKING_OK):
            return CKR_CANT_LOCK
        # GnuTLS (through p11-kit) sets it: then the client resolves the service's host name
        # in the calling thread, so libcurl starts no resolver thread of its own.
        no_threads = (a.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS) != 0
        if a.pReserved != NULL:
            # A string (p11-kit and pkcs11-provider pass free-form ones; `config=PATH` is read,
            # anything else ignored) or a pointer the host got wrong: copied without faulting.
            if p11ws_copy_cstring(a.pReserved, reserved_copy, RESERVED_MAX) < 0:
                return CKR_ARGUMENTS_BAD
            reserved = reserved_copy
    if not _state_lock():
        return CKR_FUNCTION_FAILED  # called back from inside our own C_Initialize: _state_lock
    if g_state:
        _state_unlock()
        return CKR_CRYPTOKI_ALREADY_INITIALIZED
    p11ws_adopt_thread()
    with gil:
        rv = _initialize(reserved, no_threads)
    if rv == CKR_OK:
        p11ws_astore(&g_state, 1)
    _state_unlock()
    return rv


cdef CK_RV _py_nested(Call* c) except? 0xFFFFFFFF:
    if _prov().in_request():
        from pkcs11ws.log import LOG

        LOG.warning("C_Finalize refused: called from inside a key service request")
        c.result = 1
    return CKR_OK


cdef bint _finalize_nested() noexcept nogil:
    cdef Call c = _call(0, 0)
    _in_python(_py_nested, &c)
    return c.result == 1


cdef CK_RV f_Finalize(CK_VOID_PTR pReserved) noexcept nogil:
    global g_provider
    cdef CK_ULONG i
    if not _state_lock():
        return CKR_FUNCTION_FAILED  # called back from inside our own C_Initialize: _state_lock
    if not g_state:
        _state_unlock()
        return CKR_CRYPTOKI_NOT_INITIALIZED
    if pReserved != NULL:
        _state_unlock()
        return CKR_ARGUMENTS_BAD
    if _finalize_nested():
        # From inside one of our own requests on this thread (pkcs11-provider loaded early
        # by OpenSSL while libcurl starts, giving up): finalizing would pull the state from
        # under the request in progress, and the caller never initialised us anyway.
        _state_unlock()
        return CKR_FUNCTION_FAILED
    p11ws_astore(&g_state, 0)
    _sessions_close_slot(0, True)
    pthread_mutex_lock(&g_slot_lock)
    for i in range(g_nslots):
        g_slots[i].logged_in = 0
    pthread_mutex_unlock(&g_slot_lock)
    p11ws_adopt_thread()
    with gil:
        p = g_provider
        g_provider = None
        _digests_clear()
        try:
            _log_session_set(0)
            if p is not None:
                p.finalize()
        except BaseException as e:
            _ckr(e)
    _state_unlock()
    return CKR_OK


cdef CK_RV f_GetInfo(CK_INFO_PTR pInfo) noexcept nogil:
    cdef CK_RV rv = _ready()
    if rv != CKR_OK:
        return rv
    if pInfo == NULL:
        return CKR_ARGUMENTS_BAD
    memset(pInfo, 0, sizeof(CK_INFO))
    pInfo.cryptokiVersion.major = 2
    pInfo.cryptokiVersion.minor = 40
    _pad(pInfo.manufacturerID, 32, <const unsigned char*>b"pkcs11ws", 8)
    _pad(pInfo.libraryDescription, 32, <const unsigned char*>b"pkcs11ws WSOP-compatible", 24)
    pInfo.libraryVersion.major = g_version_major
    pInfo.libraryVersion.minor = g_version_minor
    return CKR_OK


cdef CK_RV f_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) noexcept nogil:
    if ppFunctionList == NULL:
        return CKR_ARGUMENTS_BAD
    ppFunctionList[0] = &g_fl240
    return CKR_OK


cdef CK_RV f_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList,
                              CK_ULONG_PTR pulCount) noexcept nogil:
    if pulCount == NULL:
        return CKR_ARGUMENTS_BAD
    if pInterfacesList == NULL:
        pulCount[0] = 2
        return CKR_OK
    if pulCount[0] < 2:
        pulCount[0] = 2
        return CKR_BUFFER_TOO_SMALL
    pInterfacesList[0] = g_ifaces[0]
    pInterfacesList[1] = g_ifaces[1]
    pulCount[0] = 2
    return CKR_OK


cdef CK_RV f_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                          CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags) noexcept nogil:
    cdef int i
    cdef CK_VERSION* v
    if ppInterface == NULL:
        return CKR_ARGUMENTS_BAD
    if pInterfaceName != NULL and strcmp(<const char*>pInterfaceName, IFACE_NAME) != 0:
        return CKR_ARGUMENTS_BAD
    for i in range(2):
        v = <CK_VERSION*>g_ifaces[i].pFunctionList
        if pVersion != NULL and (pVersion.major != v.major or pVersion.minor != v.minor):
            continue
        if (flags & g_ifaces[i].flags) != flags:
            continue
        ppInterface[0] = &g_ifaces[i]
        return CKR_OK
    return CKR_ARGUMENTS_BAD


# ---- slots and tokens ------------------------------------------------------------------------

cdef CK_RV f_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList,
                         CK_ULONG_PTR pulCount) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_ULONG i, n = 0
    if rv != CKR_OK:
        return rv
    if pulCount == NULL:
        return CKR_ARGUMENTS_BAD
    if pSlotList == NULL or _now() - g_slots_refreshed > SLOT_REFRESH_S:
        rv = _refresh_slots()
        if rv != CKR_OK:
            return rv
    pthread_mutex_lock(&g_slot_lock)
    for i in range(g_nslots):
        if g_slots[i].known and (g_slots[i].present or not tokenPresent):
            n += 1
    if pSlotList != NULL:
        if pulCount[0] < n:
            rv = CKR_BUFFER_TOO_SMALL
        else:
            n = 0
            for i in range(g_nslots):
                if g_slots[i].known and (g_slots[i].present or not tokenPresent):
                    pSlotList[n] = i + 1
                    n += 1
    pthread_mutex_unlock(&g_slot_lock)
    pulCount[0] = n
    return rv


cdef CK_RV f_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef SlotRow row
    if rv != CKR_OK:
        return rv
    if pInfo == NULL:
        return CKR_ARGUMENTS_BAD
    rv = _slot_find(slotID, &row)
    if rv != CKR_OK:
        return rv
    memset(pInfo, 0, sizeof(CK_SLOT_INFO))
    memcpy(pInfo.slotDescription, row.desc, 64)
    _pad(pInfo.manufacturerID, 32, <const unsigned char*>b"pkcs11ws", 8)
    # A softcard can be deleted on the service: the token is removable.
    pInfo.flags = CKF_REMOVABLE_DEVICE | (CKF_TOKEN_PRESENT if row.present else 0)
    pInfo.hardwareVersion.major = 0
    pInfo.hardwareVersion.minor = 1
    pInfo.firmwareVersion.major = 0
    pInfo.firmwareVersion.minor = 1
    return CKR_OK


cdef CK_RV f_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef SlotRow row
    if rv != CKR_OK:
        return rv
    if pInfo == NULL:
        return CKR_ARGUMENTS_BAD
    rv = _slot_find(slotID, &row)
    if rv != CKR_OK:
        return rv
    if not row.present:
        return CKR_TOKEN_NOT_PRESENT
    memset(pInfo, 0, sizeof(CK_TOKEN_INFO))
    memcpy(pInfo.label, row.label, 32)
    _pad(pInfo.manufacturerID, 32, <const unsigned char*>b"pkcs11ws", 8)
    _pad(pInfo.model, 16, <const unsigned char*>b"WSOP softcard", 13)
    memcpy(pInfo.serialNumber, row.serial, 16)
    pInfo.flags = (CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED
                   | CKF_TOKEN_INITIALIZED | row.pin_flags)
    pInfo.ulMaxSessionCount = CK_EFFECTIVELY_INFINITE
    pInfo.ulSessionCount = row.sessions
    pInfo.ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE
    pInfo.ulRwSessionCount = row.rw_sessions
    pInfo.ulMaxPinLen = 256
    pInfo.ulMinPinLen = 1
    pInfo.ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION
    pInfo.ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION
    pInfo.ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION
    pInfo.ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION
    pInfo.hardwareVersion.major = 0
    pInfo.hardwareVersion.minor = 1
    pInfo.firmwareVersion.major = 0
    pInfo.firmwareVersion.minor = 1
    memset(pInfo.utcTime, 32, 16)
    return CKR_OK


cdef CK_RV f_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList,
                              CK_ULONG_PTR pulCount) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef SlotRow row
    cdef int i
    if rv != CKR_OK:
        return rv
    if pulCount == NULL:
        return CKR_ARGUMENTS_BAD
    rv = _slot_find(slotID, &row)
    if rv != CKR_OK:
        return rv
    if pMechanismList != NULL:
        if pulCount[0] < <CK_ULONG>g_nmechs:
            pulCount[0] = g_nmechs
            return CKR_BUFFER_TOO_SMALL
        for i in range(g_nmechs):
            pMechanismList[i] = g_mechs[i].type
    pulCount[0] = g_nmechs
    return CKR_OK


cdef CK_RV f_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type,
                              CK_MECHANISM_INFO_PTR pInfo) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef SlotRow row
    cdef int i
    if rv != CKR_OK:
        return rv
    if pInfo == NULL:
        return CKR_ARGUMENTS_BAD
    rv = _slot_find(slotID, &row)
    if rv != CKR_OK:
        return rv
    i = _mech_find(type)
    if i < 0:
        return CKR_MECHANISM_INVALID
    pInfo.ulMinKeySize = g_mechs[i].min_key
    pInfo.ulMaxKeySize = g_mechs[i].max_key
    pInfo.flags = g_mechs[i].flags
    return CKR_OK


# ---- sessions and login ----------------------------------------------------------------------

cdef CK_RV f_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication,
                         CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef SlotRow row
    if rv != CKR_OK:
        return rv
    if phSession == NULL:
        return CKR_ARGUMENTS_BAD
    if not (flags & CKF_SERIAL_SESSION):
        return CKR_SESSION_PARALLEL_NOT_SUPPORTED
    rv = _slot_find(slotID, &row)
    if rv != CKR_OK:
        return rv
    if not row.present:
        return CKR_TOKEN_NOT_PRESENT
    return _session_open(slotID, flags & (CKF_RW_SESSION | CKF_SERIAL_SESSION), phSession)


cdef CK_RV f_CloseSession(CK_SESSION_HANDLE hSession) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot = 0
    cdef int last
    if rv != CKR_OK:
        return rv
    last = _session_close(hSession, &slot)
    if last < 0:
        return CKR_SESSION_HANDLE_INVALID
    if last == 1:
        _logout_quietly(slot)
    return CKR_OK


cdef CK_RV f_CloseAllSessions(CK_SLOT_ID slotID) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef SlotRow row
    if rv != CKR_OK:
        return rv
    rv = _slot_find(slotID, &row)
    if rv != CKR_OK:
        return rv
    _sessions_close_slot(slotID, False)
    _logout_quietly(slotID)
    return CKR_OK


cdef CK_RV f_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef bint user
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if pInfo == NULL:
        return CKR_ARGUMENTS_BAD
    user = _slot_logged_in(slot)
    pInfo.slotID = slot
    if flags & CKF_RW_SESSION:
        pInfo.state = CKS_RW_USER_FUNCTIONS if user else CKS_RW_PUBLIC_SESSION
    else:
        pInfo.state = CKS_RO_USER_FUNCTIONS if user else CKS_RO_PUBLIC_SESSION
    pInfo.flags = flags
    pInfo.ulDeviceError = 0
    return CKR_OK


cdef CK_RV _py_login(Call* c) except? 0xFFFFFFFF:
    _prov_s(c.h).login(c.slot, (<char*>c.data)[:c.data_len])
    return CKR_OK


cdef CK_RV f_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin,
                   CK_ULONG ulPinLen) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, NULL)
    if rv != CKR_OK:
        return rv
    if userType == CKU_CONTEXT_SPECIFIC:
        # No key of ours has CKA_ALWAYS_AUTHENTICATE, so no operation ever waits for it.
        return CKR_OPERATION_NOT_INITIALIZED
    if userType != CKU_USER:
        # A softcard has one role, its passphrase holder: there is no security officer.
        return CKR_USER_TYPE_INVALID
    if _slot_logged_in(slot):
        return CKR_USER_ALREADY_LOGGED_IN
    if pPin == NULL:
        return CKR_ARGUMENTS_BAD
    if ulPinLen < 1 or ulPinLen > 256:
        return CKR_PIN_LEN_RANGE
    c = _call(hSession, slot)
    c.data = pPin
    c.data_len = ulPinLen
    rv = _in_python(_py_login, &c)
    if rv == CKR_OK:
        _slot_set_login(slot, 1)
    return rv


cdef CK_RV f_LoginUser(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin,
                       CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pUsername,
                       CK_ULONG ulUsernameLen) noexcept nogil:
    # Softcards have no user names: the passphrase alone identifies the holder.
    return f_Login(hSession, userType, pPin, ulPinLen)


cdef CK_RV f_Logout(CK_SESSION_HANDLE hSession) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, NULL)
    if rv != CKR_OK:
        return rv
    if not _slot_logged_in(slot):
        return CKR_USER_NOT_LOGGED_IN
    _slot_set_login(slot, 0)
    c = _call(hSession, slot)
    return _in_python(_py_logout, &c)


cdef CK_RV f_SessionCancel(CK_SESSION_HANDLE hSession, CK_FLAGS flags) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef int i
    cdef CK_FLAGS bits[N_OPS]
    if rv != CKR_OK:
        return rv
    s = _session_get(hSession)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    bits[0] = CKF_ENCRYPT
    bits[1] = CKF_DECRYPT
    bits[2] = CKF_SIGN
    bits[3] = CKF_VERIFY
    bits[4] = CKF_DIGEST
    try:
        pthread_mutex_lock(&g_sess_lock)
        for i in range(N_OPS):
            if flags & bits[i]:
                _op_clear(&s.ops[i])
        if flags & CKF_FIND_OBJECTS and s.find_active == 1:
            free(s.found)
            s.found = NULL
            s.nfound = s.found_pos = 0
            s.find_active = 0
        pthread_mutex_unlock(&g_sess_lock)
        return CKR_OK
    finally:
        _session_put(s)


include "objects.pxi"
include "params.pxi"
include "fastpath.pxi"
include "batchpath.pxi"
include "crypto.pxi"
include "multipart.pxi"
include "digest.pxi"
include "funcs.pxi"


# ---- module initialisation -------------------------------------------------------------------

cdef int _load_mechanisms() except -1:
    global g_nmechs
    # The kinds' numbers are those of the generated mech_gen.pxd.
    num = _mechanisms.kind_numbers()
    rows = _mechanisms.MECHANISMS
    if len(rows) > MAX_MECHS:
        raise RuntimeError("mechanism table larger than the core's")
    for i, m in enumerate(rows):
        if len(m.key_types) > 4:
            raise RuntimeError(f"{m.name}: more than 4 key types")
        g_mechs[i].type = m.code
        g_mechs[i].flags = m.flags
        g_mechs[i].min_key = m.min_key
        g_mechs[i].max_key = m.max_key
        g_mechs[i].param = num[m.param]
        g_mechs[i].out_len = m.out_len
        g_mechs[i].padded = 1 if m.padded else 0
        g_mechs[i].rule = num[m.out]
        g_mechs[i].multi = num[m.multi]
        g_mechs[i].family = num[m.family]
        for j, cls in enumerate(m.key_classes):
            g_mechs[i].key_class[j] = cls
        g_mechs[i].key_sized = 1 if m.key_sized else 0
        if g_parsers[g_mechs[i].param] == NULL:
            raise RuntimeError(f"{m.name}: no parser for {m.param} in params.pxi")
        g_mechs[i].nkt = len(m.key_types)
        for j, kt in enumerate(m.key_types):
            g_mechs[i].key_types[j] = kt
    g_nmechs = len(rows)
    return 0


cdef int _module_init() except -1:
    _tables_init()
    pthread_mutex_init(&g_state_lock, NULL)
    _params_init()
    _load_mechanisms()
    memset(&g_fl240, 0, sizeof(g_fl240))
    memset(&g_fl30, 0, sizeof(g_fl30))
    g_fl240.version.major = 2
    g_fl240.version.minor = 40
    _fill_240(&g_fl240)
    g_fl30.version.major = 3
    g_fl30.version.minor = 0
    _fill_30(&g_fl30)
    g_ifaces[0].pInterfaceName = <CK_CHAR*>IFACE_NAME
    g_ifaces[0].pFunctionList = &g_fl30
    g_ifaces[0].flags = 0
    g_ifaces[1].pInterfaceName = <CK_CHAR*>IFACE_NAME
    g_ifaces[1].pFunctionList = &g_fl240
    g_ifaces[1].flags = 0
    os.register_at_fork(after_in_child=_after_fork_child)
    return 0


_module_init()
