# Included by core.pyx: C_DigestInit, C_Digest, C_DigestUpdate, C_DigestKey, C_DigestFinal.
#
# A digest needs no key and no secret, so it runs in the module (the mechanism rows of family
# DIGEST: SHA-1 and SHA-2), in a public session as well, without a request. The operation state
# is the session's ops[OP_DIGEST] (mechanism row, multi-part mark); the running hash is a hashlib
# object in g_digests under the session's handle, reached with the GIL. An entry outliving its
# session (closed mid-digest) is dropped by the next C_DigestInit; C_Finalize drops them all.
#
# Length rules as for the other operations: a NULL output asks for the length (the row's out_len)
# and costs nothing; too small a buffer gives CKR_BUFFER_TOO_SMALL and keeps the operation;
# anything else ends it.

cdef dict g_digests = {}  # session handle -> running hashlib object


cdef void _digests_clear() noexcept:
    # With the GIL: C_Finalize and the fork child (no session survives either).
    g_digests.clear()


cdef CK_RV _py_digest_begin(Call* c) except? 0xFFFFFFFF:
    # Drop the hashes of sessions that are gone (closed while digesting).
    cdef Session* s
    for h in [h for h in g_digests if h != c.h]:
        s = _session_get(h)
        if s == NULL:
            del g_digests[h]
        else:
            _session_put(s)
    # Imported here, not with the core: start-up does not need it, and _hashlib's OpenSSL
    # objects live as long as the never-finalised interpreter (LeakSanitizer would see them).
    import hashlib

    g_digests[c.h] = hashlib.new(_mechanisms.BY_CODE[c.mech].digest)
    return CKR_OK


cdef CK_RV _py_digest_update(Call* c) except? 0xFFFFFFFF:
    if c.data_len:
        g_digests[c.h].update((<char*>c.data)[:c.data_len])
    return CKR_OK


cdef CK_RV _py_digest_final(Call* c) except? 0xFFFFFFFF:
    cdef const unsigned char* src
    md = g_digests.pop(c.h)
    if c.data_len:
        md.update((<char*>c.data)[:c.data_len])
    out = md.digest()
    if <CK_ULONG>len(out) != c.result:
        raise RuntimeError("digest of the wrong length")
    src = <bytes>out
    memcpy(c.out, src, c.result)
    c.out_len[0] = c.result
    return CKR_OK


cdef CK_RV _py_digest_drop(Call* c) except? 0xFFFFFFFF:
    g_digests.pop(c.h, None)
    return CKR_OK


cdef void _digest_end(Session* s, CK_SESSION_HANDLE h) noexcept nogil:
    cdef Call c = _call(h, 0)
    _op_end(s, OP_DIGEST)
    _in_python(_py_digest_drop, &c)


cdef CK_RV f_DigestInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    cdef int row
    cdef Call c
    if rv != CKR_OK:
        return rv
    s = _session_get(hSession)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        if pMechanism == NULL:
            return CKR_ARGUMENTS_BAD
        row = _mech_find(pMechanism.mechanism)
        if row < 0 or not (g_mechs[row].flags & CKF_DIGEST):
            return CKR_MECHANISM_INVALID
        memset(&op, 0, sizeof(OpState))
        op.row = row
        op.mech = pMechanism.mechanism
        op.mac_len = g_mechs[row].out_len
        rv = g_parsers[g_mechs[row].param](pMechanism, &op)
        if rv != CKR_OK:
            return rv
        op.active = 1
        pthread_mutex_lock(&g_sess_lock)
        if s.ops[OP_DIGEST].active:
            rv = CKR_OPERATION_ACTIVE
        else:
            s.ops[OP_DIGEST] = op
        pthread_mutex_unlock(&g_sess_lock)
        if rv != CKR_OK:
            return rv
        c = _call(hSession, s.slot)
        c.mech = op.mech
        rv = _in_python(_py_digest_begin, &c)
        if rv != CKR_OK:
            _op_end(s, OP_DIGEST)
        return rv
    finally:
        _session_put(s)


