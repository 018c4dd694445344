"""The key service's operations, one method per endpoint op (protocol.ENDPOINTS).

Each handler gets a decoded Request and returns a Response (status and JSON body bytes); failures
are raised as ProtocolError with a protocol error code. Nothing here depends on this process's
memory beyond caches: sessions, lockouts and idempotency records live in the store, so any worker
or replica can answer any request. Store access follows the store contract (store.py): reads
through `Service.read` (off the event loop when the backend's reads block), changes through
`Service.commit` (always in a worker thread, one write transaction).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from pkcs11ws import __version__, mechanisms, protocol
from pkcs11ws import attributes as A
from pkcs11ws.protocol import Attrs
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import pipeline, sealing
from pkcs11ws.server.handlers_crypto import CryptoHandlers
from pkcs11ws.server.handlers_crypto import ended as _ended
from pkcs11ws.server.identity import Clients, Identity
from pkcs11ws.server.new_objects import (
    CLASS_ATTRS,
    NewObject,
    copied_attrs,
    generated_key,
    generated_pair,
    is_public,
    new_object,
    renamed_attrs,
)
from pkcs11ws.server.pipeline import Idem, Request, Response, dumps, ok
from pkcs11ws.server.sealing import MasterKeys, SealError, TokenClaims
from pkcs11ws.server.settings import Settings
from pkcs11ws.server.store import (
    CardCounts,
    CardRow,
    IdempotencyRow,
    ObjectRow,
    ReadTx,
    Store,
    WriteTx,
)

_T = TypeVar("_T")
log = logging.getLogger("pkcs11ws.server")
# How long a reservation counts if it is never settled (its process died mid-evaluation), and
# how long an attempt waits for a place among those in flight.
_LEASE: Final = 60.0
_RESERVE_WAIT: Final = 30.0
_TOKEN_CACHE_MAX: Final = 10000


_EMPTY: Final = Response(200, b"{}")


def _shows_value(cls: int) -> bool:
    """Whether the class has a CKA_VALUE that may be read (data, certificates)."""
    return "CKA_VALUE" in A.SCHEMA[cls] and not A.sensitive(cls, "CKA_VALUE")


_SEARCHABLE_KEY_TYPES: Final = {**mechanisms.KEY_TYPE_NAMES, **mechanisms.PAIR_KEY_TYPE_NAMES}
_PUBLIC_CLASSES: Final = tuple(c for c in A.SCHEMA if A.may_be_public(c))


def expired() -> ApiError:
    return ApiError("NOT_ACTIVATED", "the activation has expired")


class Service(CryptoHandlers):
    """The endpoint operations over one store and one set of master keys."""

    def __init__(
        self, settings: Settings, store: Store, keys: MasterKeys, clients: Clients
    ) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.clients = clients
        self._tokens: dict[bytes, TokenClaims] = {}
        self._init_crypto(store)
        self._kdf_pool = ThreadPoolExecutor(settings.scrypt_concurrency, "scrypt")

    # ---------------------------------------------------------------- plumbing

    def _read_sync(self, fn: Callable[[ReadTx], _T]) -> _T:
        with self.store.read() as r:
            return fn(r)

    async def read(self, fn: Callable[[ReadTx], _T]) -> _T:
        """fn on a ReadTx: in a worker thread when the store's reads wait on the network, else
        right here (a thread hop would cost more than an embedded read: store.py)."""
        if self._reads_block:
            return await asyncio.to_thread(self._read_sync, fn)
        with self.store.read() as r:
            return fn(r)

    def authenticate(
        self, authorization: bytes | None, path_card: str | None, ident: Identity
    ) -> TokenClaims:
        """The token's claims, for the identity it was issued to only. The caller must still
        ask the store whether the session lives (check_session; the crypto endpoints do it in
        the same query as the key)."""
        if not authorization or not authorization.startswith(b"Bearer "):
            raise ApiError("NOT_ACTIVATED", "no activation token: activate the softcard first")
        # A sealed token's content never changes, so its opened claims can be cached by the
        # token's bytes; expiry and the session row (revocation) are still checked every time.
        claims = self._tokens.get(authorization)
        if claims is None:
            try:
                claims = self.keys.open_token(authorization[7:].decode("ascii").strip())
            except (SealError, UnicodeDecodeError):
                raise ApiError("NOT_ACTIVATED", "the activation token is not valid") from None
            if len(self._tokens) >= _TOKEN_CACHE_MAX:
                self._tokens.clear()
            self._tokens[authorization] = claims
        pipeline.check_token(claims, ident)
        if claims.expires <= time.time():
            raise expired()
        if path_card is not None and path_card != claims.card:
            raise ApiError("NOT_ACTIVATED", "the activation token is for another softcard")
        return claims

    async def check_session(self, claims: TokenClaims, now: float) -> None:
        if not await self.read(lambda r: r.session_valid(claims.session, claims.card, now)):
            raise _ended()

    def _fresh(self, row: IdempotencyRow | None, now: float) -> bytes | None:
        """The stored response body of a still-valid idempotency record, else None."""
        if row is None or row.created < now - self.settings.idempotency_ttl:
            return None
        try:
            return self.keys.open_response(row.body, row.key)
        except SealError:  # sealed under a previous master key: treat as expired
            return None

    def replay(self, idem: Idem, row: IdempotencyRow | None) -> Response | None:
        body = self._fresh(row, time.time())
        if body is None or row is None:
            return None
        if not hmac.compare_digest(row.fingerprint, idem.fingerprint):
            raise ApiError(
                "IDEMPOTENCY_CONFLICT", "this Idempotency-Key was used for a different request"
            )
        return Response(row.status, body)

    def _commit_sync(self, idem: Idem | None, change: Callable[[WriteTx], Response]) -> Response:
        with self.store.write() as tx:
            now = time.time()
            if idem is not None:
                done = self.replay(idem, tx.idempotency_get(idem.key))
                if done is not None:
                    return done
            resp = change(tx)
            if idem is not None and 200 <= resp.status < 300:
                tx.idempotency_expire(now - self.settings.idempotency_ttl)
                sealed = self.keys.seal_response(resp.body, idem.key)
                tx.idempotency_put(
                    IdempotencyRow(idem.key, idem.fingerprint, resp.status, sealed, now)
                )
            return resp

    async def commit(self, idem: Idem | None, change: Callable[[WriteTx], Response]) -> Response:
        """Run a change (and record its idempotent answer) in one transaction, off the loop."""
        return await asyncio.to_thread(self._commit_sync, idem, change)

    # ---------------------------------------------------------------- softcards

    async def health(self, req: Request) -> Response:
        return ok("Health", {"status": "ok", "version": __version__, "protocol": protocol.VERSION})

    def _card_json(self, card: CardRow, counts: CardCounts) -> dict[str, Any]:
        # The wrong-passphrase count lets the module set the token's CKF_USER_PIN_* flags.
        locked_for = max(0, math.ceil(card.locked_until - time.time()))
        return {
            "id": card.id,
            "name": card.name,
            "keys": counts.keys,
            "certificates": counts.certificates,
            "data": counts.data,
            "created": card.created,
            "failures": card.failures,
            "failure_threshold": self.settings.lockout_threshold,
            "locked_for": locked_for,
            "owner": card.owner,
        }

    @staticmethod
    def _card(req: Request) -> CardRow:
        """The softcard of a "card"/"owner" endpoint: loaded and authorized by the pipeline."""
        assert req.card is not None
        return req.card

    async def list_softcards(self, req: Request) -> Response:
        ident = req.ident
        visible_to = None if ident.admin else ident.name
        rows = await self.read(lambda r: r.card_list(visible_to))
        cards = [self._card_json(c, n) for c, n in rows]
        return ok("SoftcardList", {"softcards": cards})

    async def get_softcard(self, req: Request) -> Response:
        card = self._card(req)
        return ok(
            "Softcard", self._card_json(card, await self.read(lambda r: r.card_counts(card.id)))
        )

    async def create_softcard(self, req: Request) -> Response:
        name: str = req.body["name"]
        passphrase: bytes = req.body["passphrase"]
        if not protocol.NAME_RE.match(name):
            raise ApiError("INVALID_NAME", "softcard names are 1-64 letters and digits")
        _check_passphrase(passphrase)
        minimum = self.settings.passphrase_min_length
        if len(passphrase) < minimum:
            raise ApiError(
                "PASSPHRASE_LEN_RANGE", f"the passphrase must be at least {minimum} bytes"
            )
        sc = self.settings.scrypt
        card_id = str(uuid.uuid4())
        salt = os.urandom(sealing.SALT_LEN)
        card_key = os.urandom(sealing.CARD_KEY_LEN)

        def wrap() -> bytes:
            kek = sealing.kek(passphrase, salt, sc.n, sc.r, sc.p)
            return self.keys.wrap_card(sealing.wrap_card_key(kek, card_key, card_id), card_id)

        wrapped = await self._slow(wrap)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        row = CardRow(card_id, name, created, salt, sc.n, sc.r, sc.p, wrapped, owner=req.ident.name)

        def change(tx: WriteTx) -> Response:
            if not tx.card_insert(row):
                raise ApiError("SOFTCARD_EXISTS", f"a softcard named {name!r} exists")
            return ok("Softcard", self._card_json(row, CardCounts(0, 0, 0)))

        return await self.commit(req.idem, change)

    async def delete_softcard(self, req: Request) -> Response:
        # The pipeline let only the owner or an admin through; no passphrase is asked (see
        # the README: deleting is about who may, and an admin must be able to clean up a card
        # whose passphrase is lost).
        card_id = self._card(req).id
        force = req.query.get("force") == "true"

        def change(tx: WriteTx) -> Response:
            if tx.card_get(card_id) is None:
                raise ApiError("SOFTCARD_NOT_FOUND", "no softcard with that ID")
            keys = tx.card_counts(card_id).keys
            if keys and not force:
                raise ApiError(
                    "SOFTCARD_NOT_EMPTY",
                    f"the softcard holds {keys} keys; delete them or use force=true",
                )
            tx.card_delete(card_id)
            return _EMPTY

        return await self.commit(req.idem, change)

    async def activate(self, req: Request) -> Response:
        card = self._card(req)
        client = req.ident.name
        passphrase: bytes = req.body["passphrase"]
        _check_passphrase(passphrase)
        s = self.settings
        now = time.time()
        if card.locked_until > now:  # the common refusal, without a write
            _login_event(card.id, "locked")
            raise _locked(card.locked_until - now)
        count = await self._reserve(card.id)

        def open_card() -> bytes:
            try:
                inner = self.keys.unwrap_card(card.wrapped_key, card.id)
            except SealError:
                raise _MasterMismatch from None
            kek = sealing.kek(passphrase, card.salt, card.kdf_n, card.kdf_r, card.kdf_p)
            return sealing.unwrap_card_key(kek, inner, card.id)

        def settle(success: bool, when: float) -> None:
            with self.store.write() as tx:  # one statement, committed at once
                tx.card_settle_attempt(
                    card.id, success, when, s.lockout_threshold, s.lockout_max_seconds
                )

        try:
            card_key = await self._slow(open_card)
        except SealError:
            await asyncio.to_thread(settle, False, time.time())
            _login_event(card.id, "wrong passphrase", count)
            raise ApiError("PASSPHRASE_INCORRECT", "wrong passphrase") from None
        except _MasterMismatch:
            # Left to its lease: nothing was learnt about the passphrase, and the card cannot
            # be opened here anyway.
            log.error(
                "softcard %s: its card key is not wrapped under this service's master key "
                "(a store from another service, or the wrong master key)",
                card.id,
            )
            raise ApiError(
                "INTERNAL",
                "the softcard cannot be opened with this service's "
                "master key (logged by the service)",
            ) from None
        await asyncio.to_thread(settle, True, time.time())
        session = str(uuid.uuid4())
        ttl = self.settings.activation_ttl
        expires = int(time.time()) + ttl

        ident = req.ident

        def change(tx: WriteTx) -> Response:
            current = tx.card_get(card.id)  # locks the card: grant changes wait (store.py)
            # Asked again under that lock: a grant withdrawn since the pipeline's read must not
            # leave this activation behind (the withdrawal ends only committed sessions).
            if current is None or not pipeline.sees(tx, ident, current):
                raise pipeline.not_found()
            tx.session_expire(time.time())
            tx.session_insert(session, card.id, float(expires), client)
            token = self.keys.seal_token(TokenClaims(session, card.id, card_key, expires, client))
            return ok("Activation", {"token": token, "expires_in": ttl})

        return await self.commit(None, change)

    async def renew(self, req: Request) -> Response:
        """A fresh token for a live session (renew-while-in-use, see the README)."""
        claims = req.claims
        assert claims is not None
        ident = req.ident
        ttl = self.settings.activation_ttl
        expires = int(time.time()) + ttl

        def change(tx: WriteTx) -> Response:
            # The role or grants may have changed since the activation: ask again, under the
            # card's lock (a grant withdrawn meanwhile has ended the session too).
            card = tx.card_get(claims.card)
            if card is None or not pipeline.sees(tx, ident, card):
                raise pipeline.not_found()
            if not tx.session_extend(claims.session, claims.card, float(expires)):
                raise _ended()
            renewed = TokenClaims(
                claims.session, claims.card, claims.card_key, expires, claims.client
            )
            token = self.keys.seal_token(renewed)
            return ok("Activation", {"token": token, "expires_in": ttl})

        return await self.commit(None, change)

    # ---------------------------------------------------------------- grants

    async def list_grants(self, req: Request) -> Response:
        card_id = self._card(req).id
        names = await self.read(lambda r: r.grant_list(card_id))
        return ok("GrantList", {"grants": [{"client": n} for n in names]})

    def _grantee(self, req: Request) -> str:
        name = req.params["client"]
        if name not in self.clients.names:
            raise ApiError("UNKNOWN_CLIENT", "the clients file names no such identity")
        return name

    async def grant(self, req: Request) -> Response:
        card, name = self._card(req).id, self._grantee(req)

        def change(tx: WriteTx) -> Response:
            if tx.card_get(card) is None:  # deleted since the pipeline read it
                raise pipeline.not_found()
            tx.grant_put(card, name)
            return _EMPTY

        return await self.commit(None, change)

    async def revoke_grant(self, req: Request) -> Response:
        card, name = self._card(req).id, self._grantee(req)

        def change(tx: WriteTx) -> Response:
            if tx.card_get(card) is None:
                raise pipeline.not_found()
            tx.grant_delete(card, name)
            return _EMPTY

        return await self.commit(None, change)

    async def _reserve(self, card_id: str) -> int:
        """Reserve a passphrase evaluation in the store before the slow hash (the count of
        failures and attempts in flight). While the attempts in flight fill the quota, wait for
        them to settle: right ones reopen it, wrong ones lock the card, and a locked card is
        refused here, without scrypt. So parallel guesses get at most `threshold` evaluations,
        and parallel logins with the right passphrase all succeed."""
        deadline = time.monotonic() + _RESERVE_WAIT
        delay = 0.005
        while True:
            now = time.time()
            count = await asyncio.to_thread(self._reserve_sync, card_id, now)
            if count is not None:
                return count
            current = await self.read(lambda r: r.card_get(card_id))
            if current is None:
                raise pipeline.not_found()
            now = time.time()
            if current.locked_until > now:
                _login_event(card_id, "locked")
                raise _locked(current.locked_until - now)
            if time.monotonic() > deadline:
                _login_event(card_id, "too many attempts in flight")
                raise ApiError("PASSPHRASE_LOCKED", "too many passphrase attempts in progress")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _reserve_sync(self, card_id: str, now: float) -> int | None:
        # Its own write transaction, committed before the hash runs: the reservation must be
        # what concurrent attempts (other workers, other replicas) see.
        with self.store.write() as tx:
            return tx.card_reserve_attempt(
                card_id, now, self.settings.lockout_threshold, now + _LEASE
            )

    async def _slow(self, fn: Callable[[], _T]) -> _T:
        """Run scrypt work in the capped pool (scrypt.max_concurrent threads), so a burst of
        guesses or creates queues there instead of taking every thread of the loop's executor
        (which the store writes of the other requests use)."""
        return await asyncio.get_running_loop().run_in_executor(self._kdf_pool, fn)

    async def deactivate(self, req: Request) -> Response:
        assert req.claims is not None
        session = req.claims.session

        def change(tx: WriteTx) -> Response:
            if not tx.session_delete(session):
                raise ApiError("NOT_ACTIVATED", "the activation was already ended")
            return _EMPTY

        return await self.commit(None, change)

    # ---------------------------------------------------------------- objects

    @staticmethod
    def _visible(row: ObjectRow, card_key: bytes) -> Attrs:
        # A public certificate's CKA_VALUE rests unsealed among its attributes.
        attrs = dict(row.attrs)
        if _shows_value(row.cls) and row.secret is not None:
            attrs["CKA_VALUE"] = sealing.decrypt_value(card_key, row.handle, row.secret)
        return attrs

    @staticmethod
    def _row(handle: str, card: str, card_key: bytes, obj: NewObject) -> ObjectRow:
        """The stored form: the value sealed under the card key, unless the object is public."""
        attrs, secret = obj.attrs, None
        if is_public(obj.cls, obj.attrs):
            if _shows_value(obj.cls):
                attrs = {**obj.attrs, "CKA_VALUE": obj.value}
        else:
            secret = sealing.encrypt_value(card_key, handle, obj.value)
        return ObjectRow.new(handle, card, obj.cls, obj.key_type, attrs, secret)

    async def _store_new(self, req: Request, obj: NewObject) -> Response:
        assert req.claims is not None
        claims = req.claims
        handle = str(uuid.uuid4())
        row = self._row(handle, claims.card, claims.card_key, obj)
        visible = dict(obj.attrs)
        if _shows_value(obj.cls):
            visible["CKA_VALUE"] = obj.value

        def change(tx: WriteTx) -> Response:
            tx.object_insert(row)
            return ok("Object", {"handle": handle, "attrs": visible})

        return await self.commit(req.idem, change)

    async def create_object(self, req: Request) -> Response:
        return await self._store_new(req, new_object(req.body["attrs"]))

    async def generate_key(self, req: Request) -> Response:
        return await self._store_new(req, generated_key(req.body["mechanism"], req.body["attrs"]))

    async def generate_key_pair(self, req: Request) -> Response:
        assert req.claims is not None
        claims, b = req.claims, req.body
        # Generating an RSA key takes 50 ms to seconds: off the event loop.
        pub, priv = await asyncio.to_thread(
            generated_pair, b["mechanism"], b["public_attrs"], b["private_attrs"]
        )
        handles = (str(uuid.uuid4()), str(uuid.uuid4()))
        rows = [
            self._row(handles[0], claims.card, claims.card_key, pub),
            self._row(handles[1], claims.card, claims.card_key, priv),
        ]

        def change(tx: WriteTx) -> Response:
            for row in rows:
                tx.object_insert(row)
            return ok(
                "KeyPair",
                {
                    "public": {"handle": handles[0], "attrs": pub.attrs},
                    "private": {"handle": handles[1], "attrs": priv.attrs},
                },
            )

        return await self.commit(req.idem, change)

    async def get_object(self, req: Request) -> Response:
        assert req.claims is not None
        card, handle = req.claims.card, req.params["handle"]
        row = await self.read(lambda r: r.object_get(card, handle))
        if row is None:
            raise ApiError("OBJECT_NOT_FOUND", "no such object")
        return ok(
            "Object", {"handle": row.handle, "attrs": self._visible(row, req.claims.card_key)}
        )

    async def delete_object(self, req: Request) -> Response:
        assert req.claims is not None
        card, handle = req.claims.card, req.params["handle"]

        def change(tx: WriteTx) -> Response:
            if not tx.object_delete(card, handle):
                raise ApiError("OBJECT_NOT_FOUND", "no such object")
            return _EMPTY

        return await self.commit(req.idem, change)

    async def copy_object(self, req: Request) -> Response:
        assert req.claims is not None
        claims, source = req.claims, req.params["handle"]
        handle = str(uuid.uuid4())

        def change(tx: WriteTx) -> Response:
            row = tx.object_get(claims.card, source)
            if row is None:
                raise ApiError("OBJECT_NOT_FOUND", "no such object")
            visible = self._visible(row, claims.card_key)
            value = visible.pop("CKA_VALUE", b"")
            if not _shows_value(row.cls):
                assert row.secret is not None
                value = sealing.decrypt_value(claims.card_key, row.handle, row.secret)
            assert isinstance(value, bytes)
            attrs = copied_attrs(row.cls, visible, value, req.body["attrs"])
            tx.object_insert(
                self._row(
                    handle,
                    claims.card,
                    claims.card_key,
                    NewObject(row.cls, row.key_type, attrs, value),
                )
            )
            shown = dict(attrs)
            if _shows_value(row.cls):
                shown["CKA_VALUE"] = value
            return ok("Object", {"handle": handle, "attrs": shown})

        return await self.commit(req.idem, change)

    async def update_object(self, req: Request) -> Response:
        assert req.claims is not None
        claims, handle = req.claims, req.params["handle"]

        def change(tx: WriteTx) -> Response:
            row = tx.object_get(claims.card, handle)
            if row is None:
                raise ApiError("OBJECT_NOT_FOUND", "no such object")
            attrs = renamed_attrs(row.cls, row.attrs, req.body["attrs"])
            tx.object_set_attrs(claims.card, handle, attrs)
            renamed = ObjectRow.new(row.handle, row.card, row.cls, row.key_type, attrs, row.secret)
            return ok(
                "Object", {"handle": handle, "attrs": self._visible(renamed, claims.card_key)}
            )

        return await self.commit(None, change)

    async def search_public(self, req: Request) -> Response:
        card_id = self._card(req).id
        want: Attrs = req.body["attrs"]
        found: list[dict[str, Any]] = []

        # Only certificates and public keys can be public; their rows hold no sealed value.
        classes = [c for c in _PUBLIC_CLASSES if want.get("CKA_CLASS", c) == c]

        def public(r: ReadTx) -> list[ObjectRow] | None:
            if r.card_get(card_id) is None:
                return None
            return [row for c in classes for row in r.object_search(card_id, c, None)]

        rows = await self.read(public)
        if rows is None:
            raise ApiError("SOFTCARD_NOT_FOUND", "no softcard with that ID")
        if rows:
            for row in rows:
                if row.secret is not None:
                    continue
                attrs = row.attrs
                if attrs.get("CKA_PRIVATE") is False and all(
                    attrs.get(n) == v for n, v in want.items()
                ):
                    found.append({"handle": row.handle, "attrs": attrs})
        return ok("ObjectList", {"objects": found})

    async def search_objects(self, req: Request) -> Response:
        assert req.claims is not None
        claims = req.claims
        want: Attrs = req.body["attrs"]
        cls, key_type = want.get("CKA_CLASS"), want.get("CKA_KEY_TYPE")
        value_wanted = want.get("CKA_VALUE")
        clear_want = [(n, v) for n, v in want.items() if n != "CKA_VALUE"]
        found: list[dict[str, Any]] = []
        # Values outside what the store can hold match nothing (and must not reach the SQL).
        if (cls is None or (isinstance(cls, int) and cls in CLASS_ATTRS)) and (
            key_type is None or (isinstance(key_type, int) and key_type in _SEARCHABLE_KEY_TYPES)
        ):
            card = claims.card
            rows = await self.read(lambda r: list(r.object_search(card, cls, key_type)))
            for row in rows:
                # Match the clear attributes first: only candidates get their value decrypted.
                attrs, wire = row.attrs, row.wire
                if not all(attrs.get(n) == v for n, v in clear_want):
                    continue
                # Keys carry no CKA_VALUE here, so a search on it never matches them.
                if _shows_value(row.cls) and row.secret is not None:
                    value = sealing.decrypt_value(claims.card_key, row.handle, row.secret)
                    if value_wanted is not None and value != value_wanted:
                        continue
                    wire = {**wire, "CKA_VALUE": protocol.b64e(value)}
                elif value_wanted is not None and attrs.get("CKA_VALUE") != value_wanted:
                    continue
                # Wire form directly: what ok("ObjectList", ...) would encode, without the
                # decode-encode round trip of every attribute.
                found.append({"handle": row.handle, "attrs": wire})
        return Response(200, dumps({"objects": found}))


def _check_passphrase(passphrase: bytes) -> None:
    if not 1 <= len(passphrase) <= protocol.MAX_PASSPHRASE:
        raise ApiError("PASSPHRASE_LEN_RANGE", "passphrases are 1 to 256 bytes")


class _MasterMismatch(Exception):
    """The outer wrap of a card key does not open under this service's master key."""


def _login_event(card: str, outcome: str, count: int | None = None) -> None:
    """A failed or refused login, for the operator's log (never the passphrase). The audit line
    of the refused request is the pipeline's (pipeline.audit_outcome), not written here."""
    if count is None:
        log.warning("login refused: softcard %s: %s", card, outcome)
    else:
        log.warning("login failed: softcard %s: %s (%d in a row)", card, outcome, count)


def _locked(seconds: float) -> ApiError:
    return ApiError(
        "PASSPHRASE_LOCKED",
        f"too many wrong passphrases: activation is refused for {math.ceil(seconds)} more s",
    )
