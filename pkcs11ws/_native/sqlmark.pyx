# cython: language_level=3
"""The key service's SQLite change mark (server/sqlite_store.py): `PRAGMA data_version` of a
connection of its own, stepped from C.

Through Python's sqlite3 module the same pragma costs ~12.7k instructions (a cursor's execute
and fetchone: statement cache, row tuple, the GIL released twice); here one kept statement is
stepped, read and reset. The service reads the mark once per turn of its event loop, so at one
request in flight once per request.

Only through the very SQLite library copy Python's sqlite3 module uses: two copies of SQLite in
one process do not share their POSIX lock bookkeeping, and one closing its descriptor of the
database would drop the other's locks (SQLite's "multiple copies" hazard). So nothing is linked:
the functions are looked up in _sqlite3's own lookup scope (dlsym on its handle: the extension,
then the libraries it needs), and only when the process-wide lookup agrees or finds none. When
they cannot be found that way, available() is False and the store asks through a cursor.

The connection is the mark's own and never writes: every commit, by any connection of any process
(this service's included), is another connection's, so data_version differs after each one. The
connection is used by one thread only (the store keeps one mark per thread), hence NOMUTEX.

Without a statement (issue 15, round 9): a statement's step begins and ends a read transaction,
two fcntl() system calls on the -shm file and SQLite's code, cold at every request when requests
come one at a time (~6 % of the service's CPU per request at one client thread: perf). In WAL
mode every commit, by any connection of any process, ends by writing the wal-index header at the
start of the shared -shm mapping (SQLite's documented WAL-index format,
https://www.sqlite.org/walformat.html): mxFrame grows with the commit's frames, or the log
restarted and salt1 grew by one, and iChange counts the transactions. So after its first step
(which maps the -shm), the mark takes region 0's address from the connection's own file
(SQLITE_FCNTL_FILE_POINTER, then the VFS's xShmMap of a region already mapped: no new file
descriptor, so no POSIX lock of SQLite's can be dropped), and each reading copies the header's two
copies as SQLite's readers do (the first, a barrier, the second; a writer writes them in the
other order): equal, initialised and of the known version, the 48 bytes are the mark; else (a
writer is half way) None, which the store turns into a mark never seen. No system call and no
SQLite code per reading. The mapping lives as long as the mark's connection (SQLite unmaps it
when the last connection of the process closes the -shm); close() forgets the address first.
Where any of that does not hold (not WAL, another VFS, an unknown version), the statement.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.string cimport memcmp, memcpy

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int dlclose(void *handle)
    int RTLD_NOW
    int RTLD_NOLOAD
    void *RTLD_DEFAULT

ctypedef int (*open_v2_f)(const char *, void **, int, const char *) noexcept nogil
ctypedef int (*prepare_v2_f)(void *, const char *, int, void **, const char **) noexcept nogil
ctypedef int (*one_f)(void *) noexcept nogil
ctypedef int (*busy_timeout_f)(void *, int) noexcept nogil
ctypedef int64_t (*column_int64_f)(void *, int) noexcept nogil
ctypedef const char *(*errmsg_f)(void *) noexcept nogil
ctypedef int (*file_control_f)(void *, const char *, int, void *) noexcept nogil
ctypedef int (*shm_map_f)(void *, int, int, int, void **) noexcept nogil

cdef extern from *:
    """
    #define PKCS11WS_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
    """
    void PKCS11WS_FENCE() nogil

# sqlite3.h's sqlite3_io_methods up to xShmMap (version 2 and later have it): declared here, as
# nothing of SQLite is linked or included.
ctypedef struct io_methods:
    int iVersion
    void *xClose
    void *xRead
    void *xWrite
    void *xTruncate
    void *xSync
    void *xFileSize
    void *xLock
    void *xUnlock
    void *xCheckReservedLock
    void *xFileControl
    void *xSectorSize
    void *xDeviceCharacteristics
    shm_map_f xShmMap

ctypedef struct sqlite_file:
    const io_methods *pMethods

cdef enum:
    SQLITE_OK = 0
    SQLITE_ROW = 100
    SQLITE_OPEN_READWRITE = 0x00000002
    SQLITE_OPEN_NOMUTEX = 0x00008000
    SQLITE_FCNTL_FILE_POINTER = 7
    WALINDEX_PGSZ = 32768  # a -shm region (wal.c)
    HDR = 48  # sizeof(WalIndexHdr); the header is stored twice, at 0 and at 48
    HDR_VERSION = 3007000  # WalIndexHdr.iVersion
    HDR_IS_INIT = 12  # offset of WalIndexHdr.isInit
    MARK = 8 + HDR  # a mark: the connection's serial, then the header

cdef open_v2_f _open_v2 = NULL
cdef prepare_v2_f _prepare_v2 = NULL
cdef one_f _step = NULL
cdef one_f _reset = NULL
cdef one_f _finalize = NULL
cdef one_f _close_v2 = NULL
cdef busy_timeout_f _busy_timeout = NULL
cdef column_int64_f _column_int64 = NULL
cdef errmsg_f _errmsg = NULL
cdef file_control_f _file_control = NULL
cdef bint _found = False
cdef uint32_t _serial = 0


cdef void *_sym(void *handle, const char *name) noexcept:
    cdef void *f = dlsym(handle, name)
    cdef void *seen = dlsym(RTLD_DEFAULT, name)
    if f == NULL or (seen != NULL and seen != f):
        return NULL
    return f


def _load(ext_path: str) -> bool:
    global _open_v2, _prepare_v2, _step, _reset, _finalize, _close_v2
    global _busy_timeout, _column_int64, _errmsg, _found, _file_control
    path = ext_path.encode()
    cdef void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD)  # loaded already: no new copy
    if h == NULL:
        return False
    _open_v2 = <open_v2_f>_sym(h, b"sqlite3_open_v2")
    _prepare_v2 = <prepare_v2_f>_sym(h, b"sqlite3_prepare_v2")
    _step = <one_f>_sym(h, b"sqlite3_step")
    _reset = <one_f>_sym(h, b"sqlite3_reset")
    _finalize = <one_f>_sym(h, b"sqlite3_finalize")
    _close_v2 = <one_f>_sym(h, b"sqlite3_close_v2")
    _busy_timeout = <busy_timeout_f>_sym(h, b"sqlite3_busy_timeout")
    _column_int64 = <column_int64_f>_sym(h, b"sqlite3_column_int64")
    _errmsg = <errmsg_f>_sym(h, b"sqlite3_errmsg")
    _file_control = <file_control_f>_sym(h, b"sqlite3_file_control")  # (optional: the header)
    dlclose(h)  # (the extension stays loaded: Python holds it)
    _found = (
        _open_v2 != NULL and _prepare_v2 != NULL and _step != NULL and _reset != NULL
        and _finalize != NULL and _close_v2 != NULL and _busy_timeout != NULL
        and _column_int64 != NULL and _errmsg != NULL
    )
    return _found


def available() -> bool:
    """Whether DataVersion can be made (the SQLite functions were found, see above)."""
    return _found


cdef class DataVersion:
    """One database's change mark, through a connection of its own (module docstring): its
    wal-index header where it can be read, else its data_version."""

    cdef void *db
    cdef void *stmt
    cdef int64_t serial
    cdef const uint8_t *hdr  # region 0 of the -shm mapping: the wal-index header; NULL: none
    cdef uint8_t mark[MARK]

    def __cinit__(self, path: str, busy_ms: int, header: bool = True) -> None:
        global _serial
        if not _found:
            raise RuntimeError("the SQLite library of the sqlite3 module was not found")
        name = path.encode()
        cdef int rc = _open_v2(name, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
        if rc != SQLITE_OK:
            self._fail("open")
        _busy_timeout(self.db, busy_ms)
        if _prepare_v2(self.db, b"PRAGMA data_version", -1, &self.stmt, NULL) != SQLITE_OK:
            self._fail("prepare")
        # Marks of an earlier connection (a closed store, another thread's) never equal this
        # one's: data_version starts again with each connection (and the header's marks carry
        # the same serial).
        _serial += 1
        self.serial = <int64_t>_serial << 32
        memcpy(self.mark, &self.serial, 8)
        # header False: the statement only (the tests' way to reach it here).
        if self._step() is not None and header:  # (a read transaction: the -shm is mapped)
            self.hdr = self._header()

    cdef const uint8_t *_header(self) noexcept:
        """Region 0 of this connection's -shm mapping, when its header reads as one."""
        cdef sqlite_file *f = NULL
        cdef void *region = NULL
        if _file_control == NULL:
            return NULL
        if _file_control(self.db, b"main", SQLITE_FCNTL_FILE_POINTER, &f) != SQLITE_OK:
            return NULL
        if f == NULL or f.pMethods == NULL or f.pMethods.iVersion < 2:
            return NULL
        if f.pMethods.xShmMap == NULL:
            return NULL
        # bExtend 0: the region the step mapped, or none (not WAL: no -shm).
        if f.pMethods.xShmMap(f, 0, WALINDEX_PGSZ, 0, &region) != SQLITE_OK or region == NULL:
            return NULL
        if not self._copy(<const uint8_t *>region):
            return NULL
        return <const uint8_t *>region

    cdef bint _copy(self, const uint8_t *hdr) noexcept nogil:
        """The header into mark[8:] as SQLite's readers take it (walIndexTryHdr): the first
        copy, a barrier, the second; False when they differ or it is not an initialised
        header of the known version (a writer is half way: the caller says "changed")."""
        cdef uint8_t second[HDR]
        cdef uint32_t version
        memcpy(&self.mark[8], hdr, HDR)
        PKCS11WS_FENCE()
        memcpy(second, hdr + HDR, HDR)
        if memcmp(&self.mark[8], second, HDR) != 0:
            return False
        memcpy(&version, &self.mark[8], 4)
        return version == HDR_VERSION and self.mark[8 + HDR_IS_INIT] == 1

    cdef object _step(self):
        cdef void *stmt = self.stmt
        cdef int rc
        cdef int64_t v
        if stmt == NULL:
            return None
        with nogil:  # (a busy database may make the step wait)
            rc = _step(stmt)
            if rc == SQLITE_ROW:
                v = _column_int64(stmt, 0)
            _reset(stmt)
        if rc != SQLITE_ROW:
            return None
        return self.serial | <uint32_t>v

    @property
    def from_header(self) -> bool:
        """Whether readings come from the wal-index header (no statement, no system call)."""
        return self.hdr != NULL

    def __call__(self) -> object:
        """The mark: a value that differs from every earlier one of this process once another
        connection committed (bytes from the header, else an int); None when it could not be
        read (the caller treats the store as changed)."""
        if self.hdr != NULL:
            if not self._copy(self.hdr):
                return None
            return PyBytes_FromStringAndSize(<const char *>self.mark, MARK)
        return self._step()

    def close(self) -> None:
        self.hdr = NULL  # (the mapping goes with the connection)
        if self.stmt != NULL:
            _finalize(self.stmt)
            self.stmt = NULL
        if self.db != NULL:
            _close_v2(self.db)
            self.db = NULL

    def __dealloc__(self) -> None:
        if self.stmt != NULL:
            _finalize(self.stmt)
        if self.db != NULL:
            _close_v2(self.db)


def _find() -> None:
    import _sqlite3

    path = getattr(_sqlite3, "__file__", None)
    if path:  # (a sqlite3 module built into the interpreter: no handle to look in)
        _load(path)


_find()
