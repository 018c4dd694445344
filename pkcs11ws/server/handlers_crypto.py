"""The crypto endpoints (encrypt, decrypt, sign, verify, random) of handlers.Service, and the
per-worker caches of their hot path: key type and usage by handle, unwrapped key values, and the
whole verdict of a request's checks while the store's change mark stays the same.

Split from handlers.py (which mixes this class into Service) to keep each file readable; the
order of the checks is the protocol's: live session, mechanism, key, type, usage.
"""

from __future__ import annotations

import asyncio
import binascii
import contextvars
import os
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from pkcs11ws import constants as C
from pkcs11ws import mechanisms
from pkcs11ws._lite import dataclass
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import ops, sealing
from pkcs11ws.server._hot import HmacState, mac_answer
from pkcs11ws.server.pipeline import Request, Response, ok
from pkcs11ws.server.sealing import SealError, TokenClaims
from pkcs11ws.server.store import ObjectRow, ReadTx, Store

_KEY_META_CACHE_MAX: Final = 20000
_KEY_VALUE_CACHE_MAX: Final = 20000
_VERDICT_CACHE_MAX: Final = 20000
_VERIFIED: Final = Response(200, b'{"valid":true}')
VERIFIED_BODY: Final = _VERIFIED.body  # a verify's answer (the batch path's verify runs)

_T = TypeVar("_T")
_VerdictKey = tuple[str, str, bytes, str, str, str]


_b2a: Final = binascii.b2a_base64


def _b64(data: bytes) -> bytes:
    return _b2a(data, newline=False)


class _Verdict:
    """A crypto request's successful checks: the mechanism and loaded key, usable while the
    store has not changed and until `until` (a time the session is known to live to); with
    what needs no lookup then: the operation's function in the key's family module, its
    answer body, the offload decision (fixed per key), and direct: the operation as a
    function of the request's data alone, valid for a request with no optional field (the
    family's direct(); None: the family has none for this op and mechanism; for an HMAC
    verify, the MAC the signature must equal). A batch's run of items that differ only in
    their data (and a verify's signature) uses it (server/batch_items.py)."""

    __slots__ = ("answer", "direct", "key", "mech", "offload", "signs", "until", "work")

    def __init__(self, mech: mechanisms.Mechanism, key: Any, until: float, op: str) -> None:
        self.mech = mech
        self.key = key
        self.until = until
        family = ops.FAMILIES[mech.family]
        self.work: Callable[..., Any] = getattr(family, op)
        self.answer = _BODIES[op]
        self.offload: bool = family.offload(key)
        direct = getattr(family, "direct", None)
        self.direct: Callable[[bytes], Any] | None = (
            None if direct is None else direct(mech, key, op)
        )
        # An HMAC sign's prepared state: crypto_now answers a request without mac_length
        # (the family's sign() then is this state's full MAC) in C.
        self.signs = self.direct if op == "sign" and type(self.direct) is HmacState else None


@dataclass(frozen=True)
class _KeyMeta:
    cls: int
    key_type: int
    usage: frozenset[str]


# True while App._batch (server/batch_items.py) runs items through _operation: an item whose
# work goes to the thread pool (offload) is then raised as Offloaded once its checks passed,
# and the batch hands all of them to one thread in one go (one hand-off per batch instead of
# one per item, ~55 us each).
IN_BATCH: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "pkcs11ws_in_batch", default=False
)


class Offloaded(Exception):  # not an error: a batch item's work, left for later
    """A batch item's checked work: run() computes its output (in the batch's thread), and
    answer() makes the item's answer from that output, as its handler would have."""

    def __init__(
        self, work: Callable[..., Any], mech: mechanisms.Mechanism, key: Any, body: Any, fn: str
    ) -> None:
        super().__init__(fn)
        self.work = work
        self.mech = mech
        self.key = key
        self.body = body
        self.fn = fn

    def run(self) -> Any:
        return self.work(self.mech, self.key, self.body)

    def answer(self, out: Any) -> Response:
        return Response(200, _BODIES[self.fn](out))


