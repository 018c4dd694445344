# Included by core.pyx: one parser per parameter kind (mechanisms.Param), without the GIL.
# A struct kind checks its CK_*_PARAMS (size, known hash and MGF, lengths) and serialises it for the
# provider (pkcs11ws/params.py decodes it): CK_ULONG fields in native order (little-endian on
# the LP64 hosts this builds for) followed by any byte strings. The struct layouts are the
# generated declarations of pkcs11ws/abi.py (ck.pxd).

# The hashes and MGFs a PSS or OAEP parameter may name: mechanisms.HASHES and MGFS, copied
# here at import (_params_init).
cdef enum:
    MAX_HASHES = 16
cdef CK_ULONG g_hashes[MAX_HASHES]
cdef CK_ULONG g_mgfs[MAX_HASHES]
cdef int g_nhashes = 0, g_nmgfs = 0


cdef bint _in(const CK_ULONG* codes, int n, CK_ULONG v) noexcept nogil:
    cdef int i
    for i in range(n):
        if codes[i] == v:
            return True
    return False


cdef bint _hash_ok(CK_MECHANISM_TYPE h) noexcept nogil:
    return _in(g_hashes, g_nhashes, h)


cdef bint _mgf_ok(CK_ULONG g) noexcept nogil:
    return _in(g_mgfs, g_nmgfs, g)


cdef bint _tag_bits_ok(CK_ULONG bits) noexcept nogil:
    return bits == 32 or bits == 64 or (96 <= bits <= 128 and bits % 8 == 0)


cdef CK_RV _blob(OpState* op, CK_ULONG* nums, int n, const CK_BYTE* a, CK_ULONG alen,
                 const CK_BYTE* b, CK_ULONG blen) noexcept nogil:
    cdef CK_ULONG size = n * sizeof(CK_ULONG) + alen + blen
    cdef CK_BYTE* p = <CK_BYTE*>malloc(size or 1)
    if p == NULL:
        return CKR_HOST_MEMORY
    memcpy(p, nums, n * sizeof(CK_ULONG))
    if alen:
        memcpy(p + n * sizeof(CK_ULONG), a, alen)
    if blen:
        memcpy(p + n * sizeof(CK_ULONG) + alen, b, blen)
    op.prm = p
    op.prmlen = size
    return CKR_OK


cdef CK_RV _parse_pss(CK_MECHANISM_PTR m, OpState* op) noexcept nogil:
    cdef CK_RSA_PKCS_PSS_PARAMS* p
    cdef CK_ULONG nums[3]
    if m.pParameter == NULL or m.ulParameterLen != sizeof(CK_RSA_PKCS_PSS_PARAMS):
        return CKR_MECHANISM_PARAM_INVALID
    p = <CK_RSA_PKCS_PSS_PARAMS*>m.pParameter
    if not _hash_ok(p.hashAlg) or not _mgf_ok(p.mgf):
        return CKR_MECHANISM_PARAM_INVALID
    nums[0] = p.hashAlg
    nums[1] = p.mgf
    nums[2] = p.sLen
    return _blob(op, nums, 3, NULL, 0, NULL, 0)


cdef CK_RV _parse_oaep(CK_MECHANISM_PTR m, OpState* op) noexcept nogil:
    cdef CK_RSA_PKCS_OAEP_PARAMS* p
    cdef CK_ULONG nums[2]
    if m.pParameter == NULL or m.ulParameterLen != sizeof(CK_RSA_PKCS_OAEP_PARAMS):
        return CKR_MECHANISM_PARAM_INVALID
    p = <CK_RSA_PKCS_OAEP_PARAMS*>m.pParameter
    if not _hash_ok(p.hashAlg) or not _mgf_ok(p.mgf):
        return CKR_MECHANISM_PARAM_INVALID
    if p.ulSourceDataLen and (p.source != CKZ_DATA_SPECIFIED or p.pSourceData == NULL):
        return CKR_MECHANISM_PARAM_INVALID
    nums[0] = p.hashAlg
    nums[1] = p.mgf
    return _blob(op, nums, 2, <CK_BYTE*>p.pSourceData, p.ulSourceDataLen, NULL, 0)


