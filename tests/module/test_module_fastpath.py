"""The core's fast path of C_Sign/C_Verify (pkcs11ws/_native/fastpath.pxi) against the real
key service over mutual TLS: once the provider's path has made a key's entry, the core builds
the request and reads the answer itself. It must answer exactly as the provider's path does:
for good answers, for error answers, and for odd or malformed ones (which it hands to the
client's strict decoding), and it must step aside whenever the login or the object changed.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import sys
import threading
from collections.abc import Callable, Iterator
from ctypes import byref
from typing import Any

import pycurl
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pkcs11ws import constants as C
from pkcs11ws.errors import PKCS11Error
from pkcs11ws.protocol import BATCH_PATH
from tests.support.p11ctypes import CK_ULONG, CKError, Module, Template, mechanism
from tests.support.queued import hmac_key, queued_hmac_signs

HMAC_KEY = b"f" * 32


def _provider() -> Any:
    return sys.modules["pkcs11ws._native.core"].current_provider()


class Counted:
    """Counts the calls that take the provider's path (Provider.crypto)."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.inner = provider.crypto
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.inner(*args)


@pytest.fixture
def counted(mod: Module) -> Iterator[Counted]:
    p = _provider()
    c = Counted(p)
    p.crypto = c  # the core looks the method up on the instance per call
    try:
        yield c
    finally:
        del p.crypto


def _sign(mod: Module, h: int, key: int, data: bytes, mech: int = C.CKM_SHA256_HMAC,
          param: int | None = None) -> bytes:  # fmt: skip
    m, keep = mechanism(mech, param)
    mod.ok("C_SignInit", h, byref(m), key)
    out = mod.single("C_Sign", h, data)
    del keep
    return out


def _verify(mod: Module, h: int, key: int, data: bytes, sig: bytes,
            mech: int = C.CKM_SHA256_HMAC, param: int | None = None) -> int:  # fmt: skip
    m, keep = mechanism(mech, param)
    mod.ok("C_VerifyInit", h, byref(m), key)
    rv = mod.call("C_Verify", h, data or None, len(data), sig, len(sig))
    del keep
    return rv


