# Included by core.pyx: multi-part encryption, decryption, signing and verification.
#
# AES-CBC streams without state on the service: each C_*Update sends the whole blocks it has
# (as unpadded CKM_AES_CBC) with the chaining value as IV, and keeps the last ciphertext block
# as the next one. What is held back between calls is at most one block: the tail that is not
# a whole block, and for CBC-PAD decryption the last block (it may be the padding block, which
# only C_DecryptFinal may strip). An Update that has no whole block to send costs no request.
#
# HMAC is not streamed by the service: the data is accumulated here, up to MAC_BUFFER_MAX
# bytes (beyond: CKR_DATA_LEN_RANGE), and C_SignFinal/C_VerifyFinal make the one request.
#
# The length rules are those of the single-part calls: a NULL output buffer asks for the length
# and costs nothing; the operation ends on any result but CKR_BUFFER_TOO_SMALL or a length query.

cdef CK_ULONG MAC_BUFFER_MAX = 4 * 1024 * 1024
cdef CK_ULONG CIPHER_CHUNK = 1024 * 1024  # whole blocks per request (the service caps bodies)


cdef object _cipher_request(CK_SESSION_HANDLE h, int which, CK_SLOT_ID slot,
                            CK_OBJECT_HANDLE key, CK_MECHANISM_TYPE mech, bytes iv, bytes data):
    """One CBC request (with the GIL), through the provider's one crypto path; raises
    PKCS11Error."""
    return _prov_s(h).crypto(which, slot, key, mech, data, iv, 0, b"", None)


cdef CK_RV _multi_begin(Session* s, int which, OpState* op) noexcept nogil:
    """Copy the operation state; NOT_INITIALIZED if none. Marks it multi-part."""
    pthread_mutex_lock(&g_sess_lock)
    op[0] = s.ops[which]
    if s.ops[which].active:
        s.ops[which].multi = 1
    pthread_mutex_unlock(&g_sess_lock)
    return CKR_OK if op.active else CKR_OPERATION_NOT_INITIALIZED


cdef CK_RV _py_cipher_update(Call* c) except? 0xFFFFFFFF:
    """Send the whole blocks (c.result bytes: held-back part + the head of c.data) in requests
    of at most CIPHER_CHUNK, write them to c.out and leave the chaining value in c.op.iv."""
    cdef OpState* op = c.op
    cdef CK_ULONG send = c.result, done = 0, n
    cdef const unsigned char* src
    data = (<char*>op.part)[:op.partlen] + (<char*>c.data)[:send - op.partlen]
    iv = (<char*>op.iv)[:16]
    while done < send:
        n = min(send - done, CIPHER_CHUNK)
        chunk = data[done:done + n]
        out = _cipher_request(c.h, c.which, c.slot, op.key, CKM_AES_CBC, iv, chunk)
        if <CK_ULONG>len(out) != n:
            raise RuntimeError("CBC answer of the wrong length")
        src = <bytes>out
        memcpy(c.out + done, src, n)
        # The chaining value: the last ciphertext block of this request.
        iv = (out if c.which == OP_ENCRYPT else chunk)[n - 16:]
        done += n
    src = <bytes>iv
    memcpy(op.iv, src, 16)
    return CKR_OK


