# Included by core.pyx: the steady-state request of a single-part sign, verify, encrypt or
# decrypt with no IV or struct parameter, built and read here instead of in the provider's and
# the client's Python (bench/results/profile-issue15-client-cpu.md, Round 6: after each wait
# for an answer the interpreter runs cold, so every frame, lookup and object between the core
# and pycurl costs several times its warm price).
#
# The provider's crypto() leaves, per key handle, what its last such request used (Provider.fast:
# the Obj, the token, the request head up to the data). The fast path uses it only while the
# directory still holds that Obj, the provider that token (both by identity) and the token is
# not due for renewal: exactly the checks crypto() makes, so no entry ever needs invalidating.
# It then writes the body (head, base64 of the data and signature, the MAC length of a
# _GENERAL mechanism: what client.crypto() writes), hands it to the group commit (or the
# client's single request: retries, deadline and request id stay theirs), and reads the
# answer when it has the one compact shape the service gives; any other answer, and every
# error answer, goes to the client's strict decoding (client.answer(): the same BAD_RESPONSE
# and CKRs as before). A ServiceError passes through provider.failed(), as in crypto().
# Anything else (no entry, another mechanism, a public key, an IV or parameter, a renewal due,
# a changed login or object) takes the provider's path, which also makes the entry.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.long cimport PyLong_FromUnsignedLong
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdio cimport snprintf

cdef extern from "Python.h":
    # NULL items: the slice is deleted (list.clear() without a method call).
    int _list_cut "PyList_SetSlice" (object, Py_ssize_t, Py_ssize_t, PyObject*) except -1

from pkcs11ws.errors import ServiceError as _ServiceError

cdef object _SLOW = object()            # "take the provider's path" (None means verified)
cdef tuple _OP_NAME = ("encrypt", "decrypt", "sign", "verify")  # per OP_ENCRYPT .. OP_VERIFY
cdef const char* _B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef signed char g_b64val[256]
# Per OP_*: the answer's output field as it starts a compact answer (b'{"signature":"'), and
# the whole answer of a verify that holds (b'{"valid":true}'); None where the answer has more
# fields than its output (those go to client.answer()). Read from the client's view of the
# protocol schema (client/wire.py CRYPTO) on first use: the core imports no client module.
cdef list g_answer_heads = None
cdef list g_answer_fields = None        # per OP_*: the output field's name
cdef bytes g_verified = None


cdef void _b64_init() noexcept nogil:
    cdef int i
    for i in range(256):
        g_b64val[i] = -1
    for i in range(64):
        g_b64val[<unsigned char>_B64[i]] = i


_b64_init()


cdef char* _b64_put(const unsigned char* src, Py_ssize_t n, char* w) noexcept nogil:
    """Standard base64 with padding (binascii.b2a_base64's, no newline); returns the end."""
    cdef Py_ssize_t i = 0
    cdef unsigned int v
    while i + 3 <= n:
        v = (<unsigned int>src[i] << 16) | (<unsigned int>src[i + 1] << 8) | src[i + 2]
        w[0] = _B64[v >> 18]
        w[1] = _B64[(v >> 12) & 63]
        w[2] = _B64[(v >> 6) & 63]
        w[3] = _B64[v & 63]
        w += 4
        i += 3
    if n - i == 1:
        v = <unsigned int>src[i] << 16
        w[0] = _B64[v >> 18]
        w[1] = _B64[(v >> 12) & 63]
        w[2] = b"="
        w[3] = b"="
        w += 4
    elif n - i == 2:
        v = (<unsigned int>src[i] << 16) | (<unsigned int>src[i + 1] << 8)
        w[0] = _B64[v >> 18]
        w[1] = _B64[(v >> 12) & 63]
        w[2] = _B64[(v >> 6) & 63]
        w[3] = b"="
        w += 4
    return w


