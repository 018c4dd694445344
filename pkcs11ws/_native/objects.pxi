# Included by core.pyx: object management, search and attribute output.
# Templates cross to Python as [(CKA type, raw value bytes)]; the provider decodes them by the
# attribute table. Attribute values come back as raw bytes (or a CKR for that attribute) and the
# length-query rules are applied here.

cdef list _template(CK_ATTRIBUTE_PTR t, CK_ULONG n):
    """A caller's CK_ATTRIBUTE array as [(type, value)] (with the GIL)."""
    cdef CK_ULONG i
    out = []
    for i in range(n):
        if t[i].pValue == NULL:
            if t[i].ulValueLen != 0:
                raise PKCS11Error(CKR_ARGUMENTS_BAD, "attribute value NULL with a length")
            out.append((t[i].type, b""))
        else:
            out.append((t[i].type, (<char*>t[i].pValue)[:t[i].ulValueLen]))
    return out


cdef CK_RV _py_create_object(Call* c) except? 0xFFFFFFFF:
    c.result = _prov_s(c.h).create_object(c.slot, _template(c.tmpl, c.count))
    return CKR_OK


cdef CK_RV f_CreateObject(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                          CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if phObject == NULL or (pTemplate == NULL and ulCount > 0):
        return CKR_ARGUMENTS_BAD
    if not (flags & CKF_RW_SESSION):
        # Every object is a token object (CKA_TOKEN must be true).
        return CKR_SESSION_READ_ONLY
    c = _call(hSession, slot)
    c.tmpl = pTemplate
    c.count = ulCount
    rv = _in_python(_py_create_object, &c)
    if rv == CKR_OK:
        phObject[0] = c.result
    return rv


cdef CK_RV _py_destroy_object(Call* c) except? 0xFFFFFFFF:
    _prov_s(c.h).destroy_object(c.slot, c.obj)
    return CKR_OK


cdef CK_RV f_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef ObjRow obj
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if _obj_get(hObject, &obj) != 0 or obj.slot != slot:
        return CKR_OBJECT_HANDLE_INVALID
    if not (flags & CKF_RW_SESSION):
        return CKR_SESSION_READ_ONLY
    c = _call(hSession, slot)
    c.obj = hObject
    return _in_python(_py_destroy_object, &c)


cdef CK_RV _py_copy_object(Call* c) except? 0xFFFFFFFF:
    c.result = _prov_s(c.h).copy_object(c.slot, c.obj, _template(c.tmpl, c.count))
    return CKR_OK


cdef CK_RV f_CopyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                        CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                        CK_OBJECT_HANDLE_PTR phNewObject) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef ObjRow obj
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if phNewObject == NULL or (pTemplate == NULL and ulCount > 0):
        return CKR_ARGUMENTS_BAD
    if _obj_get(hObject, &obj) != 0 or obj.slot != slot:
        return CKR_OBJECT_HANDLE_INVALID
    if not (flags & CKF_RW_SESSION):
        # The copy is a token object.
        return CKR_SESSION_READ_ONLY
    c = _call(hSession, slot)
    c.obj = hObject
    c.tmpl = pTemplate
    c.count = ulCount
    rv = _in_python(_py_copy_object, &c)
    if rv == CKR_OK:
        phNewObject[0] = c.result
    return rv


cdef CK_RV _py_set_attributes(Call* c) except? 0xFFFFFFFF:
    _prov_s(c.h).set_attributes(c.slot, c.obj, _template(c.tmpl, c.count))
    return CKR_OK


cdef CK_RV f_SetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                               CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef CK_FLAGS flags
    cdef ObjRow obj
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, &flags)
    if rv != CKR_OK:
        return rv
    if pTemplate == NULL and ulCount > 0:
        return CKR_ARGUMENTS_BAD
    if _obj_get(hObject, &obj) != 0 or obj.slot != slot:
        return CKR_OBJECT_HANDLE_INVALID
    if not (flags & CKF_RW_SESSION):
        # Every object is a token object: changing one needs a read/write session.
        return CKR_SESSION_READ_ONLY
    c = _call(hSession, slot)
    c.obj = hObject
    c.tmpl = pTemplate
    c.count = ulCount
    return _in_python(_py_set_attributes, &c)


cdef CK_RV _py_object_size(Call* c) except? 0xFFFFFFFF:
    c.result = _prov().object_size(c.slot, c.obj)
    return CKR_OK


cdef CK_RV f_GetObjectSize(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                           CK_ULONG_PTR pulSize) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef ObjRow obj
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, NULL)
    if rv != CKR_OK:
        return rv
    if pulSize == NULL:
        return CKR_ARGUMENTS_BAD
    if _obj_get(hObject, &obj) != 0 or obj.slot != slot:
        return CKR_OBJECT_HANDLE_INVALID
    # An estimate from the cached attributes: no round trip.
    c = _call(hSession, slot)
    c.obj = hObject
    rv = _in_python(_py_object_size, &c)
    if rv == CKR_OK:
        pulSize[0] = c.result
    return rv


cdef CK_RV _py_get_attributes(Call* c) except? 0xFFFFFFFF:
    types = [c.tmpl[i].type for i in range(c.count)]
    values = _prov_s(c.h).get_attributes(c.slot, c.obj, types)
    return _write_attributes(c.tmpl, c.count, values)


