# Included by core.pyx: key generation, single-part encrypt/decrypt/sign/verify, random.
# (Multi-part: multipart.pxi.)
# C_*Init is checked entirely here (session, key, login, mechanism, parameter, usage) without
# the GIL. The output length is computed from the mechanism and input size, so the two-call
# length convention never costs a round trip; the one request is made by the call that has a
# big enough buffer. An operation ends on any result but CKR_BUFFER_TOO_SMALL or a successful
# length query.

cdef CK_FLAGS _op_flag(int which) noexcept nogil:
    if which == OP_ENCRYPT:
        return CKF_ENCRYPT
    if which == OP_DECRYPT:
        return CKF_DECRYPT
    if which == OP_SIGN:
        return CKF_SIGN
    return CKF_VERIFY


cdef CK_RV _op_check(CK_SLOT_ID slot, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE key, int which,
                     OpState* op) noexcept nogil:
    """C_*Init from the mechanism's row alone: the operation's flag, the parameter by its
    kind's parser, the key's class for this operation and its type, the usage bit. Nothing here
    names a mechanism or a family."""
    cdef ObjRow obj
    cdef int row
    cdef CK_RV rv
    if m == NULL:
        return CKR_ARGUMENTS_BAD
    if _obj_get(key, &obj) != 0 or obj.slot != slot:
        return CKR_KEY_HANDLE_INVALID
    # A public session uses public objects (PKCS#11 4.4): a public key that is not CKA_PRIVATE
    # verifies and encrypts in the module without a login; every other key needs one.
    if (obj.private or obj.cls != CKO_PUBLIC_KEY) and not _slot_logged_in(slot):
        return CKR_USER_NOT_LOGGED_IN
    row = _mech_find(m.mechanism)
    if row < 0 or not (g_mechs[row].flags & _op_flag(which)):
        return CKR_MECHANISM_INVALID
    memset(op, 0, sizeof(OpState))
    op.row = row
    op.mech = m.mechanism
    op.key = key
    op.mac_len = g_mechs[row].out_len
    rv = g_parsers[g_mechs[row].param](m, op)
    if rv == CKR_OK:
        if obj.cls != g_mechs[row].key_class[which] or not _mech_takes_key(row, obj.key_type):
            rv = CKR_KEY_TYPE_INCONSISTENT
        elif not (obj.usage & (<CK_ULONG>1 << which)):
            rv = CKR_KEY_FUNCTION_NOT_PERMITTED
    if rv != CKR_OK:
        free(op.prm)
        op.prm = NULL
        return rv
    if g_mechs[row].key_sized:
        op.mac_len = obj.size
    op.active = 1
    return CKR_OK


cdef CK_RV _op_init(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE key,
                    int which) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    if rv != CKR_OK:
        return rv
    s = _session_get(h)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        if s.ops[which].active:
            return CKR_OPERATION_ACTIVE
        rv = _op_check(s.slot, m, key, which, &op)
        if rv == CKR_OK:
            pthread_mutex_lock(&g_sess_lock)
            if s.ops[which].active:
                rv = CKR_OPERATION_ACTIVE
                free(op.prm)
            else:
                s.ops[which] = op
            pthread_mutex_unlock(&g_sess_lock)
        return rv
    finally:
        _session_put(s)


cdef void _op_end(Session* s, int which) noexcept nogil:
    pthread_mutex_lock(&g_sess_lock)
    _op_clear(&s.ops[which])
    pthread_mutex_unlock(&g_sess_lock)


cdef CK_RV _out_len(OpState* op, int which, CK_ULONG n, CK_ULONG* out) noexcept nogil:
    """The output length of one call by the mechanism's rule (mechanisms.OutLen)."""
    cdef int rule = g_mechs[op.row].rule
    if which == OP_SIGN or which == OP_VERIFY or rule == RULE_MODULUS:
        # RSA decryption: the modulus is an upper bound, the exact length comes with the data.
        if which == OP_DECRYPT and n != op.mac_len:
            return CKR_ENCRYPTED_DATA_LEN_RANGE
        out[0] = op.mac_len
    elif rule == RULE_GCM:
        if which == OP_ENCRYPT:
            out[0] = n + op.tag_len
        elif n < op.tag_len:
            return CKR_ENCRYPTED_DATA_LEN_RANGE
        else:
            out[0] = n - op.tag_len
    elif which == OP_ENCRYPT:
        if rule == RULE_CBC_PAD:
            out[0] = n + 16 - n % 16
        elif n % 16:
            return CKR_DATA_LEN_RANGE
        else:
            out[0] = n
    else:
        if n % 16 or (rule == RULE_CBC_PAD and n == 0):
            return CKR_ENCRYPTED_DATA_LEN_RANGE
        # CBC-PAD: an upper bound (the spec allows it); the exact length comes with the data.
        out[0] = n
    return CKR_OK