cdef CK_RV _parse_gcm(CK_MECHANISM_PTR m, OpState* op) noexcept nogil:
    cdef CK_GCM_PARAMS* p
    cdef CK_ULONG nums[2]
    if m.pParameter == NULL or m.ulParameterLen != sizeof(CK_GCM_PARAMS):
        return CKR_MECHANISM_PARAM_INVALID
    p = <CK_GCM_PARAMS*>m.pParameter
    # IVs of 8 to 128 bytes (SP 800-38D allows longer; 12 is the recommended length).
    if p.pIv == NULL or not 8 <= p.ulIvLen <= 128 or not _tag_bits_ok(p.ulTagBits):
        return CKR_MECHANISM_PARAM_INVALID
    if p.ulAADLen and p.pAAD == NULL:
        return CKR_MECHANISM_PARAM_INVALID
    op.tag_len = p.ulTagBits // 8
    nums[0] = p.ulTagBits
    nums[1] = p.ulIvLen
    return _blob(op, nums, 2, p.pIv, p.ulIvLen, p.pAAD, p.ulAADLen)


cdef CK_RV _parse_none(CK_MECHANISM_PTR m, OpState* op) noexcept nogil:
    return CKR_MECHANISM_PARAM_INVALID if m.ulParameterLen != 0 else CKR_OK


cdef CK_RV _parse_iv16(CK_MECHANISM_PTR m, OpState* op) noexcept nogil:
    if m.pParameter == NULL or m.ulParameterLen != 16:
        return CKR_MECHANISM_PARAM_INVALID
    memcpy(op.iv, m.pParameter, 16)
    return CKR_OK


cdef CK_RV _parse_mac_len(CK_MECHANISM_PTR m, OpState* op) noexcept nogil:
    cdef CK_ULONG v
    if m.pParameter == NULL or m.ulParameterLen != sizeof(CK_MAC_GENERAL_PARAMS):
        return CKR_MECHANISM_PARAM_INVALID
    v = (<CK_MAC_GENERAL_PARAMS*>m.pParameter)[0]
    # The _GENERAL HMACs give half to all of the hash's output (guide 6.3).
    if v * 2 < g_mechs[op.row].out_len or v > g_mechs[op.row].out_len:
        return CKR_MECHANISM_PARAM_INVALID
    op.mac_len = v
    return CKR_OK


# One parser per parameter kind, indexed by PARAM_* (mech_gen.pxd). Each reads
# CK_MECHANISM.pParameter into the operation state (op.row is set); one that allocates leaves
# it in op.prm, which _op_clear frees. _load_mechanisms refuses a row whose kind has none.
ctypedef CK_RV (*ParamParser)(CK_MECHANISM_PTR m, OpState* op) noexcept nogil
cdef ParamParser g_parsers[N_PARAM]


cdef int _params_init() except -1:
    global g_nhashes, g_nmgfs
    if len(_mechanisms.HASHES) > MAX_HASHES or len(_mechanisms.MGFS) > MAX_HASHES:
        raise RuntimeError("more hashes than the core's table")
    for i, code in enumerate(_mechanisms.HASHES):
        g_hashes[i] = code
    g_nhashes = len(_mechanisms.HASHES)
    for i, code in enumerate(_mechanisms.MGFS):
        g_mgfs[i] = code
    g_nmgfs = len(_mechanisms.MGFS)
    memset(g_parsers, 0, sizeof(g_parsers))
    g_parsers[PARAM_NONE] = _parse_none
    g_parsers[PARAM_IV16] = _parse_iv16
    g_parsers[PARAM_MAC_LEN] = _parse_mac_len
    g_parsers[PARAM_RSA_PSS] = _parse_pss
    g_parsers[PARAM_RSA_OAEP] = _parse_oaep
    g_parsers[PARAM_GCM] = _parse_gcm
    return 0