cdef object _b64_canonical(const char* s, Py_ssize_t n):
    """s decoded when it is the canonical base64 of its bytes (what protocol.canonical_b64
    accepts, a subset of it at most), else None."""
    cdef Py_ssize_t pad = 0
    cdef Py_ssize_t i, out_len
    cdef int a, b, c, d
    cdef unsigned char* w
    if n % 4:
        return None
    if n and s[n - 1] == b"=":
        pad = 2 if s[n - 2] == b"=" else 1
    out_len = n // 4 * 3 - pad
    out = PyBytes_FromStringAndSize(NULL, out_len)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    i = 0
    while i < n:
        a = g_b64val[<unsigned char>s[i]]
        b = g_b64val[<unsigned char>s[i + 1]]
        if i + 4 == n and pad:
            c = 0 if pad == 2 else g_b64val[<unsigned char>s[i + 2]]
            d = 0
            # The unused low bits of the last character are zero: one spelling per value.
            if a < 0 or b < 0 or c < 0 or (pad == 2 and b & 15) or (pad == 1 and c & 3):
                return None
        else:
            c = g_b64val[<unsigned char>s[i + 2]]
            d = g_b64val[<unsigned char>s[i + 3]]
            if a < 0 or b < 0 or c < 0 or d < 0:
                return None
        w[0] = <unsigned char>((a << 2) | (b >> 4))
        if i + 4 < n or pad < 2:
            w[1] = <unsigned char>(((b & 15) << 4) | (c >> 2))
        if i + 4 < n or pad < 1:
            w[2] = <unsigned char>(((c & 3) << 6) | d)
        w += 3
        i += 4
    return out


cdef void _answer_shapes():
    global g_answer_heads, g_answer_fields, g_verified
    from pkcs11ws.client.wire import CRYPTO  # loaded with the provider already
    heads = []
    fields = []
    for name in _OP_NAME:
        shape = CRYPTO[name]
        fields.append(shape.out)
        if shape.boolean:
            g_verified = b'{"%s":true}' % shape.out.encode("ascii")
            heads.append(None)
        else:
            heads.append(b'{"%s":"' % shape.out.encode("ascii") if not shape.more else None)
    g_answer_fields = fields
    g_answer_heads = heads


cdef object _read_answer(int which, object r):
    """The output in an answer of the one expected compact shape (bytes: a single request's
    body; dict: a batch item's parsed answer), None for a verify that holds, else _SLOW."""
    cdef const char* s
    cdef Py_ssize_t n, hn
    cdef bytes head
    if g_answer_heads is None:
        _answer_shapes()
    head = g_answer_heads[which]
    if type(r) is bytes:
        s = PyBytes_AS_STRING(r)
        n = PyBytes_GET_SIZE(r)
        if head is None:
            return None if which == OP_VERIFY and r == g_verified else _SLOW
        hn = PyBytes_GET_SIZE(head)
        if n < hn + 2 or memcmp(s, PyBytes_AS_STRING(head), hn) != 0 or s[n - 2] != b'"' \
                or s[n - 1] != b"}":
            return _SLOW
        out = _b64_canonical(s + hn, n - hn - 2)
        return _SLOW if out is None else out
    if type(r) is dict and len(<dict>r) == 1:
        if head is None:
            if which == OP_VERIFY and (<dict>r).get(g_answer_fields[which]) is True:
                return None
            return _SLOW
        value = (<dict>r).get(g_answer_fields[which])
        if type(value) is str:
            s = PyUnicode_AsUTF8AndSize(value, &n)
            out = _b64_canonical(s, n)
            return _SLOW if out is None else out
    return _SLOW


# The client's pieces of a single request, per OP_* (read on first use, as above): the
# endpoint's spec, method and path, and the module-wide ones.
cdef list g_specs = None
cdef list g_post_paths = None           # per OP_*: the path of a POST endpoint (else None)
cdef object g_ids = None                # client/api.py _REQUEST_IDS (reset in a forked child)
cdef tuple g_base_headers = None
cdef object g_curl_failure = None
cdef int g_debug3 = 0


cdef void _client_parts():
    global g_specs, g_post_paths, g_ids, g_base_headers, g_curl_failure, g_debug3
    from pkcs11ws.client import api  # loaded with the provider already
    from pkcs11ws.log import DEBUG3

    g_specs = [api.ENDPOINTS[name] for name in _OP_NAME]
    g_post_paths = [spec.path if spec.method == "POST" else None for spec in g_specs]
    g_ids = api._REQUEST_IDS
    g_base_headers = <tuple?>api.BASE_HEADERS
    g_curl_failure = api.CurlFailure
    g_debug3 = DEBUG3