def _cipher_body(out: tuple[bytes, bytes]) -> bytes:
    return b'{"data":"' + _b64(out[0]) + b'","last_block":"' + _b64(out[1]) + b'"}'


# The answer bodies of the keyed operations, built directly (the same bytes as ok(): compact
# JSON, fields in struct order, base64 needs no JSON escaping: they are the hot path), and each
# one's (operation flag, usage attribute): what CryptoHandlers.crypto_now needs by op.
# B64_ANSWERS: the answers that are one base64 field, each up to its value's opening quote (the
# value, then '"}', ends it).
B64_ANSWERS: Final[dict[str, bytes]] = {"sign": b'{"signature":"'}
_SIGNATURE: Final = B64_ANSWERS["sign"]
_BODIES: Final[dict[str, Callable[[Any], bytes]]] = {
    "sign": lambda sig: _SIGNATURE + _b2a(sig, newline=False) + b'"}',
    "verify": lambda _: _VERIFIED.body,
    "encrypt": _cipher_body,
    "decrypt": _cipher_body,
}
_KEYED: Final[dict[str, tuple[int, str]]] = {
    "sign": (C.CKF_SIGN, "CKA_SIGN"),
    "verify": (C.CKF_VERIFY, "CKA_VERIFY"),
    "encrypt": (C.CKF_ENCRYPT, "CKA_ENCRYPT"),
    "decrypt": (C.CKF_DECRYPT, "CKA_DECRYPT"),
}


def ended() -> ApiError:
    return ApiError("NOT_ACTIVATED", "the activation was ended (deactivated or deleted)")


