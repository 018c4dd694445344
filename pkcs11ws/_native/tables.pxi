# Included by core.pyx: the C-side tables and the functions that use them. Their types, and
# which lock guards what in which order, are the contract in tables.pxd.

# Usage bits of a key, one per operation (bit OP_x).
cdef CK_ULONG USE_ENCRYPT = 1, USE_DECRYPT = 2, USE_SIGN = 4, USE_VERIFY = 8

cdef MechRow g_mechs[MAX_MECHS]
cdef int g_nmechs = 0

cdef pthread_mutex_t g_sess_lock
cdef Session** g_sessions = NULL        # [MAX_SESSIONS], index -> Session* or NULL
cdef unsigned short* g_sess_gen = NULL  # per index generation, 1..0x7fff
cdef CK_ULONG g_sess_hint = 0
# Indices at or above it were never used: the scans of every session stop there. The table is
# 512 KiB of calloc'd (untouched, unmapped) pages; a scan of all of it cost C_Finalize ~130 page
# faults and 65535 steps in every process, pkcs11-tool -L's included, that opened no session.
cdef CK_ULONG g_sess_top = 0

cdef pthread_mutex_t g_slot_lock
cdef SlotRow* g_slots = NULL            # index = slot ID - 1
cdef CK_ULONG g_nslots = 0

cdef pthread_mutex_t g_obj_lock
cdef ObjRow* g_objs = NULL              # index = object handle - 1
cdef CK_ULONG g_nobjs = 0
cdef CK_ULONG g_objs_cap = 0


cdef int _tables_init() except -1:
    pthread_mutex_init(&g_sess_lock, NULL)
    pthread_mutex_init(&g_slot_lock, NULL)
    pthread_mutex_init(&g_obj_lock, NULL)
    global g_sessions, g_sess_gen
    g_sessions = <Session**>calloc(MAX_SESSIONS, sizeof(Session*))
    g_sess_gen = <unsigned short*>calloc(MAX_SESSIONS, sizeof(unsigned short))
    if g_sessions == NULL or g_sess_gen == NULL:
        raise MemoryError()
    return 0


# ---- mechanisms ------------------------------------------------------------------------------

cdef int _mech_find(CK_MECHANISM_TYPE t) noexcept nogil:
    cdef int i
    for i in range(g_nmechs):
        if g_mechs[i].type == t:
            return i
    return -1


cdef bint _mech_takes_key(int row, CK_KEY_TYPE kt) noexcept nogil:
    cdef int i
    for i in range(g_mechs[row].nkt):
        if g_mechs[row].key_types[i] == kt:
            return True
    return False


# ---- slots -----------------------------------------------------------------------------------

cdef int _slot_get(CK_SLOT_ID slot, SlotRow* out) noexcept nogil:
    """Copy of a slot's row; -1 when the ID was never handed out."""
    cdef int rc = -1
    pthread_mutex_lock(&g_slot_lock)
    if 1 <= slot <= g_nslots and g_slots[slot - 1].known:
        out[0] = g_slots[slot - 1]
        rc = 0
    pthread_mutex_unlock(&g_slot_lock)
    return rc


cdef bint _slot_logged_in(CK_SLOT_ID slot) noexcept nogil:
    cdef bint r = False
    pthread_mutex_lock(&g_slot_lock)
    if 1 <= slot <= g_nslots:
        r = g_slots[slot - 1].logged_in != 0
    pthread_mutex_unlock(&g_slot_lock)
    return r


cdef void _slot_set_login(CK_SLOT_ID slot, int flag) noexcept nogil:
    pthread_mutex_lock(&g_slot_lock)
    if 1 <= slot <= g_nslots:
        g_slots[slot - 1].logged_in = flag
    pthread_mutex_unlock(&g_slot_lock)


cdef void _slot_count(CK_SLOT_ID slot, CK_FLAGS flags, int delta) noexcept nogil:
    # Called with g_sess_lock held (lock order sessions -> slots).
    pthread_mutex_lock(&g_slot_lock)
    if 1 <= slot <= g_nslots:
        g_slots[slot - 1].sessions += delta
        if flags & CKF_RW_SESSION:
            g_slots[slot - 1].rw_sessions += delta
    pthread_mutex_unlock(&g_slot_lock)


cdef void _pad(CK_UTF8CHAR* dst, size_t n, const unsigned char* src, size_t srclen) noexcept nogil:
    memset(dst, 32, n)
    memcpy(dst, src, srclen if srclen < n else n)


# ---- sessions --------------------------------------------------------------------------------

cdef void _op_clear(OpState* op) noexcept nogil:
    free(op.kept_in)
    free(op.kept_out)
    free(op.acc)
    free(op.prm)
    memset(op, 0, sizeof(OpState))


cdef void _session_free(Session* s) noexcept nogil:
    cdef int i
    for i in range(N_OPS):
        _op_clear(&s.ops[i])
    free(s.found)
    free(s)


cdef CK_RV _session_open(CK_SLOT_ID slot, CK_FLAGS flags, CK_SESSION_HANDLE* out) noexcept nogil:
    global g_sess_hint, g_sess_top
    cdef Session* s = <Session*>calloc(1, sizeof(Session))
    cdef CK_ULONG i, idx = 0
    if s == NULL:
        return CKR_HOST_MEMORY
    s.slot = slot
    s.flags = flags
    s.refs = 1
    pthread_mutex_lock(&g_sess_lock)
    for i in range(<CK_ULONG>MAX_SESSIONS):
        idx = (g_sess_hint + i) % MAX_SESSIONS
        if g_sessions[idx] == NULL:
            break
    else:
        pthread_mutex_unlock(&g_sess_lock)
        free(s)
        return CKR_SESSION_COUNT
    g_sess_hint = idx + 1
    g_sess_gen[idx] = (g_sess_gen[idx] % 0x7FFF) + 1
    s.handle = (<CK_ULONG>g_sess_gen[idx] << SESSION_INDEX_BITS) | (idx + 1)
    g_sessions[idx] = s
    if idx >= g_sess_top:
        g_sess_top = idx + 1
    _slot_count(slot, flags, 1)
    pthread_mutex_unlock(&g_sess_lock)
    out[0] = s.handle
    return CKR_OK