cdef CK_RV _cipher_update(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pIn, CK_ULONG ulIn,
                          CK_BYTE_PTR pOut, CK_ULONG_PTR pulOut) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    cdef CK_ULONG total, send, keep, used
    cdef bint padded
    cdef Call c
    if rv != CKR_OK:
        return rv
    s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        rv = _multi_begin(s, which, &op)
        if rv != CKR_OK:
            return rv
        padded = g_mechs[op.row].padded
        if pulOut == NULL or (pIn == NULL and ulIn > 0):
            rv = CKR_ARGUMENTS_BAD
        else:
            total = op.partlen + ulIn
            if which == OP_DECRYPT and padded:
                send = ((total - 1) // 16) * 16 if total else 0
            else:
                send = total - total % 16
            if pOut == NULL:
                pulOut[0] = send
                return CKR_OK
            if pulOut[0] < send:
                pulOut[0] = send
                return CKR_BUFFER_TOO_SMALL
            keep = total - send
            if send > 0:
                c = _call(h, s.slot)
                c.which = which
                c.op = &op
                c.data = pIn
                c.out = pOut
                c.result = send
                rv = _in_python(_py_cipher_update, &c)
            if rv == CKR_OK:
                # The held-back tail: the last `keep` bytes of part + input.
                used = send - op.partlen if send >= op.partlen else 0
                if send == 0:
                    memcpy(op.part + op.partlen, pIn, ulIn)
                else:
                    memcpy(op.part, pIn + used, keep)
                pthread_mutex_lock(&g_sess_lock)
                memcpy(s.ops[which].iv, op.iv, 16)
                memcpy(s.ops[which].part, op.part, keep)
                s.ops[which].partlen = keep
                pthread_mutex_unlock(&g_sess_lock)
                pulOut[0] = send
        if rv != CKR_OK:
            _op_end(s, which)
        return rv
    finally:
        _session_put(s)


cdef CK_RV _py_cipher_final(Call* c) except? 0xFFFFFFFF:
    cdef OpState* op = c.op
    cdef Py_ssize_t size
    cdef const unsigned char* src
    out = _cipher_request(c.h, c.which, c.slot, op.key, CKM_AES_CBC_PAD, (<char*>op.iv)[:16],
                          (<char*>op.part)[:op.partlen])
    size = len(out)
    if <CK_ULONG>size > c.out_len[0]:
        _keep(c.s, c.which, NULL, 0, out)
        c.out_len[0] = size
        return CKR_BUFFER_TOO_SMALL
    src = <bytes>out
    memcpy(c.out, src, size)
    c.out_len[0] = size
    return CKR_OK


cdef CK_RV _cipher_final(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pOut,
                         CK_ULONG_PTR pulOut) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    cdef CK_ULONG need = 0
    cdef bint padded
    cdef Call c
    if rv != CKR_OK:
        return rv
    s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        rv = _multi_begin(s, which, &op)
        if rv != CKR_OK:
            return rv
        padded = g_mechs[op.row].padded
        if pulOut == NULL:
            rv = CKR_ARGUMENTS_BAD
        elif op.kept_out != NULL:
            # An earlier C_DecryptFinal had the plaintext but too small a buffer.
            if pOut == NULL or pulOut[0] < op.kept_out_len:
                pulOut[0] = op.kept_out_len
                return CKR_OK if pOut == NULL else CKR_BUFFER_TOO_SMALL
            memcpy(pOut, op.kept_out, op.kept_out_len)
            pulOut[0] = op.kept_out_len
        elif which == OP_ENCRYPT and not padded and op.partlen:
            rv = CKR_DATA_LEN_RANGE
        elif which == OP_DECRYPT and op.partlen != (16 if padded else 0):
            rv = CKR_ENCRYPTED_DATA_LEN_RANGE
        else:
            need = 16 if padded else 0
            if pOut == NULL:
                pulOut[0] = need
                return CKR_OK
            if which == OP_ENCRYPT and pulOut[0] < need:
                pulOut[0] = need
                return CKR_BUFFER_TOO_SMALL
            if need == 0:
                pulOut[0] = 0
            else:
                c = _call(h, s.slot)
                c.s = s
                c.which = which
                c.op = &op
                c.out = pOut
                c.out_len = pulOut
                rv = _in_python(_py_cipher_final, &c)
        if rv != CKR_BUFFER_TOO_SMALL:
            _op_end(s, which)
        return rv
    finally:
        _session_put(s)


cdef CK_RV _mac_update(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pPart,
                       CK_ULONG ulPartLen) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState* op
    cdef CK_ULONG cap
    cdef CK_BYTE* grown
    if rv != CKR_OK:
        return rv
    s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        pthread_mutex_lock(&g_sess_lock)
        op = &s.ops[which]
        if not op.active:
            rv = CKR_OPERATION_NOT_INITIALIZED
        elif pPart == NULL and ulPartLen > 0:
            rv = CKR_ARGUMENTS_BAD
        elif ulPartLen > MAC_BUFFER_MAX - op.acclen:
            # The service takes the whole message in one request.
            rv = CKR_DATA_LEN_RANGE
        else:
            op.multi = 1
            if op.acclen + ulPartLen > op.acccap:
                cap = op.acccap * 2 if op.acccap else 4096
                while cap < op.acclen + ulPartLen:
                    cap *= 2
                grown = <CK_BYTE*>realloc(op.acc, cap)
                if grown == NULL:
                    rv = CKR_HOST_MEMORY
                else:
                    op.acc = grown
                    op.acccap = cap
            if rv == CKR_OK and ulPartLen:
                memcpy(op.acc + op.acclen, pPart, ulPartLen)
                op.acclen += ulPartLen
        if rv != CKR_OK and rv != CKR_OPERATION_NOT_INITIALIZED:
            _op_clear(op)
        pthread_mutex_unlock(&g_sess_lock)
        return rv
    finally:
        _session_put(s)


cdef CK_RV _py_mac_final(Call* c) except? 0xFFFFFFFF:
    cdef OpState* op = c.op
    cdef const unsigned char* src
    data = (<char*>op.acc)[:op.acclen] if op.acclen else b""
    if c.which == OP_SIGN:
        out = _crypt_call(c.h, c.slot, op, OP_SIGN, data)
        if <CK_ULONG>len(out) != op.mac_len:
            raise RuntimeError("MAC of the wrong length")
        src = <bytes>out
        memcpy(c.out, src, op.mac_len)
        c.out_len[0] = op.mac_len
    else:
        _crypt_call(c.h, c.slot, op, OP_VERIFY, data, (<char*>c.data2)[:c.data2_len])
    return CKR_OK


cdef CK_RV _mac_final(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pSig,
                      CK_ULONG_PTR pulSig, CK_ULONG ulSig) noexcept nogil:
    """C_SignFinal (which OP_SIGN, pulSig) and C_VerifyFinal (OP_VERIFY, ulSig)."""
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
        rv = _multi_begin(s, which, &op)
        if rv != CKR_OK:
            return rv
        if which == OP_SIGN:
            if pulSig == NULL:
                rv = CKR_ARGUMENTS_BAD
            elif pSig == NULL:
                pulSig[0] = op.mac_len
                return CKR_OK
            elif pulSig[0] < op.mac_len:
                pulSig[0] = op.mac_len
                return CKR_BUFFER_TOO_SMALL
        elif pSig == NULL and ulSig > 0:
            rv = CKR_ARGUMENTS_BAD
        elif ulSig != op.mac_len:
            rv = CKR_SIGNATURE_LEN_RANGE
        if rv == CKR_OK:
            c = _call(h, s.slot)
            c.which = which
            c.op = &op
            c.out = pSig
            c.out_len = pulSig
            c.data2 = pSig
            c.data2_len = ulSig
            rv = _in_python(_py_mac_final, &c)
        _op_end(s, which)
        return rv
    finally:
        _session_put(s)


cdef int _op_multi(CK_SESSION_HANDLE h, int which) noexcept nogil:
    """The multi-part mode of the session's active operation (MULTI_CBC when there is none:
    that path then reports the error)."""
    cdef Session* s = _session_get(h)
    cdef int mode = MULTI_CBC
    if s == NULL:
        return mode
    pthread_mutex_lock(&g_sess_lock)
    if s.ops[which].active:
        mode = g_mechs[s.ops[which].row].multi
    pthread_mutex_unlock(&g_sess_lock)
    _session_put(s)
    return mode


cdef CK_RV _acc_update(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pIn, CK_ULONG ulIn,
                       CK_BYTE_PTR pOut, CK_ULONG_PTR pulOut) noexcept nogil:
    """AES-GCM and RSA C_*Update: the data is accumulated, C_*Final makes the one request
    (a GCM tag covers the whole message); no output before the end. A length query (NULL
    output) takes nothing in."""
    cdef CK_RV rv
    if pulOut == NULL:
        return CKR_ARGUMENTS_BAD
    if pOut == NULL:
        pulOut[0] = 0
        return CKR_OK
    rv = _mac_update(h, which, pIn, ulIn)
    if rv == CKR_OK:
        pulOut[0] = 0
    return rv


cdef CK_RV _py_acc_final(Call* c) except? 0xFFFFFFFF:
    cdef OpState* op = c.op
    cdef Py_ssize_t size
    cdef const unsigned char* src
    out = _crypt_call(c.h, c.slot, op, c.which, (<char*>op.acc)[:op.acclen] if op.acclen else b"")
    size = len(out)
    if <CK_ULONG>size > c.out_len[0]:
        c.out_len[0] = size
        return CKR_BUFFER_TOO_SMALL
    src = <bytes>out
    memcpy(c.out, src, size)
    c.out_len[0] = size
    return CKR_OK


cdef CK_RV _acc_final(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pOut,
                      CK_ULONG_PTR pulOut) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    cdef CK_ULONG need = 0
    cdef Call c
    if rv != CKR_OK:
        return rv
    s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        rv = _multi_begin(s, which, &op)
        if rv != CKR_OK:
            return rv
        if pulOut == NULL:
            rv = CKR_ARGUMENTS_BAD
        else:
            rv = _out_len(&op, which, op.acclen, &need)
        if rv == CKR_OK:
            if pOut == NULL:
                pulOut[0] = need
                return CKR_OK
            if pulOut[0] < need and not _upper_bound(&op, which):
                pulOut[0] = need
                return CKR_BUFFER_TOO_SMALL
            c = _call(h, s.slot)
            c.which = which
            c.op = &op
            c.out = pOut
            c.out_len = pulOut
            rv = _in_python(_py_acc_final, &c)
        if rv != CKR_BUFFER_TOO_SMALL:
            _op_end(s, which)
        return rv
    finally:
        _session_put(s)


cdef CK_RV f_EncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
                           CK_BYTE_PTR pEncryptedPart,
                           CK_ULONG_PTR pulEncryptedPartLen) noexcept nogil:
    if _op_multi(hSession, OP_ENCRYPT) != MULTI_CBC:
        return _acc_update(hSession, OP_ENCRYPT, pPart, ulPartLen, pEncryptedPart,
                           pulEncryptedPartLen)
    return _cipher_update(hSession, OP_ENCRYPT, pPart, ulPartLen, pEncryptedPart,
                          pulEncryptedPartLen)


