# cython: language_level=3
"""The key service's compiled hot-path helpers (bench/results/profile-issue15-service.md,
Round 7): an HMAC key's prepared state and the canonical base64 of the request decoders.

- HmacState: HMAC-SHA-2 (RFC 2104) from a key's inner and outer pad states, absorbed once with
  OpenSSL's own SHA-2 block functions; a MAC is then two plain struct copies, two updates and
  two finals (no EVP context allocated, copied, fetched and freed per hash as hashlib's
  copy()/digest() do: ~14k instructions per 64-byte MAC there, a few thousand here). The state
  holds key-derived secrets: it lives inside the loaded key the service already caches by
  handle, sealed blob and card key (handlers_crypto.py), so it follows that cache's rules.
- b64_canonical: what protocol.canonical_b64 accepts, decoded (strict alphabet, padding only
  at the end, unused low bits zero), else None: one pass, no Python frame.
- scan_run: fastjson.batch's loop over the items of a run (items whose bytes repeat the run's
  first item up to its trailing values, strings): each value found and converted, in C.
- mac_run: a run's HMAC items answered from its verdict (server/batch_items.py), while the
  verdict's time holds: MAC, base64 and the item's answer bytes, in C.
- scan_single: fastjson.RidFirst's check of a single request that repeats the last one up to
  its trailing values: its request id and those values, in C.
- scan_batch: a batch body that is one run of the previous batch's first head, read in C (the
  batch's direct path, server/single.py).
- mac_answer, mac_equals: a single request's HMAC sign answer bytes, its verify's compare.
- verify_run: the same for a run's HMAC verify items: MAC and a constant-time compare; a
  mismatch is left to the full path (its refusal and audit line).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memchr, memcmp, memcpy, memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec


cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA_CTX:
        pass
    ctypedef struct SHA256_CTX:
        pass
    ctypedef struct SHA512_CTX:
        pass
    int SHA1_Init(SHA_CTX* c)
    int SHA1_Update(SHA_CTX* c, const void* data, size_t n)
    int SHA1_Final(unsigned char* md, SHA_CTX* c)
    int SHA224_Init(SHA256_CTX* c)
    int SHA224_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA224_Final(unsigned char* md, SHA256_CTX* c)
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)
    int SHA384_Init(SHA512_CTX* c)
    int SHA384_Update(SHA512_CTX* c, const void* data, size_t n)
    int SHA384_Final(unsigned char* md, SHA512_CTX* c)
    int SHA512_Init(SHA512_CTX* c)
    int SHA512_Update(SHA512_CTX* c, const void* data, size_t n)
    int SHA512_Final(unsigned char* md, SHA512_CTX* c)


cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void* ptr, size_t n)


# The hashes by hashlib's names: (kind, block size, output size).
cdef dict _HASHES = {
    "sha1": (1, 64, 20),
    "sha224": (224, 64, 28),
    "sha256": (256, 64, 32),
    "sha384": (384, 128, 48),
    "sha512": (512, 128, 64),
}
DIGESTS = frozenset(_HASHES)


ctypedef union _Ctx:
    SHA_CTX s1
    SHA256_CTX s256
    SHA512_CTX s512


cdef inline void _init(int kind, _Ctx* c) noexcept nogil:
    if kind == 1:
        SHA1_Init(&c.s1)
    elif kind == 224:
        SHA224_Init(&c.s256)
    elif kind == 256:
        SHA256_Init(&c.s256)
    elif kind == 384:
        SHA384_Init(&c.s512)
    else:
        SHA512_Init(&c.s512)


cdef inline void _update(int kind, _Ctx* c, const void* p, size_t n) noexcept nogil:
    if kind == 1:
        SHA1_Update(&c.s1, p, n)
    elif kind == 224:
        SHA224_Update(&c.s256, p, n)
    elif kind == 256:
        SHA256_Update(&c.s256, p, n)
    elif kind == 384:
        SHA384_Update(&c.s512, p, n)
    else:
        SHA512_Update(&c.s512, p, n)


cdef inline void _final(int kind, _Ctx* c, unsigned char* md) noexcept nogil:
    if kind == 1:
        SHA1_Final(md, &c.s1)
    elif kind == 224:
        SHA224_Final(md, &c.s256)
    elif kind == 256:
        SHA256_Final(md, &c.s256)
    elif kind == 384:
        SHA384_Final(md, &c.s512)
    else:
        SHA512_Final(md, &c.s512)


cdef class HmacState:
    """A key's HMAC state for one hash (sha1, sha224, sha256, sha384, sha512)."""

    cdef _Ctx inner
    cdef _Ctx outer
    cdef int kind
    cdef readonly int size  # the full MAC length

    def __init__(self, str name, object key):
        cdef unsigned char pad[128]
        cdef unsigned char k[128]
        cdef _Ctx c
        cdef int i, block
        cdef Py_ssize_t n
        if not isinstance(key, bytes):  # (bytes or a subclass: ops.hmac.HmacKey)
            raise TypeError("the key must be bytes")
        n = PyBytes_GET_SIZE(key)
        found = _HASHES.get(name)
        if found is None:
            raise ValueError(f"no HMAC hash {name!r}")
        self.kind, block, self.size = found
        memset(k, 0, sizeof(k))
        if n > block:  # a key longer than the block is hashed first (RFC 2104)
            _init(self.kind, &c)
            _update(self.kind, &c, PyBytes_AS_STRING(key), n)
            _final(self.kind, &c, k)
            OPENSSL_cleanse(&c, sizeof(c))
        else:
            memcpy(k, PyBytes_AS_STRING(key), n)
        for i in range(block):
            pad[i] = k[i] ^ 0x36
        _init(self.kind, &self.inner)
        _update(self.kind, &self.inner, pad, block)
        for i in range(block):
            pad[i] = k[i] ^ 0x5C
        _init(self.kind, &self.outer)
        _update(self.kind, &self.outer, pad, block)
        OPENSSL_cleanse(k, sizeof(k))
        OPENSSL_cleanse(pad, sizeof(pad))

    def __dealloc__(self):
        OPENSSL_cleanse(&self.inner, sizeof(_Ctx))
        OPENSSL_cleanse(&self.outer, sizeof(_Ctx))

    cdef void _mac(self, const char* data, Py_ssize_t n, unsigned char* md) noexcept:
        cdef _Ctx c
        cdef int kind = self.kind
        memcpy(&c, &self.inner, sizeof(_Ctx))
        _update(kind, &c, data, n)
        _final(kind, &c, md)
        memcpy(&c, &self.outer, sizeof(_Ctx))
        _update(kind, &c, md, self.size)
        _final(kind, &c, md)
        OPENSSL_cleanse(&c, sizeof(_Ctx))

    def mac(self, bytes data not None):
        """The full HMAC of data."""
        cdef unsigned char md[64]
        self._mac(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), md)
        return PyBytes_FromStringAndSize(<char*>md, self.size)

    def __call__(self, bytes data not None):
        """mac(data): the state as ops.hmac.direct's function of the data."""
        cdef unsigned char md[64]
        self._mac(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), md)
        return PyBytes_FromStringAndSize(<char*>md, self.size)