cdef bint _upper_bound(OpState* op, int which) noexcept nogil:
    """Whether _out_len gave an upper bound (the exact length comes with the answer)."""
    return which == OP_DECRYPT and (g_mechs[op.row].rule == RULE_CBC_PAD
                                    or g_mechs[op.row].rule == RULE_MODULUS)


cdef object _crypt_call(CK_SESSION_HANDLE h, CK_SLOT_ID slot, OpState* op, int which,
                        bytes data, bytes signature=None):
    """The one way an operation reaches the provider (with the GIL): the data, and what the
    operation state holds for the mechanism (CBC chaining value, MAC length, the serialised
    struct parameter)."""
    return _prov_s(h).crypto(which, slot, op.key, op.mech, data,
                             (<char*>op.iv)[:16] if g_mechs[op.row].param == PARAM_IV16 else b"",
                             op.mac_len, (<char*>op.prm)[:op.prmlen] if op.prmlen else b"",
                             signature)


cdef bint _kept_matches(OpState* op, CK_BYTE_PTR data, CK_ULONG n) noexcept nogil:
    return (op.kept_out != NULL and op.kept_in_len == n
            and (n == 0 or memcmp(op.kept_in, data, n) == 0))


cdef CK_RV _keep(Session* s, int which, CK_BYTE_PTR data, CK_ULONG n, bytes result) except? 1:
    """Keep an over-long result for the retry (with the GIL; takes the session lock)."""
    cdef Py_ssize_t size = len(result)
    cdef const unsigned char* src = result
    cdef CK_BYTE* kin = <CK_BYTE*>malloc(n or 1)
    cdef CK_BYTE* kout = <CK_BYTE*>malloc(size or 1)
    if kin == NULL or kout == NULL:
        free(kin)
        free(kout)
        raise MemoryError()
    memcpy(kin, data, n)
    memcpy(kout, src, size)
    pthread_mutex_lock(&g_sess_lock)
    free(s.ops[which].kept_in)
    free(s.ops[which].kept_out)
    s.ops[which].kept_in = kin
    s.ops[which].kept_in_len = n
    s.ops[which].kept_out = kout
    s.ops[which].kept_out_len = size
    pthread_mutex_unlock(&g_sess_lock)
    return CKR_OK


cdef CK_RV _py_single(Call* c) except? 0xFFFFFFFF:
    cdef OpState* op = c.op
    cdef Py_ssize_t size
    cdef const unsigned char* src
    out = _fast(c, c.which, NULL, 0)  # fastpath.pxi
    if out is _SLOW:
        data = (<char*>c.data)[:c.data_len] if c.data_len else b""
        out = _crypt_call(c.h, c.slot, op, c.which, data)
    size = len(out)
    if <CK_ULONG>size > c.out_len[0]:
        _keep(c.s, c.which, c.data, c.data_len, out)
        c.out_len[0] = size
        return CKR_BUFFER_TOO_SMALL
    src = <bytes>out
    memcpy(c.out, src, size)
    c.out_len[0] = size
    return CKR_OK