cdef CK_RV f_EncryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart,
                          CK_ULONG_PTR pulLastEncryptedPartLen) noexcept nogil:
    if _op_multi(hSession, OP_ENCRYPT) != MULTI_CBC:
        return _acc_final(hSession, OP_ENCRYPT, pLastEncryptedPart, pulLastEncryptedPartLen)
    return _cipher_final(hSession, OP_ENCRYPT, pLastEncryptedPart, pulLastEncryptedPartLen)


cdef CK_RV f_DecryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,
                           CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart,
                           CK_ULONG_PTR pulPartLen) noexcept nogil:
    if _op_multi(hSession, OP_DECRYPT) != MULTI_CBC:
        return _acc_update(hSession, OP_DECRYPT, pEncryptedPart, ulEncryptedPartLen, pPart,
                           pulPartLen)
    return _cipher_update(hSession, OP_DECRYPT, pEncryptedPart, ulEncryptedPartLen, pPart,
                          pulPartLen)


cdef CK_RV f_DecryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart,
                          CK_ULONG_PTR pulLastPartLen) noexcept nogil:
    if _op_multi(hSession, OP_DECRYPT) != MULTI_CBC:
        return _acc_final(hSession, OP_DECRYPT, pLastPart, pulLastPartLen)
    return _cipher_final(hSession, OP_DECRYPT, pLastPart, pulLastPartLen)


cdef CK_RV f_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                        CK_ULONG ulPartLen) noexcept nogil:
    return _mac_update(hSession, OP_SIGN, pPart, ulPartLen)


cdef CK_RV f_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                       CK_ULONG_PTR pulSignatureLen) noexcept nogil:
    return _mac_final(hSession, OP_SIGN, pSignature, pulSignatureLen, 0)


cdef CK_RV f_VerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                          CK_ULONG ulPartLen) noexcept nogil:
    return _mac_update(hSession, OP_VERIFY, pPart, ulPartLen)


cdef CK_RV f_VerifyFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                         CK_ULONG ulSignatureLen) noexcept nogil:
    return _mac_final(hSession, OP_VERIFY, pSignature, NULL, ulSignatureLen)