class CryptoHandlers:
    """The crypto endpoints; Service provides the store and its read()."""

    store: Store
    _reads_block: bool

    async def read(self, fn: Callable[[ReadTx], _T]) -> _T:  # Service.read
        raise NotImplementedError

    def _init_crypto(self, store: Store) -> None:
        # A key's type and usage never change after creation (renaming touches only CKA_LABEL
        # and CKA_ID) and handles are never reused, so they can be cached; whether the key
        # still exists is always asked of the store.
        self._key_meta: dict[str, _KeyMeta] = {}
        self._reads_block = store.reads_block
        # Unwrapped key values by (handle, sealed blob, card key): a handle is never reused and
        # a blob never changes meaning, so a hit is exactly what decrypting would give; the
        # row itself (does the key still exist?) is still read from the store every request.
        self._key_values: dict[tuple[str, bytes, bytes], Any] = {}
        # The crypto path's whole verdict (live session, key row, mechanism, type, usage: the
        # loaded key) by everything it depends on, valid while the store's change mark stays
        # the same (Store.change_mark) and the session is known to live (_key). None: the
        # store cannot tell cheaply when it changed, and every request asks it.
        self._marks = type(store).change_mark is not Store.change_mark
        self._verdicts: dict[_VerdictKey, _Verdict] = {}
        self._verdicts_mark: object = None
        self._mark_read = False  # a costly mark was read in this turn of the event loop

    async def _found(self, claims: TokenClaims, handle: str) -> tuple[bool, ObjectRow | None]:
        """session_object off the event loop (stores whose reads block)."""
        now = time.time()
        session, card = claims.session, claims.card
        return await self.read(lambda r: r.session_object(session, card, now, handle))

    def _verdict_cache(self) -> dict[_VerdictKey, _Verdict]:
        """The verdicts still valid now: all of them are dropped when the store's change mark
        moved. A cheap mark (Store.cheap_mark: SQLite's wal-index header) is read for every
        request, after its bytes arrived. A costly one is read at most once per turn of the
        event loop (the items of a batch and the requests handled in the same turn share it):
        a request whose bytes arrived after a change committed is handled in a later turn, so
        it sees the change. (At one request per turn the turn's bookkeeping, a call_soon and
        its callback, cost more than reading a cheap mark again.)"""
        store = self.store
        mark = store.change_mark()
        if not store.cheap_mark:
            self._mark_read = True
            asyncio.get_running_loop().call_soon(self._turn_over)
        if mark != self._verdicts_mark:
            self._verdicts.clear()
            self._verdicts_mark = mark
        return self._verdicts

    def _turn_over(self) -> None:
        self._mark_read = False

    def _key(
        self,
        claims: TokenClaims,
        handle: str,
        mech_name: str,
        op: str,
        found: tuple[bool, ObjectRow | None] | None,
    ) -> _Verdict:
        """The mechanism and the key as its family loaded it for op (encrypt, decrypt, sign,
        verify), after the checks in the order the protocol promises: live session (deferred
        from authenticate), mechanism, key, type, usage. found: the session_object answer
        when the caller read it off the loop, else None (the hot path on an embedded store:
        read here, no coroutine in between)."""
        cache = None
        until = 0.0
        if found is None:
            now = time.time()
            if self._marks:
                cache = self._verdicts if self._mark_read else self._verdict_cache()
                ck = (claims.session, claims.card, claims.card_key, handle, mech_name, op)
                hit = cache.get(ck)
                if hit is not None and now < hit.until:
                    return hit
            with self.store.read() as r:
                # Asked as of a second before the token expires: a session that lives then
                # lives until then, so the verdict can be reused until then (the token itself
                # expires; a renewal that shortened the session is a change, which drops it).
                probe = claims.expires - 1.0
                if cache is not None and now < probe:
                    live, row = r.session_object(claims.session, claims.card, probe, handle)
                    if live:
                        until = probe
                    else:
                        live, row = r.session_object(claims.session, claims.card, now, handle)
                else:
                    live, row = r.session_object(claims.session, claims.card, now, handle)
        else:
            live, row = found
        if not live:
            raise ended()
        flag, use = _KEYED[op]
        mech = self._mech(mech_name, flag)
        want_cls = C.CKO_PRIVATE_KEY if mech.private_key else C.CKO_SECRET_KEY
        if row is None or row.cls not in (C.CKO_SECRET_KEY, C.CKO_PRIVATE_KEY):
            raise ApiError("KEY_NOT_FOUND", "no such key")
        if row.secret is None:
            raise ApiError("KEY_NOT_FOUND", "no such key")
        meta = self._key_meta.get(handle)
        if meta is None:
            attrs = row.attrs
            key_type = attrs["CKA_KEY_TYPE"]
            assert isinstance(key_type, int)
            meta = _KeyMeta(
                row.cls,
                key_type,
                frozenset(
                    u
                    for u in ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_SIGN", "CKA_VERIFY")
                    if attrs.get(u) is True
                ),
            )
            if len(self._key_meta) >= _KEY_META_CACHE_MAX:
                self._key_meta.clear()
            self._key_meta[handle] = meta
        if meta.cls != want_cls or meta.key_type not in mech.key_types:
            raise ApiError("KEY_TYPE_INCONSISTENT", f"{mech.name} cannot use this key type")
        if use not in meta.usage:
            raise ApiError("KEY_FUNCTION_NOT_PERMITTED", f"the key's {use} is false")
        cache_key = (handle, row.secret, claims.card_key)
        key = self._key_values.get(cache_key)
        if key is None:
            try:
                value = sealing.decrypt_value(claims.card_key, handle, row.secret)
            except SealError:
                raise ApiError(
                    "KEY_NOT_FOUND", "the key does not open with this softcard"
                ) from None
            if want_cls == C.CKO_SECRET_KEY and not mech.min_key <= len(value) <= mech.max_key:
                raise ApiError(
                    "KEY_SIZE_RANGE", f"a {len(value)}-byte key does not fit {mech.name}"
                )
            key = ops.FAMILIES[mech.family].load(value)
            if len(self._key_values) >= _KEY_VALUE_CACHE_MAX:
                self._key_values.clear()
            self._key_values[cache_key] = key
        elif want_cls == C.CKO_SECRET_KEY and not mech.min_key <= len(key) <= mech.max_key:
            raise ApiError("KEY_SIZE_RANGE", f"a {len(key)}-byte key does not fit {mech.name}")
        verdict = _Verdict(mech, key, until, op)
        if until:
            assert cache is not None
            if len(cache) >= _VERDICT_CACHE_MAX:
                cache.clear()
            cache[ck] = verdict
        return verdict

    @staticmethod
    def _mech(name: str, flag: int) -> mechanisms.Mechanism:
        mech = mechanisms.by_name(name)
        if mech is None or not mech.flags & flag or mech.family not in ops.FAMILIES:
            raise ApiError("MECHANISM_INVALID", f"{name!r} is not valid for this operation")
        return mech

    def crypto_now(
        self,
        claims: TokenClaims,
        b: dict[str, Any],
        op: str,
        found: tuple[bool, ObjectRow | None] | None = None,
    ) -> bytes:
        """A keyed operation (op: encrypt, decrypt, sign, verify) through the family registry,
        without a coroutine: its answer body. Private-key arithmetic that costs more than a
        thread hand-off (RSA, ECDSA above P-256: ops.<family>.offload) is raised as Offloaded
        instead, to run in the thread pool, so that HMAC and AES requests are not queued
        behind it. found: as for _key (a store whose reads block: read before, off the loop)."""
        v = self._key(claims, b["key"], b["mechanism"], op, found)
        if v.signs is not None and "mac_length" not in b:
            return mac_answer(v.signs, b["data"], _SIGNATURE, b'"}')
        if v.offload:
            raise Offloaded(v.work, v.mech, v.key, b, op)
        return v.answer(v.work(v.mech, v.key, b))

    def checked(self, claims: TokenClaims, b: dict[str, Any], op: str) -> _Verdict:
        """crypto_now's checks alone (a store whose reads do not block): the verdict whose
        work and answer make the answer body; offloaded work is raised as there."""
        v = self._key(claims, b["key"], b["mechanism"], op, None)
        if v.offload:
            raise Offloaded(v.work, v.mech, v.key, b, op)
        return v

    async def keyed(self, claims: TokenClaims, b: dict[str, Any], op: str) -> Response:
        """crypto_now as a request's handler: the store read off the event loop when reads
        block, offloaded work in the thread pool (inside a batch, IN_BATCH: raised for the
        batch to run with its other items)."""
        found = await self._found(claims, b["key"]) if self._reads_block else None
        try:
            return Response(200, self.crypto_now(claims, b, op, found))
        except Offloaded as work:
            if IN_BATCH.get():
                raise
            return work.answer(await asyncio.to_thread(work.run))

    # The four keyed endpoints' entries in the handler table (App's every op has one). App
    # itself runs these ops through App._keyed, which calls keyed() or crypto_now directly.

    async def encrypt(self, req: Request) -> Response:
        assert req.claims is not None
        return await self.keyed(req.claims, req.body, "encrypt")

    async def decrypt(self, req: Request) -> Response:
        assert req.claims is not None
        return await self.keyed(req.claims, req.body, "decrypt")

    async def sign(self, req: Request) -> Response:
        assert req.claims is not None
        return await self.keyed(req.claims, req.body, "sign")

    async def verify(self, req: Request) -> Response:
        assert req.claims is not None
        return await self.keyed(req.claims, req.body, "verify")

    async def random(self, req: Request) -> Response:
        n = req.body["length"]
        if not 1 <= n <= ops.MAX_RANDOM:
            raise ApiError("BAD_REQUEST", f"length must be 1 to {ops.MAX_RANDOM}")
        return ok("RandomResult", {"data": os.urandom(n)})