cdef CK_RV _single(CK_SESSION_HANDLE h, int which, CK_BYTE_PTR pIn, CK_ULONG ulIn,
                   CK_BYTE_PTR pOut, CK_ULONG_PTR pulOut) noexcept nogil:
    """C_Encrypt, C_Decrypt and C_Sign: one request, made once the buffer is big enough."""
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
        pthread_mutex_lock(&g_sess_lock)
        op = s.ops[which]
        pthread_mutex_unlock(&g_sess_lock)
        if not op.active:
            return CKR_OPERATION_NOT_INITIALIZED
        if op.multi:
            # A multi-part operation ends only with its C_*Final.
            return CKR_OPERATION_ACTIVE
        if pulOut == NULL or (pIn == NULL and ulIn > 0):
            rv = CKR_ARGUMENTS_BAD
        else:
            rv = _out_len(&op, which, ulIn, &need)
        if rv == CKR_OK and which == OP_DECRYPT and _kept_matches(&op, pIn, ulIn):
            if pOut == NULL or pulOut[0] < op.kept_out_len:
                pulOut[0] = op.kept_out_len
                return CKR_OK if pOut == NULL else CKR_BUFFER_TOO_SMALL
            memcpy(pOut, op.kept_out, op.kept_out_len)
            pulOut[0] = op.kept_out_len
        elif rv == CKR_OK:
            if pOut == NULL:
                pulOut[0] = need
                return CKR_OK
            if pulOut[0] < need and not _upper_bound(&op, which):
                pulOut[0] = need
                return CKR_BUFFER_TOO_SMALL
            if need == 0 and g_mechs[op.row].rule == RULE_CBC:
                # Unpadded CBC of nothing is nothing: no request needed.
                pulOut[0] = 0
            else:
                c = _call(h, s.slot)
                c.s = s
                c.which = which
                c.op = &op
                c.data = pIn
                c.data_len = ulIn
                c.out = pOut
                c.out_len = pulOut
                rv = _in_python(_py_single, &c)
        if rv != CKR_BUFFER_TOO_SMALL:
            _op_end(s, which)
        return rv
    finally:
        _session_put(s)


cdef CK_RV f_EncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                         CK_OBJECT_HANDLE hKey) noexcept nogil:
    return _op_init(hSession, pMechanism, hKey, OP_ENCRYPT)


cdef CK_RV f_DecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                         CK_OBJECT_HANDLE hKey) noexcept nogil:
    return _op_init(hSession, pMechanism, hKey, OP_DECRYPT)


cdef CK_RV f_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                      CK_OBJECT_HANDLE hKey) noexcept nogil:
    return _op_init(hSession, pMechanism, hKey, OP_SIGN)


cdef CK_RV f_VerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                        CK_OBJECT_HANDLE hKey) noexcept nogil:
    return _op_init(hSession, pMechanism, hKey, OP_VERIFY)


cdef CK_RV f_Encrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                     CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen) noexcept nogil:
    return _single(hSession, OP_ENCRYPT, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen)


cdef CK_RV f_Decrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData,
                     CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData,
                     CK_ULONG_PTR pulDataLen) noexcept nogil:
    return _single(hSession, OP_DECRYPT, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen)


cdef CK_RV f_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                  CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) noexcept nogil:
    return _single(hSession, OP_SIGN, pData, ulDataLen, pSignature, pulSignatureLen)


cdef CK_RV _py_verify(Call* c) except? 0xFFFFFFFF:
    if _fast(c, OP_VERIFY, c.data2, c.data2_len) is _SLOW:  # fastpath.pxi
        data = (<char*>c.data)[:c.data_len] if c.data_len else b""
        _crypt_call(c.h, c.slot, c.op, OP_VERIFY, data, (<char*>c.data2)[:c.data2_len])
    return CKR_OK