cdef signed char _B64VAL[256]


cdef void _b64_init() noexcept:
    cdef const char* alphabet = (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    )
    cdef int i
    for i in range(256):
        _B64VAL[i] = -1
    for i in range(64):
        _B64VAL[<unsigned char>alphabet[i]] = i


_b64_init()


def b64_canonical(bytes raw not None):
    """raw (ASCII) decoded when it is canonical strict base64 (protocol.canonical_b64), else
    None."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t pad = 0
    cdef Py_ssize_t i = 0
    cdef int a, b, c, d
    cdef unsigned char* w
    if n % 4:
        return None
    if n and s[n - 1] == 61:  # "="
        pad = 2 if s[n - 2] == 61 else 1
    out = PyBytes_FromStringAndSize(NULL, n // 4 * 3 - pad)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    while i < n:
        a = _B64VAL[s[i]]
        b = _B64VAL[s[i + 1]]
        if i + 4 == n and pad:
            c = 0 if pad == 2 else _B64VAL[s[i + 2]]
            # One spelling per value: the unused low bits of the last character are zero.
            if a < 0 or b < 0 or c < 0 or (pad == 2 and b & 15) or (pad == 1 and c & 3):
                return None
            w[0] = <unsigned char>((a << 2) | (b >> 4))
            if pad == 1:
                w[1] = <unsigned char>(((b & 15) << 4) | (c >> 2))
            break
        c = _B64VAL[s[i + 2]]
        d = _B64VAL[s[i + 3]]
        if a < 0 or b < 0 or c < 0 or d < 0:
            return None
        w[0] = <unsigned char>((a << 2) | (b >> 4))
        w[1] = <unsigned char>(((b & 15) << 4) | (c >> 2))
        w[2] = <unsigned char>(((c & 3) << 6) | d)
        w += 3
        i += 4
    return out


cdef const char* _B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


cdef char* _b64_put(const unsigned char* src, Py_ssize_t n, char* w) noexcept:
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


def mac_run(
    HmacState state not None,
    list values not None,
    Py_ssize_t i,
    double until,
    bytes prefix not None,
    bytes suffix not None,
    list parts not None,
):
    """For values[i:] in order, while time.time() (the same clock) is before until: prefix,
    the base64 of the value's MAC and suffix appended to parts. Returns the index of the first
    value not answered (len(values): all were)."""
    cdef timespec ts
    cdef unsigned char md[64]
    cdef Py_ssize_t n = len(values)
    cdef Py_ssize_t pn = PyBytes_GET_SIZE(prefix)
    cdef Py_ssize_t sn = PyBytes_GET_SIZE(suffix)
    cdef Py_ssize_t bn = (state.size + 2) // 3 * 4
    cdef char* w
    while i < n:
        clock_gettime(CLOCK_REALTIME, &ts)
        if ts.tv_sec + ts.tv_nsec * 1e-9 >= until:
            return i
        value = values[i]
        if type(value) is not bytes:
            return i
        state._mac(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), md)
        out = PyBytes_FromStringAndSize(NULL, pn + bn + sn)
        w = PyBytes_AS_STRING(out)
        memcpy(w, PyBytes_AS_STRING(prefix), pn)
        w = _b64_put(md, state.size, w + pn)
        memcpy(w, PyBytes_AS_STRING(suffix), sn)
        parts.append(out)
        i += 1
    return n


def scan_run(
    bytes raw not None,
    Py_ssize_t pos,
    bytes head not None,
    Py_ssize_t end,
    tuple last not None,
    tuple mids not None,
    list values not None,
):
    """fastjson.batch's loop over a run's next items, for trailing values that are strings
    matched up to their closing quotes (fastjson._TEXT: kinds bytes and text). last: per
    trailing value (name, convert, max_len); mids: the bytes between two of them, from one's
    closing quote to the next one's opening quote. An item at pos joins the run when its
    bytes start with head and then hold those values (each up to its closing quote, then the
    next mid), the request's closing brace and the item's: its values, each through convert
    (None: refused), are appended to values (one value alone, several as a tuple). Returns -2
    when an item ended at end (the last one); the position of the first item that does not
    repeat head (fastjson.batch decodes it in full); -1 when the batch is off the fast path
    (a value convert refuses or over max_len, no comma after an item)."""
    cdef const char* s = PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef const char* h = PyBytes_AS_STRING(head)
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t stop
    while True:
        if pos + hn > n or memcmp(s + pos, h, hn) != 0:
            return pos
        value = _trailing(s, n, pos + hn, last, mids, &stop)
        if value is None:
            return pos if stop == -1 else -1
        values.append(value)
        pos = stop + 1
        if pos >= n or s[pos] != 125:  # the item's "}"
            return -1
        pos += 1
        if pos == end:
            return -2
        if s[pos] != 44:  # ","
            return -1
        pos += 1


cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void* a, const void* b, size_t n)


def verify_run(
    HmacState state not None,
    list values not None,
    Py_ssize_t i,
    double until,
    bytes part not None,
    list parts not None,
):
    """For values[i:] in order, each a (data, mac) tuple, while time.time() (the same clock)
    is before until: part appended to parts when mac is data's full MAC (compared in
    constant time). Returns the index of the first value not answered (len(values): all
    were): one whose MAC is not the full length or does not match (the full path refuses it,
    with its audit line), or not two bytes."""
    cdef timespec ts
    cdef unsigned char md[64]
    cdef Py_ssize_t n = len(values)
    cdef tuple pair
    while i < n:
        clock_gettime(CLOCK_REALTIME, &ts)
        if ts.tv_sec + ts.tv_nsec * 1e-9 >= until:
            return i
        item = values[i]
        if type(item) is not tuple or len(<tuple>item) != 2:
            return i
        pair = <tuple>item
        data = pair[0]
        mac = pair[1]
        if type(data) is not bytes or type(mac) is not bytes:
            return i
        if PyBytes_GET_SIZE(mac) != state.size:
            return i
        state._mac(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), md)
        if CRYPTO_memcmp(md, PyBytes_AS_STRING(mac), state.size) != 0:
            OPENSSL_cleanse(md, sizeof(md))
            return i
        parts.append(part)
        i += 1
    OPENSSL_cleanse(md, sizeof(md))
    return n


cdef object _trailing(
    const char* s, Py_ssize_t n, Py_ssize_t v, tuple last, tuple mids, Py_ssize_t* end
):
    """The trailing values from s + v (each up to its closing quote, then the next mid; the
    last one's quote followed by a closing brace, whose offset goes to end), converted: one
    value, or a tuple of several; None when not this spelling (end -1) or a value is refused
    (a convert's None, over its max_len: end -2)."""
    cdef Py_ssize_t k = len(last)
    cdef Py_ssize_t at[8]
    cdef Py_ssize_t to[8]
    cdef const char* q
    cdef Py_ssize_t j, mn
    cdef bytes mid
    end[0] = -1
    if k < 1 or k > 8 or len(mids) != k - 1:
        raise ValueError("1 to 8 trailing values, and a mid between each two")
    for j in range(k):
        q = <const char*>memchr(s + v, 34, n - v)  # the closing quote
        if q == NULL:
            return None
        at[j] = v
        to[j] = q - s
        if j + 1 < k:
            mid = <bytes>mids[j]
            mn = PyBytes_GET_SIZE(mid)
            if to[j] + mn > n or memcmp(q, PyBytes_AS_STRING(mid), mn) != 0:
                return None
            v = to[j] + mn
        elif to[j] + 1 >= n or q[1] != 125:  # then "}"
            return None
    end[0] = -2
    if k == 1:
        return _converted(<tuple>last[0], s + at[0], to[0] - at[0], end, to[0] + 1)
    got = []
    for j in range(k):
        one = _converted(<tuple>last[j], s + at[j], to[j] - at[j], end, -2)
        if one is None:
            return None
        got.append(one)
    end[0] = to[k - 1] + 1
    return tuple(got)


cdef inline object _converted(
    tuple field, const char* p, Py_ssize_t n, Py_ssize_t* end, Py_ssize_t ok
):
    """A trailing value's bytes through its field's (name, convert, max_len); None when
    refused (end keeps -2), else end set to ok."""
    cdef Py_ssize_t max_len = field[2]
    value = field[1](PyBytes_FromStringAndSize(p, n))
    if value is None or (max_len and len(value) > max_len):
        return None
    end[0] = ok
    return value


cdef inline Py_ssize_t _rid_end(
    const char* s, Py_ssize_t start, Py_ssize_t n, const unsigned char* ok, Py_ssize_t rid_max
) noexcept:
    """Where the closing quote of a request id that starts at s[start] is: the id is 1 to
    rid_max bytes, each one ok[byte] is non-zero for (protocol.REQUEST_ID_RE's table); -1 for
    anything else. The one place the C scanners check a request id."""
    cdef const char* q = <const char*>memchr(s + start, 34, n - start)
    cdef Py_ssize_t i
    if q == NULL or q - s - start < 1 or q - s - start > rid_max:
        return -1
    for i in range(start, q - s):
        if not ok[<unsigned char>s[i]]:
            return -1
    return q - s


def scan_single(
    bytes raw not None,
    bytes head not None,
    bytes rest not None,
    tuple last not None,
    tuple mids not None,
    bytes allowed not None,
    Py_ssize_t rid_max,
):
    """A body that is head, a request id (1 to rid_max bytes, each one allowed[byte] is
    non-zero for), then rest (from the id's closing quote), then its trailing values (last,
    mids: as scan_run) and the closing brace, at its very end: (request id as a str, the
    values: one, or a tuple of several); else None."""
    cdef const char* s = PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t rn = PyBytes_GET_SIZE(rest)
    cdef const unsigned char* ok = <const unsigned char*>PyBytes_AS_STRING(allowed)
    cdef Py_ssize_t e, end
    if PyBytes_GET_SIZE(allowed) != 256:
        raise ValueError("allowed: one byte per byte value")
    if n < hn or memcmp(s, PyBytes_AS_STRING(head), hn) != 0:
        return None
    e = _rid_end(s, hn, n, ok, rid_max)
    if e < 0 or e + rn > n or memcmp(s + e, PyBytes_AS_STRING(rest), rn) != 0:
        return None
    value = _trailing(s, n, e + rn, last, mids, &end)
    if value is None or end != n - 1:
        return None
    return PyUnicode_DecodeASCII(s + hn, e - hn, NULL), value


def mac_answer(HmacState state not None, bytes data not None, bytes prefix not None,
               bytes suffix not None):
    """prefix, the base64 of data's full MAC, suffix: a sign's answer bytes."""
    cdef unsigned char md[64]
    cdef Py_ssize_t pn = PyBytes_GET_SIZE(prefix)
    cdef Py_ssize_t sn = PyBytes_GET_SIZE(suffix)
    cdef char* w
    state._mac(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), md)
    out = PyBytes_FromStringAndSize(NULL, pn + (state.size + 2) // 3 * 4 + sn)
    w = PyBytes_AS_STRING(out)
    memcpy(w, PyBytes_AS_STRING(prefix), pn)
    w = _b64_put(md, state.size, w + pn)
    memcpy(w, PyBytes_AS_STRING(suffix), sn)
    OPENSSL_cleanse(md, sizeof(md))
    return out


def mac_equals(HmacState state not None, bytes data not None, bytes mac not None):
    """mac is data's full MAC (its length, then a constant-time compare)."""
    cdef unsigned char md[64]
    cdef bint same
    if PyBytes_GET_SIZE(mac) != state.size:
        return False
    state._mac(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), md)
    same = CRYPTO_memcmp(md, PyBytes_AS_STRING(mac), state.size) == 0
    OPENSSL_cleanse(md, sizeof(md))
    return same


def scan_batch(
    bytes raw not None,
    bytes bare not None,
    bytes rid_head not None,
    bytes rid_tail not None,
    bytes allowed not None,
    Py_ssize_t rid_max,
    bytes head not None,
    tuple last not None,
    tuple mids not None,
    list values not None,
):
    """A batch body that is bare, or rid_head, a request id (as scan_single) and rid_tail
    (from the id's closing quote to the items' opening bracket); then one or more items that
    each start with head and end with their trailing values (as scan_run), the request's and
    the item's closing braces, separated by commas; then "]}" at its very end. Their values go
    to values; returns (the request id or None,); None for any other body (values may then
    hold some: the caller drops them)."""
    cdef const char* s = PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef const char* h = PyBytes_AS_STRING(head)
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t bn = PyBytes_GET_SIZE(bare)
    cdef Py_ssize_t rn = PyBytes_GET_SIZE(rid_head)
    cdef Py_ssize_t tn = PyBytes_GET_SIZE(rid_tail)
    cdef const unsigned char* ok = <const unsigned char*>PyBytes_AS_STRING(allowed)
    cdef Py_ssize_t pos, end, stop, e
    if PyBytes_GET_SIZE(allowed) != 256:
        raise ValueError("allowed: one byte per byte value")
    if n < 2 or s[n - 2] != 93 or s[n - 1] != 125:  # "]}"
        return None
    end = n - 2
    rid = None
    if n >= bn and memcmp(s, PyBytes_AS_STRING(bare), bn) == 0:
        pos = bn
    elif n >= rn and memcmp(s, PyBytes_AS_STRING(rid_head), rn) == 0:
        e = _rid_end(s, rn, n, ok, rid_max)
        if e < 0 or e + tn > n or memcmp(s + e, PyBytes_AS_STRING(rid_tail), tn) != 0:
            return None
        rid = PyUnicode_DecodeASCII(s + rn, e - rn, NULL)
        pos = e + tn
    else:
        return None
    while True:
        if pos + hn > end or memcmp(s + pos, h, hn) != 0:
            return None
        value = _trailing(s, n, pos + hn, last, mids, &stop)
        if value is None:
            return None
        values.append(value)
        pos = stop + 1
        if pos >= end or s[pos] != 125:  # the item's "}"
            return None
        pos += 1
        if pos == end:
            return (rid,)
        if s[pos] != 44:  # ","
            return None
        pos += 1