cdef class Handle:
    """The per-request fields of an easy handle of the transport's pool: client/transport.py's
    _Conn is this class with its set-up and closing. C fields, so _request below reads and
    writes them without an instance lookup each (about twenty per request), and Python code
    sees them as ordinary attributes."""

    cdef public object curl             # the pycurl.Curl, None once closed
    cdef public object setopt           # its methods, looked up once (pycurl's lookup is slow)
    cdef public object perform
    cdef public object getinfo
    cdef public list chunks             # the answer's pieces (its WRITEFUNCTION is their append)
    cdef public object socks
    cdef public object server
    cdef public object headers          # the header list set on the handle (by identity)
    cdef public str method
    cdef public str path                # the path in the handle's URL
    cdef public long long timeout_ms    # the handle's CURLOPT_TIMEOUT_MS now
    cdef public long pid
    cdef public bint busy               # a request runs on it: close() waits for it
    cdef public bint used
    cdef public Py_ssize_t requests
    cdef public Py_ssize_t connects
    cdef public Py_ssize_t failures
    cdef object __weakref__


cdef class TransportFields:
    """The fields of client/transport.py's Transport (its base class) that every request reads:
    C fields, so _request below reads them without an instance dict lookup each."""

    cdef public list servers            # the _Server of each HOST, in order
    cdef public long _pid               # the process the handles were made in
    cdef public bint aborted            # C_Finalize: no transfer starts any more
    cdef public bint _closed
    cdef public long long _timeout_ms   # TIMEOUT in ms
    cdef public long long _step_ms      # how far below the time left a handle's timeout may be


cdef class SocketFields:
    """The fields of client/transport.py's _Sockets (its base class): `count` is read twice per
    request (a C field: no slot descriptor lookup on a cold object)."""

    cdef public Py_ssize_t count        # sockets opened (none in a request: it reused a connection)
    cdef public set fds
    cdef public object lock


cdef class ServerFields:
    """The fields of client/transport.py's _Server (its base class) that every request reads."""

    cdef public list idle               # its idle handles (list.append/pop: atomic, no lock)
    cdef public str url


# The transport's pieces (client/transport.py), read on first use like the client's.
cdef object g_transport = None          # the module
# This process's id: client/transport.py's _PID, which it gives here too (set_process) at
# import and in a forked child's at-fork hook, so a request compares two C longs.
cdef long g_pid = 0


def set_process(long pid) -> None:
    """client/transport.py: the process's id, at import and in a forked child."""
    global g_pid
    g_pid = pid


def process() -> int:
    """The process id the core's request path compares with (set_process's)."""
    return g_pid


cdef set g_in_curl = None               # _IN_CURL (cleared, never replaced, in a child)
cdef object g_postfields = None
cdef object g_response_code = None
cdef object g_num_connects = None
cdef object g_curl_error = None
cdef object g_timeout_opt = None         # pycurl.TIMEOUT_MS, CONNECTTIMEOUT_MS, URL
cdef object g_connect_opt = None
cdef object g_url_opt = None
cdef object g_finalizing = None
cdef Py_ssize_t g_max_idle = 0


cdef void _transport_parts():
    global g_transport, g_in_curl, g_postfields, g_response_code
    global g_num_connects, g_curl_error, g_finalizing, g_max_idle
    global g_timeout_opt, g_connect_opt, g_url_opt
    from pkcs11ws.client import transport  # loaded with the provider already

    g_in_curl = transport._IN_CURL
    g_postfields = transport._POSTFIELDS
    g_response_code = transport._RESPONSE_CODE
    g_num_connects = transport._NUM_CONNECTS
    g_curl_error = transport.pycurl.error
    g_timeout_opt = transport.pycurl.TIMEOUT_MS
    g_connect_opt = transport.pycurl.CONNECTTIMEOUT_MS
    g_url_opt = transport.pycurl.URL
    g_finalizing = transport.Finalizing
    g_max_idle = transport.MAX_IDLE
    g_transport = transport