cdef CK_RV f_Verify(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                    CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef OpState op
    cdef Call c
    if rv != CKR_OK:
        return rv
    s = _session_get(hSession)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        pthread_mutex_lock(&g_sess_lock)
        op = s.ops[OP_VERIFY]
        pthread_mutex_unlock(&g_sess_lock)
        if not op.active:
            return CKR_OPERATION_NOT_INITIALIZED
        if op.multi:
            return CKR_OPERATION_ACTIVE
        if (pData == NULL and ulDataLen > 0) or (pSignature == NULL and ulSignatureLen > 0):
            rv = CKR_ARGUMENTS_BAD
        elif ulSignatureLen != op.mac_len:
            rv = CKR_SIGNATURE_LEN_RANGE
        else:
            c = _call(hSession, s.slot)
            c.op = &op
            c.data = pData
            c.data_len = ulDataLen
            c.data2 = pSignature
            c.data2_len = ulSignatureLen
            rv = _in_python(_py_verify, &c)
        _op_end(s, OP_VERIFY)
        return rv
    finally:
        _session_put(s)


cdef CK_RV _py_generate_key(Call* c) except? 0xFFFFFFFF:
    c.result = _prov_s(c.h).generate_key(c.slot, c.mech, _template(c.tmpl, c.count))
    return CKR_OK


cdef CK_RV f_GenerateKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                         CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                         CK_OBJECT_HANDLE_PTR phKey) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef int row
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if pMechanism == NULL or phKey == NULL or (pTemplate == NULL and ulCount > 0):
        return CKR_ARGUMENTS_BAD
    row = _mech_find(pMechanism.mechanism)
    if row < 0 or not (g_mechs[row].flags & CKF_GENERATE):
        return CKR_MECHANISM_INVALID
    if pMechanism.ulParameterLen != 0:
        return CKR_MECHANISM_PARAM_INVALID
    if not (flags & CKF_RW_SESSION):
        return CKR_SESSION_READ_ONLY
    c = _call(hSession, slot)
    c.mech = pMechanism.mechanism
    c.tmpl = pTemplate
    c.count = ulCount
    rv = _in_python(_py_generate_key, &c)
    if rv == CKR_OK:
        phKey[0] = c.result
    return rv


cdef CK_RV _py_generate_key_pair(Call* c) except? 0xFFFFFFFF:
    pub, priv = _prov_s(c.h).generate_key_pair(c.slot, c.mech, _template(c.tmpl, c.count),
                                               _template(c.tmpl2, c.count2))
    c.result = pub
    c.result2 = priv
    return CKR_OK


cdef CK_RV f_GenerateKeyPair(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                             CK_ATTRIBUTE_PTR pPublicKeyTemplate,
                             CK_ULONG ulPublicKeyAttributeCount,
                             CK_ATTRIBUTE_PTR pPrivateKeyTemplate,
                             CK_ULONG ulPrivateKeyAttributeCount, CK_OBJECT_HANDLE_PTR phPublicKey,
                             CK_OBJECT_HANDLE_PTR phPrivateKey) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef int row
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if (pMechanism == NULL or phPublicKey == NULL or phPrivateKey == NULL
            or (pPublicKeyTemplate == NULL and ulPublicKeyAttributeCount > 0)
            or (pPrivateKeyTemplate == NULL and ulPrivateKeyAttributeCount > 0)):
        return CKR_ARGUMENTS_BAD
    row = _mech_find(pMechanism.mechanism)
    if row < 0 or not (g_mechs[row].flags & CKF_GENERATE_KEY_PAIR):
        return CKR_MECHANISM_INVALID
    if pMechanism.ulParameterLen != 0:
        return CKR_MECHANISM_PARAM_INVALID
    if not (flags & CKF_RW_SESSION):
        return CKR_SESSION_READ_ONLY
    c = _call(hSession, slot)
    c.mech = pMechanism.mechanism
    c.tmpl = pPublicKeyTemplate
    c.count = ulPublicKeyAttributeCount
    c.tmpl2 = pPrivateKeyTemplate
    c.count2 = ulPrivateKeyAttributeCount
    rv = _in_python(_py_generate_key_pair, &c)
    if rv == CKR_OK:
        phPublicKey[0] = c.result
        phPrivateKey[0] = c.result2
    return rv


cdef CK_RV _py_random(Call* c) except? 0xFFFFFFFF:
    cdef const unsigned char* src
    out = _prov_s(c.h).random(c.data_len)
    if <CK_ULONG>len(out) != c.data_len:
        raise RuntimeError("random: wrong length from the provider")
    src = <bytes>out
    memcpy(c.out, src, c.data_len)
    return CKR_OK


cdef CK_RV f_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData,
                            CK_ULONG ulRandomLen) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, NULL)
    if rv != CKR_OK:
        return rv
    if RandomData == NULL and ulRandomLen > 0:
        return CKR_ARGUMENTS_BAD
    if ulRandomLen == 0:
        return CKR_OK
    c = _call(hSession, slot)
    c.out = RandomData
    c.data_len = ulRandomLen
    return _in_python(_py_random, &c)