cdef Session* _session_get(CK_SESSION_HANDLE h) noexcept nogil:
    """The session with a reference taken (release with _session_put), or NULL."""
    cdef CK_ULONG idx = (h & 0xFFFF) - 1
    cdef Session* s = NULL
    if h == 0 or idx >= MAX_SESSIONS:
        return NULL
    pthread_mutex_lock(&g_sess_lock)
    s = g_sessions[idx]
    if s != NULL and s.handle == h and not s.closed:
        s.refs += 1
    else:
        s = NULL
    pthread_mutex_unlock(&g_sess_lock)
    return s


cdef void _session_put(Session* s) noexcept nogil:
    cdef int gone
    pthread_mutex_lock(&g_sess_lock)
    s.refs -= 1
    gone = s.refs == 0
    pthread_mutex_unlock(&g_sess_lock)
    if gone:
        _session_free(s)


cdef void _session_unlink(Session* s) noexcept nogil:
    # With g_sess_lock held: take s out of the table and drop the table's reference.
    g_sessions[(s.handle & 0xFFFF) - 1] = NULL
    s.closed = 1
    _slot_count(s.slot, s.flags, -1)
    s.refs -= 1


cdef int _session_close(CK_SESSION_HANDLE h, CK_SLOT_ID* slot_out) noexcept nogil:
    """Close one session; 1 if it was the slot's last, 0 if not, -1 if no such session."""
    cdef Session* s = _session_get(h)
    cdef int last
    cdef SlotRow row
    if s == NULL:
        return -1
    try:
        pthread_mutex_lock(&g_sess_lock)
        if s.closed:
            pthread_mutex_unlock(&g_sess_lock)
            return -1
        _session_unlink(s)
        slot_out[0] = s.slot
        pthread_mutex_unlock(&g_sess_lock)
    finally:
        _session_put(s)
    last = _slot_get(slot_out[0], &row) == 0 and row.sessions == 0
    return 1 if last else 0


cdef void _sessions_close_slot(CK_SLOT_ID slot, bint all_slots) noexcept nogil:
    cdef CK_ULONG i
    cdef Session* s
    pthread_mutex_lock(&g_sess_lock)
    for i in range(g_sess_top):
        s = g_sessions[i]
        if s != NULL and (all_slots or s.slot == slot):
            _session_unlink(s)
            if s.refs == 0:
                _session_free(s)
    pthread_mutex_unlock(&g_sess_lock)


cdef void _sessions_forget_all() noexcept nogil:
    # Fork child: one thread left; every other reference died with its thread.
    cdef CK_ULONG i
    for i in range(g_sess_top):
        if g_sessions[i] != NULL:
            _session_free(g_sessions[i])
            g_sessions[i] = NULL
    for i in range(g_nslots):
        g_slots[i].sessions = 0
        g_slots[i].rw_sessions = 0
        g_slots[i].logged_in = 0


# ---- objects ---------------------------------------------------------------------------------

cdef int _obj_get(CK_OBJECT_HANDLE h, ObjRow* out) noexcept nogil:
    cdef int rc = -1
    pthread_mutex_lock(&g_obj_lock)
    if 1 <= h <= g_nobjs and g_objs[h - 1].live:
        out[0] = g_objs[h - 1]
        rc = 0
    pthread_mutex_unlock(&g_obj_lock)
    return rc


cdef CK_OBJECT_HANDLE _obj_put(CK_OBJECT_HANDLE h, CK_SLOT_ID slot, CK_OBJECT_CLASS cls,
                               CK_KEY_TYPE kt, CK_ULONG usage, CK_ULONG size,
                               int private) noexcept nogil:
    """Record an object; h == 0 allocates the next handle. 0 on allocation failure."""
    cdef ObjRow* grown
    cdef CK_ULONG cap
    pthread_mutex_lock(&g_obj_lock)
    if h == 0:
        if g_nobjs == g_objs_cap:
            cap = g_objs_cap * 2 if g_objs_cap else 256
            grown = <ObjRow*>realloc(g_objs, cap * sizeof(ObjRow))
            if grown == NULL:
                pthread_mutex_unlock(&g_obj_lock)
                return 0
            _set_objs(grown, cap)
        _inc_nobjs()
        h = g_nobjs
    if h > g_nobjs:
        pthread_mutex_unlock(&g_obj_lock)
        return 0
    g_objs[h - 1].live = 1
    g_objs[h - 1].slot = slot
    g_objs[h - 1].cls = cls
    g_objs[h - 1].key_type = kt
    g_objs[h - 1].usage = usage
    g_objs[h - 1].size = size
    g_objs[h - 1].private = private
    pthread_mutex_unlock(&g_obj_lock)
    return h


cdef void _set_objs(ObjRow* p, CK_ULONG cap) noexcept nogil:
    global g_objs, g_objs_cap
    g_objs = p
    g_objs_cap = cap


cdef void _inc_nobjs() noexcept nogil:
    global g_nobjs
    g_nobjs += 1


cdef void _obj_drop(CK_OBJECT_HANDLE h) noexcept nogil:
    pthread_mutex_lock(&g_obj_lock)
    if 1 <= h <= g_nobjs:
        g_objs[h - 1].live = 0
    pthread_mutex_unlock(&g_obj_lock)