cdef object _request(object t, str path, bytes data, tuple headers, double deadline):
    """t.request("POST", path, data, headers, deadline) (client/transport.py
    Transport.request), its usual case written here (keep the two alike): one server, an idle
    pooled handle whose method (POST) and header list are already this request's (its URL
    path and timeouts are set here as request() sets them), this thread in no transfer, the
    transport open and not forked since. Anything else is t.request() itself. (After each
    wait for an answer the interpreter runs cold: request()'s frame and bytecode were the
    largest piece of the module's own path left at one thread,
    bench/results/profile-issue15-client-cpu.md.)
    """
    cdef list servers, idle, chunks
    cdef long long ms, full, step
    cdef double left
    cdef Handle conn
    cdef SocketFields socks
    cdef Py_ssize_t opened
    cdef TransportFields tf = <TransportFields?>t
    cdef ServerFields server
    if g_transport is None:
        _transport_parts()
    servers = tf.servers
    if len(servers) != 1 or tf._pid != g_pid or tf.aborted or tf._closed:
        return t.request("POST", path, data, headers, deadline)
    server = <ServerFields?>servers[0]
    idle = server.idle
    if not idle:
        return t.request("POST", path, data, headers, deadline)
    me = PyLong_FromUnsignedLong(PyThread_get_thread_ident())  # _thread.get_ident()'s value
    if me in g_in_curl:
        return t.request("POST", path, data, headers, deadline)  # it raises (a nested call)
    if deadline:  # (a batch's: its oldest call's start + TIMEOUT)
        left = deadline - _now()
        if left <= 0.001:
            return t.request("POST", path, data, headers, deadline)  # it raises
        full = <long long>(left * 1000)
    else:
        full = tf._timeout_ms
    conn = <Handle?>idle.pop()  # no Python code runs below before the handle is looked at
    c = conn.curl
    if c is None or conn.method != "POST" or conn.headers is not headers:
        idle.append(conn)
        return t.request("POST", path, data, headers, deadline)
    g_in_curl.add(me)
    try:
        conn.busy = True
        try:
            if tf.aborted:
                raise g_finalizing()
            # The handle's timeouts and URL as request() sets them (lone requests and batches
            # share the pool: a handle goes from one endpoint to the other).
            ms = conn.timeout_ms
            step = tf._step_ms
            if ms > full or ms < full - step:
                ms = max(1, full - full % step) if deadline else full
                c.setopt(g_timeout_opt, ms)
                c.setopt(g_connect_opt, min(ms, <long long>t._cfg.connecttimeout * 1000))
                conn.timeout_ms = ms
            if conn.path != path:
                c.setopt(g_url_opt, server.url + path)
                conn.path = path
            conn.setopt(g_postfields, data)
            chunks = conn.chunks
            socks = <SocketFields?>conn.socks
            opened = socks.count
            try:
                conn.perform()
            except BaseException as e:
                if not isinstance(e, g_curl_error):
                    raise
                raise t._perform_failed(conn, c, e) from None
            status = conn.getinfo(g_response_code)
            if socks.count != opened:  # a new connection (only then worth asking libcurl)
                conn.connects += conn.getinfo(g_num_connects)
            out = chunks[0] if PyList_GET_SIZE(chunks) == 1 else b"".join(chunks)
            _list_cut(chunks, 0, PyList_GET_SIZE(chunks), NULL)
            conn.used = True
            conn.requests += 1
            return status, out
        finally:
            # Back to the pool, unless the transport was closed (C_Finalize) or forked since.
            if tf._closed or conn.pid != tf._pid or len(idle) >= g_max_idle:
                t._retire(conn)
            else:
                idle.append(conn)
            conn.busy = False
    finally:
        g_in_curl.discard(me)


cdef class RequestIdFields:
    """The fields of client/request_ids.py's RequestIds (its base class) every lone request
    reads: the body's id field up to the number, and the numbers' iterator."""

    cdef public bytes field
    cdef public object count


cdef class ClientFields:
    """The fields of client/api.py's KeyServiceClient (its base class) that every lone request
    reads: C fields, so _send_one does not touch the client's instance dict (cold after each
    wait for an answer)."""

    cdef public object transport        # client/transport.py Transport
    cdef public object log              # pkcs11ws.log Logger


cdef int _put_decimal(char* w, unsigned long long v) noexcept nogil:
    """v in decimal at w; returns the digits' count (snprintf's ~700 instructions, ~50 here)."""
    cdef char tmp[24]
    cdef int n = 0
    cdef int i
    while True:
        tmp[n] = <char>(48 + v % 10)  # "0" + digit
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        w[i] = tmp[n - 1 - i]
    return n