def test_steady_state_sign_and_verify_skip_the_provider_and_match_hmac(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    datas = [b"", b"a", b"ab", b"abc", b"x" * 64, bytes(range(256)) * 3]
    for d in datas:
        assert _sign(mod, h, key, d) == hmac.digest(HMAC_KEY, d, hashlib.sha256)
    assert counted.calls == 1  # the first call made the entry, the rest went fast
    for d in datas:  # the same key and mechanism: the same entry serves C_Verify
        good = hmac.digest(HMAC_KEY, d, hashlib.sha256)
        assert _verify(mod, h, key, d, good) == C.CKR_OK
        bad = bytes([good[0] ^ 1]) + good[1:]
        assert _verify(mod, h, key, d, bad) == C.CKR_SIGNATURE_INVALID
    assert counted.calls == 1
    # A _GENERAL mechanism: the MAC length travels in the request.
    for n in (16, 24, 32):
        full = hmac.digest(HMAC_KEY, b"general", hashlib.sha256)
        out = _sign(mod, h, key, b"general", C.CKM_SHA256_HMAC_GENERAL, n)
        assert out == full[:n]
        assert _verify(mod, h, key, b"general", out, C.CKM_SHA256_HMAC_GENERAL, n) == C.CKR_OK
    assert counted.calls == 2  # another mechanism: its first call remade the entry


def test_login_and_object_changes_take_the_providers_path(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    _, h, pin = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    want = hmac.digest(HMAC_KEY, b"d", hashlib.sha256)
    assert _sign(mod, h, key, b"d") == want
    assert _sign(mod, h, key, b"d") == want
    assert counted.calls == 1
    p = _provider()
    slot = p.fast[key][1]
    # A renewal due: the provider's path renews the token, the next call is fast again.
    old = p.tokens[slot]
    p.renew_at[slot] = 0.0
    assert _sign(mod, h, key, b"d") == want
    assert counted.calls == 2 and p.tokens[slot] != old
    assert _sign(mod, h, key, b"d") == want
    assert counted.calls == 2
    # A new login: a new token, so the entry's is not it.
    mod.ok("C_Logout", h)
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    assert mod.call("C_SignInit", h, byref(m), key) == C.CKR_USER_NOT_LOGGED_IN
    assert mod.login(h, pin) == C.CKR_OK
    assert _sign(mod, h, key, b"d") == want
    assert counted.calls == 3
    # The service ends the login under the module: the fast path's error goes through the
    # provider's bookkeeping (the slot is logged out), as the provider's path's would.
    token = p.tokens[slot]
    p.client.deactivate(p.dir.slots[slot].card, token)
    mod.ok("C_SignInit", h, byref(m), key)
    n = ctypes.c_ulong(32)
    buf = ctypes.create_string_buffer(32)
    assert mod.call("C_Sign", h, b"d", 1, buf, byref(n)) == C.CKR_USER_NOT_LOGGED_IN
    assert counted.calls == 3  # it went fast, and failed as the provider's path would
    assert slot not in p.tokens


Odd = Callable[[bytes], bytes]


Perform = Callable[[Any, Callable[[], None], bytes], None]


def _on_perform(p: Any, perform: Perform) -> Callable[[], None]:
    """Run perform(conn, the handle's real perform, the body it was given) instead of every
    pycurl perform() of the provider's transport (its pooled handles and any it makes), the
    level both the transport's request() and the core's copy of it (fastpath.pxi _request)
    go through; returns the undo."""
    transport = p.client.transport
    new_conn = transport._new_conn

    def hook(conn: Any) -> Any:
        curl = conn.curl
        body = [b""]

        def setopt(option: int, value: Any) -> None:
            if option == pycurl.POSTFIELDS:
                body[0] = value
            curl.setopt(option, value)

        conn.setopt = setopt
        conn.perform = lambda: perform(conn, curl.perform, body[0])
        return conn

    for conn in list(transport._conns):
        hook(conn)
    transport._new_conn = lambda server: hook(new_conn(server))

    def undo() -> None:
        del transport._new_conn
        for conn in list(transport._conns):
            if conn.curl is not None:
                conn.setopt, conn.perform = conn.curl.setopt, conn.curl.perform

    return undo


def _answering(p: Any, change: Odd) -> Callable[[], None]:
    """Make the transport hand every crypto answer through change(); returns the undo."""

    def perform(conn: Any, real: Callable[[], None], body: bytes) -> None:
        real()
        if conn.path.startswith("/crypto/v1/") and conn.curl.getinfo(pycurl.RESPONSE_CODE) == 200:
            conn.chunks[:] = [change(b"".join(conn.chunks))]

    return _on_perform(p, perform)


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CKError as e:
        return ("CKR", e.rv)
    except PKCS11Error as e:
        return ("CKR", e.ckr)


ODD_SIGN: list[tuple[str, Odd]] = [
    ("spaces", lambda r: r.replace(b":", b": ")),
    ("escaped", lambda r: r.replace(b'"signature"', b'"\\u0073ignature"')),
    ("noncanonical", lambda r: r[:-4] + (b"x" if r[-4:-3] != b"x" else b"y") + r[-3:]),
    ("padding", lambda r: r[:-2] + b'="}'),
    ("extra", lambda r: r[:-1] + b',"x":1}'),
    ("renamed", lambda r: r.replace(b"signature", b"sig")),
    ("number", lambda r: b'{"signature":5}'),
    ("list", lambda r: b"[]"),
    ("text", lambda r: b"not json"),
    ("empty", lambda r: b""),
    ("trailing", lambda r: r + b" "),
]
ODD_VERIFY: list[tuple[str, Odd]] = [
    ("false", lambda r: r.replace(b"true", b"false")),
    ("spaces", lambda r: r.replace(b":", b" : ")),
    ("string", lambda r: r.replace(b"true", b'"true"')),
    ("extra", lambda r: r[:-1] + b',"x":1}'),
    ("empty", lambda r: b""),
]


def _failing_first(p: Any, failure: pycurl.error) -> tuple[list[bytes], Callable[[], None]]:
    """Make libcurl's next crypto transfer fail with failure (no request sent) and record
    every crypto body sent; returns (bodies, undo)."""
    bodies: list[bytes] = []

    def perform(conn: Any, real: Callable[[], None], body: bytes) -> None:
        if conn.path.startswith("/crypto/v1/"):
            bodies.append(body)
            if len(bodies) == 1:
                raise failure
        real()

    return bodies, _on_perform(p, perform)


def test_a_dead_connection_on_the_fast_path_is_retried_with_the_same_request_id(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    want = hmac.digest(HMAC_KEY, b"again", hashlib.sha256)
    assert _sign(mod, h, key, b"again") == want
    # On a kept-alive connection (this handle's last transfer made none): a dead connection.
    dead = pycurl.error(pycurl.E_GOT_NOTHING, "Empty reply from server")
    bodies, undo = _failing_first(p, dead)
    try:
        assert _sign(mod, h, key, b"again") == want
    finally:
        undo()
    assert counted.calls == 1  # the module's call went fast, its retry too
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the retry resends the same body
    assert bodies[0].startswith(b'{"request_id":"') and b'"data":"' in bodies[0]
    # The next call carries a new request id (same process prefix), again on both attempts.
    again, undo = _failing_first(p, dead)
    try:
        assert _sign(mod, h, key, b"again") == want
    finally:
        undo()
    assert len(again) == 2 and again[0] == again[1]
    rid, rid2 = bodies[0].split(b'"')[3], again[0].split(b'"')[3]
    assert rid != rid2 and rid.rsplit(b"-", 1)[0] == rid2.rsplit(b"-", 1)[0]


def test_a_transport_failure_on_the_fast_path_gives_the_providers_ckr(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    assert _sign(mod, h, key, b"x") == hmac.digest(HMAC_KEY, b"x", hashlib.sha256)
    obj, token = p.fast[key][2], p.fast[key][3]
    fatal = pycurl.error(pycurl.E_UNSUPPORTED_PROTOCOL, "no https")
    bodies, undo = _failing_first(p, fatal)
    try:
        fast = _outcome(lambda: _sign(mod, h, key, b"x"))
    finally:
        undo()
    bodies2, undo = _failing_first(p, fatal)
    try:
        generic = _outcome(lambda: p.client.sign(token, obj.uuid, "CKM_SHA256_HMAC", b"x"))
    finally:
        undo()
    assert counted.calls == 1
    assert len(bodies) == len(bodies2) == 1  # not retryable: one attempt each
    assert fast == generic and fast[0] == "CKR" and fast[1] != C.CKR_OK


@pytest.mark.parametrize("name,change", ODD_SIGN, ids=[n for n, _ in ODD_SIGN])
def test_odd_sign_answers_fall_back_to_the_strict_decoder(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted, name: str, change: Odd
) -> None:
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    assert _sign(mod, h, key, b"odd") == hmac.digest(HMAC_KEY, b"odd", hashlib.sha256)
    slot, obj, token = p.fast[key][1], p.fast[key][2], p.fast[key][3]
    undo = _answering(p, change)
    try:
        fast = _outcome(lambda: _sign(mod, h, key, b"odd"))
        generic = _outcome(lambda: p.client.sign(token, obj.uuid, "CKM_SHA256_HMAC", b"odd"))
    finally:
        undo()
    assert counted.calls == 1  # the module's call went fast
    assert p.tokens.get(slot) is token
    if isinstance(generic, bytes):
        assert fast == generic == hmac.digest(HMAC_KEY, b"odd", hashlib.sha256)
    else:
        assert fast == generic == ("CKR", C.CKR_DEVICE_ERROR)


@pytest.mark.parametrize("name,change", ODD_VERIFY, ids=[n for n, _ in ODD_VERIFY])
def test_odd_verify_answers_fall_back_to_the_strict_decoder(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted, name: str, change: Odd
) -> None:
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    sig = hmac.digest(HMAC_KEY, b"odd", hashlib.sha256)
    assert _verify(mod, h, key, b"odd", sig) == C.CKR_OK
    obj, token = p.fast[key][2], p.fast[key][3]
    undo = _answering(p, change)
    try:
        fast = _verify(mod, h, key, b"odd", sig)
        generic = _outcome(lambda: p.client.verify(token, obj.uuid, "CKM_SHA256_HMAC", b"odd", sig))
    finally:
        undo()
    assert counted.calls == 1
    assert ("CKR", fast) == (generic if generic is not None else ("CKR", C.CKR_OK))


_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _noncanonical_first_item(r: bytes) -> bytes:
    """The first item's signature with a non-zero unused bit before its padding."""
    i = r.index(b'="}}') - 1
    return r[:i] + _B64[_B64.index(r[i]) | 1 : (_B64.index(r[i]) | 1) + 1] + r[i + 1 :]


ODD_BATCH: list[tuple[str, Odd | None, bool]] = [
    ("compact", None, False),
    ("spaces", lambda r: r.replace(b'":', b'": '), False),  # still JSON: every item is fine
    ("extra", lambda r: r.replace(b'"}}', b'","x":1}}', 1), True),  # one item: BAD_RESPONSE
    ("noncanonical", _noncanonical_first_item, True),
]


@pytest.mark.parametrize("name,change,one_bad", ODD_BATCH, ids=[n for n, _, _ in ODD_BATCH])
def test_batched_calls_read_their_items_fast(
    mod: Module,
    logged_card: tuple[int, int, bytes],
    counted: Counted,
    name: str,
    change: Odd | None,
    one_bad: bool,
) -> None:
    """Queued calls leave in one batch request; each reads its item's answer in the core, or
    (an odd item) through the client's strict decoding, which fails that item alone."""
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    group = p.client.group
    assert group is not None
    assert _sign(mod, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
    n = 5
    datas = [b"batched %d" % i for i in range(n)]
    before = group.sizes.get(n, 0)
    undo = _answering(p, change) if change is not None else None
    try:
        out = queued_hmac_signs(mod, slot, key, group, datas)
    finally:
        if undo is not None:
            undo()
    want = [hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas]
    bad = [i for i in range(n) if out[i] != want[i]]
    if one_bad:
        assert len(bad) == 1, out
        assert isinstance(out[bad[0]], CKError) and out[bad[0]].rv == C.CKR_DEVICE_ERROR
    else:
        assert bad == []
    assert group.sizes.get(n, 0) == before + 1
    assert counted.calls == 1


def _first_item_fails(r: bytes) -> bytes:
    """The first item answered with an error whose message holds braces and escaped quotes."""
    start = r.index(b'{"status":200,"answer":')
    end = r.index(b"}}", start) + 2
    error = b'{"code":"MECHANISM_INVALID","message":"not \\"this\\" {[}"}'
    return r[:start] + b'{"status":400,"answer":%s}' % error + r[end:]


def _last_item_dropped(r: bytes) -> bytes:
    return r[: r.rindex(b',{"status":')] + b"]}"


# (name, change, the calls' outcomes by CKR (0: the right signature), whether the client's
# _send_batch reads the answer instead of the core)
BATCH_READS: list[tuple[str, Odd | None, list[int], bool]] = [
    ("usual", None, [0] * 4, False),
    ("an item's error", _first_item_fails, [C.CKR_MECHANISM_INVALID] + [0] * 3, True),
    # Braces and a quote inside a string of an item: the item ends where its JSON does; the
    # answer's extra field is BAD_RESPONSE for that call alone (the strict decoder's verdict).
    (
        "a brace in a string",
        lambda r: r.replace(b'"}}', b'","x":"}{\\"]"}}', 1),
        [C.CKR_DEVICE_ERROR] + [0] * 3,
        False,
    ),
    ("an item short", _last_item_dropped, [C.CKR_DEVICE_ERROR] * 4, True),
]


@pytest.mark.parametrize(
    "name,change,ckrs,by_client", BATCH_READS, ids=[n for n, _, _, _ in BATCH_READS]
)
def test_the_cores_batch_request_and_what_it_hands_to_the_client(
    mod: Module,
    logged_card: tuple[int, int, bytes],
    counted: Counted,
    name: str,
    change: Odd | None,
    ckrs: list[int],
    by_client: bool,
) -> None:
    """Queued fast-path calls leave in a batch request that the core writes, sends (no
    Transport.request) and reads itself in the usual case (batchpath.pxi); any other answer
    goes to the client's _send_batch with that outcome, no second request: each call still
    gets its own answer or CKR."""
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    client, group = p.client, p.client.group
    assert group is not None
    assert _sign(mod, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
    handed: list[Any] = []
    paths: list[str] = []
    real_batch, real_request = client._send_batch, client.transport.request

    def send_batch(calls: list[Any], *args: Any) -> None:
        handed.append(args)
        real_batch(calls, *args)

    def request(method: str, path: str, *args: Any, **kw: Any) -> tuple[int, bytes]:
        paths.append(path)
        return real_request(method, path, *args, **kw)

    datas = [b"read %d" % i for i in range(4)]
    before = group.sizes.get(4, 0)
    bodies: list[bytes] = []

    def perform(conn: Any, real: Callable[[], None], body: bytes) -> None:
        real()
        if conn.path == BATCH_PATH:
            bodies.append(body)
            if change is not None:
                conn.chunks[:] = [change(b"".join(conn.chunks))]

    undo = _on_perform(p, perform)
    client._send_batch, client.transport.request = send_batch, request
    try:
        out = queued_hmac_signs(mod, slot, key, group, datas)
    finally:
        del client._send_batch, client.transport.request
        undo()
    want = [hmac.digest(HMAC_KEY, d, hashlib.sha256) for d in datas]
    got = [0 if o == w else o.rv for o, w in zip(out, want, strict=True)]
    assert sorted(got) == sorted(ckrs), out  # the batch's order is the queue's
    assert len(bodies) == 1 and paths == []  # one request, sent by the core
    sent = json.loads(bodies[0])
    assert list(sent) == ["request_id", "items"] and len(sent["items"]) == 4
    assert handed == ([(bodies[0], (200, handed[0][1][1]))] if by_client else [])
    assert group.sizes.get(4, 0) == before + 1
    assert group._busy == 0 and group._carried == 0 and not group._queue
    assert counted.calls == 1


def test_a_failed_batch_request_gives_each_queued_call_the_ckr_of_a_failed_request(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    """The batch request as a whole fails (libcurl gives up on it, not retryable): every call
    it carried gets its own CKError, the one a lone call's failed request gives, and the group
    ends idle (nothing in flight, nothing queued, the lane free): the next call goes through."""
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    group = p.client.group
    assert group is not None
    assert _sign(mod, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
    fatal = pycurl.error(pycurl.E_UNSUPPORTED_PROTOCOL, "no https")
    batches: list[bytes] = []

    def perform(conn: Any, real: Callable[[], None], body: bytes) -> None:
        if conn.path == BATCH_PATH:
            batches.append(body)
            raise fatal
        real()

    undo = _on_perform(p, perform)
    try:
        out = queued_hmac_signs(mod, slot, key, group, [b"doomed %d" % i for i in range(4)])
    finally:
        undo()
    bodies, undo = _failing_first(p, fatal)
    try:
        lone = _outcome(lambda: _sign(mod, h, key, b"alone"))
    finally:
        undo()
    assert len(batches) == 1 and len(bodies) == 1  # not retryable: one attempt each
    assert lone[0] == "CKR" and lone[1] != C.CKR_OK
    assert all(isinstance(e, CKError) and e.rv == lone[1] for e in out), out
    assert len({id(e) for e in out}) == 4  # each call its own error
    assert group._busy == 0 and group._carried == 0 and not group._queue
    assert group.lane.free and not group._parked
    assert _sign(mod, h, key, b"after") == hmac.digest(HMAC_KEY, b"after", hashlib.sha256)
    assert counted.calls == 1


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_threads_on_the_lane_and_the_queue_all_get_their_answers(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted, n: int
) -> None:
    """Calls from 1, 2, 4 or 8 threads take the core's lane or queue behind it (group commit,
    the queued calls the core's Queued): every call gets its own answer and none is left
    waiting."""
    slot, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    assert _sign(mod, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
    group = _provider().client.group
    assert group is not None
    before = sum(k * v for k, v in group.sizes.items())  # calls carried so far
    rounds = 25
    sessions = [mod.open(slot) for _ in range(n)]
    wrong: list[Any] = []

    def work(i: int) -> None:
        for j in range(rounds):
            d = b"thread %d call %d" % (i, j)
            try:
                out = _sign(mod, sessions[i], key, d)
            except CKError as e:
                wrong.append(e)
                return
            if out != hmac.digest(HMAC_KEY, d, hashlib.sha256):
                wrong.append((i, j))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a C_Sign was never answered"
    assert wrong == []
    assert counted.calls == 1
    # Every call went through the group commit (its lane, a single or a batch request).
    assert sum(k * v for k, v in group.sizes.items()) - before == n * rounds
    for s in sessions:
        mod.call("C_CloseSession", s)


def test_a_lone_call_takes_the_cores_lane_and_steps_aside_while_requests_are_in_flight(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    """One thread: each fast call takes group commit's lane (the core's C Lane: no lock, no
    single request counted by the locked side) and leaves its token free. While the group's
    locked side has a request in flight (the token parked), the fast path goes through
    group.run() instead, and the same call still gets its own answer. Without group commit
    (BATCHINFLIGHT=0: no group, no lane in the entry) it sends its single request itself."""
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    assert _sign(mod, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
    p = _provider()
    group = p.client.group
    assert group is not None and p.fast[key][8] is group.lane
    assert type(group.lane) is sys.modules["pkcs11ws._native.core"].Lane
    sent, lone = group.lane.sent, group._lone
    for i in range(5):
        d = b"lane %d" % i
        assert _sign(mod, h, key, d) == hmac.digest(HMAC_KEY, d, hashlib.sha256)
    assert group.lane.sent == sent + 5 and group._lone == lone
    assert group.lane.free and group._busy == 0 and not group._parked
    with group._lock:  # another thread's request in flight on one of the 2 slots
        assert group.limit == 2
        group._busy, group._carried = 1, 1
        assert group._lane_busy() == 0 and not group.lane.free  # the token parked
    try:
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(_sign(mod, h, key, b"locked")))
        t.start()  # a free slot behind a lone request: it goes at once, on the locked side
        t.join(60)
        assert out == [hmac.digest(HMAC_KEY, b"locked", hashlib.sha256)]
        assert group._lone == lone + 1 and group.lane.sent == sent + 5
    finally:
        group._release(1)  # the pretended request ends: the token is given back
    assert group.lane.free and group._busy == 0 and not group._parked
    kept = p.fast
    p.fast = {k: (*e[:6], None, e[7], None) for k, e in kept.items()}
    try:
        assert _sign(mod, h, key, b"off") == hmac.digest(HMAC_KEY, b"off", hashlib.sha256)
    finally:
        p.fast = kept
    assert group.lane.sent == sent + 5 and group._lone == lone + 1
    assert counted.calls == 1


def test_a_lone_request_runs_the_cores_copy_of_the_transport_request_in_its_usual_case(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    """The fast path's lone request runs fastpath.pxi _request (Transport.request's usual
    case) and not the transport's Python method, also on a handle whose URL is another
    endpoint's (set again there, as request() does); a pooled handle that is not set up for
    this request otherwise (here: another header list) goes to Transport.request, which sets
    it up again."""
    _, h, _ = logged_card
    key = hmac_key(mod, h, HMAC_KEY)
    p = _provider()
    transport = p.client.transport
    assert _sign(mod, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
    real = transport.request
    paths: list[str] = []

    def request(method: str, path: str, *args: Any, **kw: Any) -> tuple[int, bytes]:
        paths.append(path)
        return real(method, path, *args, **kw)

    transport.request = request
    try:
        requests = transport.stats()["requests"]
        for d in (b"a", b"b", b"c"):
            assert _sign(mod, h, key, d) == hmac.digest(HMAC_KEY, d, hashlib.sha256)
        assert paths == [] and transport.stats()["requests"] == requests + 3
        for conn in transport.servers[0].idle:
            conn.path = "/crypto/v1/batch"  # as if the handle's URL were another endpoint's
            conn.curl.setopt(pycurl.URL, transport.servers[0].url + conn.path)
        assert _sign(mod, h, key, b"c2") == hmac.digest(HMAC_KEY, b"c2", hashlib.sha256)
        assert paths == [] and {c.path for c in transport.servers[0].idle} >= {"/crypto/v1/sign"}
        for conn in transport.servers[0].idle:
            conn.headers = ()  # as if the handle's header list were another request's
        assert _sign(mod, h, key, b"d") == hmac.digest(HMAC_KEY, b"d", hashlib.sha256)
        assert paths == ["/crypto/v1/sign"]
        assert _sign(mod, h, key, b"e") == hmac.digest(HMAC_KEY, b"e", hashlib.sha256)
        assert paths == ["/crypto/v1/sign"]  # set up again: the core's copy takes it
    finally:
        del transport.request
    assert counted.calls == 1


def test_rsa_decrypt_and_sign_go_fast_and_match_the_public_key(
    mod: Module, logged_card: tuple[int, int, bytes], counted: Counted
) -> None:
    """A private key's C_Decrypt (an answer of two fields: the client's decoding reads it)
    and C_Sign (read in the core) on the fast path, checked with the public half."""
    _, h, _ = logged_card
    m, _ = mechanism(C.CKM_RSA_PKCS_KEY_PAIR_GEN)
    tpub = Template([(C.CKA_TOKEN, True), (C.CKA_MODULUS_BITS, 2048), (C.CKA_ENCRYPT, True)])
    tpriv = Template(
        [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True), (C.CKA_SIGN, True), (C.CKA_DECRYPT, True)]
    )
    hpub, hpriv = CK_ULONG(), CK_ULONG()
    mod.ok("C_GenerateKeyPair", h, byref(m), tpub.array, tpub.count, tpriv.array, tpriv.count,
           byref(hpub), byref(hpriv))  # fmt: skip
    pub = serialization.load_der_public_key(mod.attr(h, hpub.value, C.CKA_PUBLIC_KEY_INFO))
    assert isinstance(pub, rsa.RSAPublicKey)
    rsa_pkcs, _ = mechanism(C.CKM_RSA_PKCS)
    for i in range(3):
        secret = b"secret %d" % i
        mod.ok("C_DecryptInit", h, byref(rsa_pkcs), hpriv.value)
        assert mod.single("C_Decrypt", h, pub.encrypt(secret, padding.PKCS1v15())) == secret
    assert counted.calls == 1  # the first made the entry
    digest = hashlib.sha256(b"signed").digest()
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    for _ in range(2):
        mod.ok("C_SignInit", h, byref(rsa_pkcs), hpriv.value)
        sig = mod.single("C_Sign", h, info)
        pub.verify(sig, b"signed", padding.PKCS1v15(), hashes.SHA256())
    assert counted.calls == 1  # the same key and mechanism: the same entry
