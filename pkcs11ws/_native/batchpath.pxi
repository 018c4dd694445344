# Included by core.pyx (after fastpath.pxi): the batch request of group commit (group.pxi)
# when the core's fast path leads it, written here instead of the client's Python (issue 15:
# at 8 threads the batch's sender ran client._send_batch, _send, Transport.request and the
# JSON decoding of the answer, ~20k instructions per request, for ~3.5 calls).
#
# The usual case only: the request id in the body (the service takes Batch.request_id), no
# debug tracing, the request's outcome a 200 whose every item is {"status":200,"answer":...}.
# Each call's answer is then its item's answer as bytes: exactly the body a single request
# would have had (the service writes the item from that body: server/batch_items.py), which
# the fast path reads in C (_read_answer) and client.answer() decodes strictly. Everything else
# - a failure, a 4xx or 5xx, another shape, an item's error - goes to client._send_batch with
# the body and the outcome (counted as the first attempt): the same retry policy, the same
# errors, the same fallback to single requests.

cdef bytes g_ok_item = b'{"status":200,"answer":'
cdef bytes g_results = b'{"results":['
cdef dict g_item_heads = None           # client/wire.py _ITEM_HEADS: per op, an item's start
cdef str g_batch_path = None


cdef void _batch_parts():
    global g_item_heads, g_batch_path
    from pkcs11ws.client import wire  # loaded with the provider already

    g_batch_path = wire.BATCH.path
    g_item_heads = wire._ITEM_HEADS


cdef Py_ssize_t _json_end(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Where the JSON object or array starting at s[i] ends (one past its closing bracket),
    or -1: brackets counted outside strings, escapes skipped. Not a validation: what it
    delimits is decoded (or read exactly) afterwards."""
    cdef int depth = 0
    cdef bint in_str = False
    cdef char ch
    while i < n:
        ch = s[i]
        if in_str:
            if ch == b"\\":
                i += 1
            elif ch == b'"':
                in_str = False
        elif ch == b'"':
            in_str = True
        elif ch == b"{" or ch == b"[":
            depth += 1
        elif ch == b"}" or ch == b"]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


cdef list _batch_answers(bytes raw, Py_ssize_t count):
    """The count items' answers (bytes) of a batch answer of the usual shape, else None."""
    cdef const char* s = PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t pos, end, k
    cdef Py_ssize_t ok_len = PyBytes_GET_SIZE(g_ok_item)
    cdef Py_ssize_t head_len = PyBytes_GET_SIZE(g_results)
    cdef list out = []
    if n < head_len or memcmp(s, PyBytes_AS_STRING(g_results), head_len) != 0:
        return None
    pos = head_len
    for k in range(count):
        if k:
            if pos >= n or s[pos] != b",":
                return None
            pos += 1
        if n - pos < ok_len or memcmp(s + pos, PyBytes_AS_STRING(g_ok_item), ok_len) != 0:
            return None
        pos += ok_len
        if pos >= n or s[pos] != b"{":
            return None
        end = _json_end(s, pos, n)
        if end < 0 or end >= n or s[end] != b"}":
            return None
        out.append(PyBytes_FromStringAndSize(s + pos, end - pos))
        pos = end + 1
    if n - pos != 2 or s[pos] != b"]" or s[pos + 1] != b"}":
        return None
    return out


cdef object _send_batch(object client, list calls):
    """client._send_batch(calls) (client/api.py), its usual case here (see above); never
    raises, as that method."""
    cdef bytes field, head, item
    cdef char num[24]
    cdef int num_len
    cdef Py_ssize_t size, i, ncalls = PyList_GET_SIZE(calls)
    cdef double started
    cdef char* w
    cdef Queued c
    cdef list answers
    if g_specs is None:
        _client_parts()
    if g_item_heads is None:
        _batch_parts()
    if not client._batch_rid_in_body or client.log.level >= g_debug3:
        return client._send_batch(calls)
    try:
        ids = g_ids
        field = <bytes?>ids.field
        num_len = snprintf(num, sizeof(num), b'%lld","items":[', <long long>next(ids.count))
        # The body: what wire.batch_body writes (each item its op's head, the call's body, "}").
        size = PyBytes_GET_SIZE(field) + num_len + 2 + ncalls - 1
        started = (<Queued>calls[0]).started
        for i in range(ncalls):
            c = <Queued>calls[i]
            size += PyBytes_GET_SIZE(<bytes?>g_item_heads[c.op]) + PyBytes_GET_SIZE(c.data) + 1
            if c.started < started:
                started = c.started
        body = PyBytes_FromStringAndSize(NULL, size)
        w = PyBytes_AS_STRING(body)
        memcpy(w, PyBytes_AS_STRING(field), PyBytes_GET_SIZE(field))
        w += PyBytes_GET_SIZE(field)
        memcpy(w, num, num_len)
        w += num_len
        for i in range(ncalls):
            c = <Queued>calls[i]
            if i:
                w[0] = b","
                w += 1
            head = <bytes>g_item_heads[c.op]
            memcpy(w, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
            w += PyBytes_GET_SIZE(head)
            memcpy(w, PyBytes_AS_STRING(c.data), PyBytes_GET_SIZE(c.data))
            w += PyBytes_GET_SIZE(c.data)
            w[0] = b"}"
            w += 1
        w[0] = b"]"
        w[1] = b"}"
    except BaseException:  # not the usual calls (an op without an item head): the client's way
        return client._send_batch(calls)
    try:
        status, raw = _request(client.transport, g_batch_path, body, g_base_headers,
                               started + <double>client.timeout)
    except BaseException as failure:
        if isinstance(failure, g_curl_failure):
            return client._send_batch(calls, body, failure)
        for c in calls:  # every carried call fails with it (what _send_batch does)
            c.error = failure
        return None
    answers = None
    if status == 200 and type(raw) is bytes:
        answers = _batch_answers(<bytes>raw, ncalls)
    if answers is None:
        return client._send_batch(calls, body, (status, raw))
    for i in range(ncalls):
        c = <Queued>calls[i]
        c.status = 200
        c.answer = answers[i]
    return None