cdef object _send_one(object client, int which, bytes body):
    """client._single(name, None, body) (client/api.py) written here, so a lone request runs
    no Python frame between the core and the transport's request() (keep the two alike): the
    request id as the body's first field, one attempt, and its outcome handed to the client's
    _send() (the retry policy, the deadline counted from this attempt's start) when it is not
    a 2xx answer; with debug tracing on, _single() itself (every attempt logged)."""
    cdef bytes field
    cdef char num[24]
    cdef int num_len
    cdef Py_ssize_t fn, bn
    cdef char* w
    cdef ClientFields cf = <ClientFields?>client
    cdef RequestIdFields ids
    if g_specs is None:
        _client_parts()
    if cf.log.level >= g_debug3:
        return client._single(_OP_NAME[which], None, body)
    spec = g_specs[which]
    ids = <RequestIdFields?>g_ids  # read per request: a forked child renews it in place
    field = ids.field
    num_len = _put_decimal(num, <unsigned long long>next(ids.count))
    num[num_len] = b'"'
    num[num_len + 1] = b","
    num_len += 2
    fn = PyBytes_GET_SIZE(field)
    bn = PyBytes_GET_SIZE(body)
    data = PyBytes_FromStringAndSize(NULL, fn + num_len + bn - 1)  # body's own "{" dropped
    w = PyBytes_AS_STRING(data)
    memcpy(w, PyBytes_AS_STRING(field), fn)
    memcpy(w + fn, num, num_len)
    memcpy(w + fn + num_len, PyBytes_AS_STRING(body) + 1, bn - 1)
    started = _now()
    try:
        path = g_post_paths[which]
        if path is None:
            status, raw = cf.transport.request(spec.method, spec.path, data, g_base_headers)
        else:
            status, raw = _request(cf.transport, <str>path, data, g_base_headers, 0.0)
    except BaseException as failure:
        if not isinstance(failure, g_curl_failure):
            raise
        return client._send(spec, spec.path, data, g_base_headers, failure, started)
    if status >= 300:
        return client._send(spec, spec.path, data, g_base_headers, (status, raw), started)
    return status, raw


cdef object _hand_off(object client, object group, int which, bytes body):
    """group.run(name, None, body, client) (group.pxi), its lone requests sent by _send_one,
    or _send_one itself without group commit."""
    if group is None:
        return _send_one(client, which, body)
    return (<Group?>group)._run(which, <str>_OP_NAME[which], None, body, client)


cdef class ProviderFields:
    """The fields of pkcs11ws/provider.py's Provider (its base class) that _fast reads on every
    call: C fields, so the call does not touch the provider's instance dict (cold after each
    wait for an answer). What they hold is said in Provider.__init__."""

    cdef public dict fast
    cdef public object dir
    cdef public dict tokens
    cdef public dict renew_at


cdef object _fast(Call* c, int which, CK_BYTE* sig, CK_ULONG sig_len):
    """The output of c's request (None: verified) made here, or _SLOW (see above)."""
    cdef OpState* op = c.op
    cdef int kind = g_mechs[op.row].param
    cdef tuple e
    cdef bytes head
    cdef char tail[48]
    cdef int tail_len
    cdef Py_ssize_t size
    cdef char* w
    cdef ProviderFields p
    if op.prmlen or (kind != PARAM_NONE and kind != PARAM_MAC_LEN):
        return _SLOW
    p = <ProviderFields?>_prov_s(c.h)
    found = p.fast.get(op.key)
    if found is None:
        return _SLOW
    e = <tuple?>found
    if <CK_MECHANISM_TYPE>e[0] != op.mech or <CK_SLOT_ID>e[1] != c.slot:
        return _SLOW
    if (<dict?>p.dir.objects).get(op.key) is not e[2]:
        return _SLOW
    if p.tokens.get(c.slot) is not e[3]:
        return _SLOW
    renew_at = p.renew_at.get(c.slot)
    if renew_at is not None and _now() >= <double>renew_at:
        return _SLOW
    if e[7]:  # a _GENERAL mechanism: the MAC length the request asks for
        tail_len = snprintf(tail, sizeof(tail), b'","mac_length":%lu}', <unsigned long>op.mac_len)
    else:
        tail[0] = b'"'
        tail[1] = b"}"
        tail_len = 2
    head = <bytes?>e[4]
    size = PyBytes_GET_SIZE(head) + (c.data_len + 2) // 3 * 4 + tail_len
    if which == OP_VERIFY:
        size += 15 + (sig_len + 2) // 3 * 4  # ","signature":"
    body = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(body)
    memcpy(w, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
    w = _b64_put(c.data, c.data_len, w + PyBytes_GET_SIZE(head))
    if which == OP_VERIFY:
        memcpy(w, b'","signature":"', 15)
        w = _b64_put(sig, sig_len, w + 15)
    memcpy(w, tail, tail_len)
    name = _OP_NAME[which]
    client = e[5]
    try:
        status, r = _hand_off(client, e[6], which, body)
        out = _read_answer(which, r)
        if out is _SLOW:
            out = client.answer(name, status, r)
        return out
    except _ServiceError as err:
        p.failed(c.slot, op.key, err)
        raise
