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
"""

from libc.stdint cimport int64_t, uint32_t

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

cdef enum:
    SQLITE_OK = 0
    SQLITE_ROW = 100
    SQLITE_OPEN_READWRITE = 0x00000002
    SQLITE_OPEN_NOMUTEX = 0x00008000

cdef open_v2_f _open_v2 = NULL
cdef prepare_v2_f _prepare_v2 = NULL
cdef one_f _step = NULL
cdef one_f _reset = NULL
cdef one_f _finalize = NULL
cdef one_f _close_v2 = NULL
cdef busy_timeout_f _busy_timeout = NULL
cdef column_int64_f _column_int64 = NULL
cdef errmsg_f _errmsg = NULL
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
    global _busy_timeout, _column_int64, _errmsg, _found
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
    """One database's data_version, through a connection of its own (module docstring)."""

    cdef void *db
    cdef void *stmt
    cdef int64_t serial

    def __cinit__(self, path: str, busy_ms: int) -> None:
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
        # one's: data_version starts again with each connection.
        _serial += 1
        self.serial = <int64_t>_serial << 32

    cdef _fail(self, what: str):
        message = (_errmsg(self.db) or b"out of memory").decode("utf-8", "replace")
        self.close()
        raise OSError(f"sqlite {what}: {message}")

    def __call__(self) -> object:
        """The mark: an int that differs from every earlier one of this process once another
        connection committed; None when SQLite could not say (the caller treats the store as
        changed)."""
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

    def close(self) -> None:
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