cdef CK_RV _digest_out(CK_SESSION_HANDLE h, bint single, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                       CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) noexcept nogil:
    """C_Digest (single: the data, then the end) and C_DigestFinal (no data)."""
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    cdef Call c
    if rv != CKR_OK:
        return rv
    s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        pthread_mutex_lock(&g_sess_lock)
        op = s.ops[OP_DIGEST]
        pthread_mutex_unlock(&g_sess_lock)
        if not op.active:
            return CKR_OPERATION_NOT_INITIALIZED
        if single and op.multi:
            # A multi-part digest ends only with C_DigestFinal.
            return CKR_OPERATION_ACTIVE
        if pulDigestLen == NULL or (pData == NULL and ulDataLen > 0):
            rv = CKR_ARGUMENTS_BAD
        elif pDigest == NULL:
            pulDigestLen[0] = op.mac_len
            return CKR_OK
        elif pulDigestLen[0] < op.mac_len:
            pulDigestLen[0] = op.mac_len
            return CKR_BUFFER_TOO_SMALL
        else:
            c = _call(h, s.slot)
            c.data = pData
            c.data_len = ulDataLen
            c.out = pDigest
            c.out_len = pulDigestLen
            c.result = op.mac_len
            rv = _in_python(_py_digest_final, &c)
            # _py_digest_final took the hash out first, whatever happened after.
            _op_end(s, OP_DIGEST)
            return rv
        _digest_end(s, h)
        return rv
    finally:
        _session_put(s)


cdef CK_RV f_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                    CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) noexcept nogil:
    return _digest_out(hSession, True, pData, ulDataLen, pDigest, pulDigestLen)


cdef CK_RV f_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest,
                         CK_ULONG_PTR pulDigestLen) noexcept nogil:
    return _digest_out(hSession, False, NULL, 0, pDigest, pulDigestLen)


cdef CK_RV _digest_continue(CK_SESSION_HANDLE h, Session** out) noexcept nogil:
    """The session of a multi-part digest in progress (marked multi-part), with a reference."""
    cdef Session* s = _session_get(h)
    cdef CK_RV rv = CKR_OK
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    pthread_mutex_lock(&g_sess_lock)
    if s.ops[OP_DIGEST].active:
        s.ops[OP_DIGEST].multi = 1
    else:
        rv = CKR_OPERATION_NOT_INITIALIZED
    pthread_mutex_unlock(&g_sess_lock)
    if rv != CKR_OK:
        _session_put(s)
        return rv
    out[0] = s
    return CKR_OK


cdef CK_RV f_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                          CK_ULONG ulPartLen) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s = NULL
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _digest_continue(hSession, &s)
    if rv != CKR_OK:
        return rv
    try:
        if pPart == NULL and ulPartLen > 0:
            rv = CKR_ARGUMENTS_BAD
        else:
            c = _call(hSession, s.slot)
            c.data = pPart
            c.data_len = ulPartLen
            rv = _in_python(_py_digest_update, &c)
        if rv != CKR_OK:
            _digest_end(s, hSession)
        return rv
    finally:
        _session_put(s)


cdef CK_RV f_DigestKey(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey) noexcept nogil:
    # Every key's value stays in the key service (secret and private keys are sensitive, never
    # extractable), so none can be digested here: CKR_KEY_INDIGESTIBLE for a key of this token.
    cdef CK_RV rv = _ready()
    cdef Session* s = NULL
    cdef ObjRow obj
    if rv != CKR_OK:
        return rv
    rv = _digest_continue(hSession, &s)
    if rv != CKR_OK:
        return rv
    try:
        if _obj_get(hKey, &obj) != 0 or obj.slot != s.slot:
            rv = CKR_KEY_HANDLE_INVALID
        else:
            rv = CKR_KEY_INDIGESTIBLE
        _digest_end(s, hSession)
        return rv
    finally:
        _session_put(s)