cdef CK_RV f_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                               CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef CK_SLOT_ID slot
    cdef ObjRow obj
    cdef Call c
    if rv != CKR_OK:
        return rv
    rv = _session_slot(hSession, &slot, NULL)
    if rv != CKR_OK:
        return rv
    if pTemplate == NULL and ulCount > 0:
        return CKR_ARGUMENTS_BAD
    if _obj_get(hObject, &obj) != 0 or obj.slot != slot:
        return CKR_OBJECT_HANDLE_INVALID
    c = _call(hSession, slot)
    c.obj = hObject
    c.tmpl = pTemplate
    c.count = ulCount
    return _in_python(_py_get_attributes, &c)


cdef CK_RV _write_attributes(CK_ATTRIBUTE_PTR t, CK_ULONG n, list values) except? 0xFFFFFFFF:
    """Apply the C_GetAttributeValue rules to every attribute; the first problem is returned.

    values[i] is the attribute's encoded value, or the CKR for it (ATTRIBUTE_SENSITIVE,
    ATTRIBUTE_TYPE_INVALID). NULL pValue: report the length. Too small: BUFFER_TOO_SMALL.
    Every failed attribute gets ulValueLen = CK_UNAVAILABLE_INFORMATION.
    """
    cdef CK_RV rv = CKR_OK
    cdef CK_ULONG i
    cdef const unsigned char* src
    cdef Py_ssize_t size
    if <CK_ULONG>len(values) != n:
        raise RuntimeError("provider returned a wrong number of attribute values")
    for i in range(n):
        v = values[i]
        if isinstance(v, int):
            t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION
            if rv == CKR_OK:
                rv = v
            continue
        b = <bytes>v
        size = len(b)
        if t[i].pValue == NULL:
            t[i].ulValueLen = size
        elif t[i].ulValueLen >= <CK_ULONG>size:
            src = b
            memcpy(t[i].pValue, src, size)
            t[i].ulValueLen = size
        else:
            t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION
            if rv == CKR_OK:
                rv = CKR_BUFFER_TOO_SMALL
    return rv


cdef CK_RV _py_find(Call* c) except? 0xFFFFFFFF:
    cdef CK_ULONG i, n
    handles = _prov_s(c.h).find(c.slot, _template(c.tmpl, c.count))
    n = len(handles)
    c.found = <CK_OBJECT_HANDLE*>malloc((n or 1) * sizeof(CK_OBJECT_HANDLE))
    if c.found == NULL:
        raise MemoryError()
    c.result = n
    for i in range(n):
        c.found[i] = handles[i]
    return CKR_OK


cdef CK_RV f_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                             CK_ULONG ulCount) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef Call c
    if rv != CKR_OK:
        return rv
    if pTemplate == NULL and ulCount > 0:
        return CKR_ARGUMENTS_BAD
    s = _session_get(hSession)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        pthread_mutex_lock(&g_sess_lock)
        if s.find_active:
            rv = CKR_OPERATION_ACTIVE
        else:
            s.find_active = 2  # being set up: a concurrent init sees it active
        pthread_mutex_unlock(&g_sess_lock)
        if rv != CKR_OK:
            return rv
        c = _call(hSession, s.slot)
        c.tmpl = pTemplate
        c.count = ulCount
        rv = _in_python(_py_find, &c)
        pthread_mutex_lock(&g_sess_lock)
        if rv == CKR_OK:
            s.found = c.found
            s.nfound = c.result
            s.found_pos = 0
            s.find_active = 1
        else:
            free(c.found)
            s.find_active = 0
        pthread_mutex_unlock(&g_sess_lock)
        return rv
    finally:
        _session_put(s)


cdef CK_RV f_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject,
                         CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    cdef CK_ULONG n = 0
    if rv != CKR_OK:
        return rv
    s = _session_get(hSession)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        pthread_mutex_lock(&g_sess_lock)
        if s.find_active != 1:
            rv = CKR_OPERATION_NOT_INITIALIZED
        elif pulObjectCount == NULL or (phObject == NULL and ulMaxObjectCount > 0):
            rv = CKR_ARGUMENTS_BAD
        else:
            n = s.nfound - s.found_pos
            if n > ulMaxObjectCount:
                n = ulMaxObjectCount
            if n:
                memcpy(phObject, &s.found[s.found_pos], n * sizeof(CK_OBJECT_HANDLE))
            s.found_pos += n
            pulObjectCount[0] = n
        pthread_mutex_unlock(&g_sess_lock)
        return rv
    finally:
        _session_put(s)


cdef CK_RV f_FindObjectsFinal(CK_SESSION_HANDLE hSession) noexcept nogil:
    cdef CK_RV rv = _ready()
    cdef Session* s
    if rv != CKR_OK:
        return rv
    s = _session_get(hSession)
    if s == NULL:
        return CKR_SESSION_HANDLE_INVALID
    try:
        pthread_mutex_lock(&g_sess_lock)
        if s.find_active != 1:
            rv = CKR_OPERATION_NOT_INITIALIZED
        else:
            free(s.found)
            s.found = NULL
            s.nfound = s.found_pos = 0
            s.find_active = 0
        pthread_mutex_unlock(&g_sess_lock)
        return rv
    finally:
        _session_put(s)
