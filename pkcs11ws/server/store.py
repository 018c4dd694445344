"""The storage contract of the key service, independent of the database, and the backend registry.

Rows hold only what may rest on disk: wrapped card keys, sealed object values, sealed idempotent
responses, and attributes that are not secret. Handlers see decoded attributes (ObjectRow.attrs);
how a backend stores them is its own business.

The contract
------------
* `Store.read()` gives a ReadTx: reads at READ COMMITTED. Each read is ONE statement and sees only
  committed data as of its own start; two reads in one ReadTx may see different states. Every
  decision the service takes from a read alone tolerates that (a session that ends a moment later,
  a count shown to a user); decisions that must hold go through a write transaction.
* `Store.write()` gives a WriteTx, which extends ReadTx with the changes. A write transaction is
  atomic (all its changes commit together or none do) and durable once `write()` returns. Its
  isolation is defined per operation, and is what the service relies on:
    - `card_get` and `object_get` inside a WriteTx LOCK the row they return until the transaction
      ends: another write transaction that reads or changes the same card or object waits. So a
      lockout count read, incremented and written back never loses an increment, a rename never
      loses a concurrent rename, and a card checked for emptiness cannot gain a key before it is
      deleted (inserting an object waits for the card's lock).
    - `idempotency_get` inside a WriteTx CLAIMS the key, present or not: a concurrent write
      transaction asking for the same key waits until this one ends and then sees its record. So
      a retried create never runs twice, whichever replica each attempt reaches.
  Reading in a WriteTx always sees the transaction's own changes.
* Connection loss is `StoreUnavailable` (the service answers 503 UNAVAILABLE, which clients
  retry); a backend recovers on its own when the database is back. A write that raised
  StoreUnavailable may or may not have committed: the idempotency record makes a retry safe.
* `Store.reads_block`: True when a read waits on the network (a database server): the service then
  runs reads in a worker thread, off the event loop. An embedded database answers from the page
  cache in microseconds, where the thread hop would cost more than the read (report in issue 12).
* Schema versions: `Store.migrate()` brings the schema to the newest version, one numbered step
  per transaction (`Migration`), written once (store_sql.schema_steps) in each backend's types.
  Safe when several processes or replicas start at once; refuses a database newer than the code.

Backends are found by the scheme of the `store:` URL in server.yaml (`BACKENDS`): `sqlite:///...`
(sqlite_store.py, the embedded default) and `postgresql://...` (pg_store.py, for several
replicas), both on the statements written once in store_sql.py. The backend module is imported
only when it is used.
"""

from __future__ import annotations

import abc
import importlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Final, NamedTuple

from pkcs11ws import constants as C
from pkcs11ws import protocol
from pkcs11ws._lite import dataclass
from pkcs11ws.protocol import Attrs


class StoreError(Exception):
    """The store cannot be opened or used as configured (bad URL, schema too new, ...)."""


class StoreUnavailable(Exception):
    """The database cannot be reached right now (connection lost, server restarting, failover).

    The message says what failed, never with a password."""


# The master-key migration step (keystore) re-wraps every stored card key under the master key
# without knowing any passphrase: (card id, stored wrapped_key) -> the new wrapped_key. Given to
# Store.migrate as card_rewrap=...
CardRewrap = Callable[[str, bytes], bytes]


@dataclass(frozen=True)
class CardRow:
    id: str
    name: str
    created: str  # ISO 8601 UTC
    salt: bytes
    kdf_n: int
    kdf_r: int
    kdf_p: int
    wrapped_key: bytes  # master-key wrap (migration "master key") of the passphrase wrap
    failures: int = 0  # consecutive wrong passphrases
    locked_until: float = 0.0  # unix time before which activation is refused
    owner: str | None = None  # the identity that created it (None: made before identities)


@dataclass(frozen=True)
class CardCounts:
    keys: int  # secret keys and both halves of key pairs
    certificates: int
    data: int


# The object classes each CardCounts field counts (both stores build their SQL from this).
COUNTED_CLASSES: Final = (
    (C.CKO_SECRET_KEY, C.CKO_PRIVATE_KEY, C.CKO_PUBLIC_KEY),
    (C.CKO_CERTIFICATE,),
    (C.CKO_DATA,),
)


def counted_in(classes: tuple[int, ...]) -> str:
    """SQL `IN (...)` list of one CardCounts field's classes (integers: no injection)."""
    return "(" + ", ".join(str(int(c)) for c in classes) + ")"


_DECODED_CACHE_MAX: Final = 4096  # entries can hold a public certificate: keep it small
_decoded: dict[str, tuple[Attrs, dict[str, Any]]] = {}


def _decode_stored(text: str) -> tuple[Attrs, dict[str, Any]]:
    """Stored attribute text -> (decoded attributes, their wire form), cached by the text: the
    same text always decodes the same way. Shared values: callers copy to change."""
    hit = _decoded.get(text)
    if hit is None:
        wire = json.loads(text)
        hit = (protocol.decode_attrs(wire), wire)
        if len(_decoded) >= _DECODED_CACHE_MAX:
            _decoded.clear()
        _decoded[text] = hit
    return hit


def encode_stored(attrs: Attrs) -> str:
    """The storage text of attributes (protocol.encode_attrs as compact JSON); backends only."""
    return json.dumps(protocol.encode_attrs(attrs), separators=(",", ":"))


class ObjectRow:
    """A stored object. `attrs` are its clear attributes, decoded (no CKA_VALUE, except the value
    of a public certificate); `wire` the same in protocol form. Both are shared, read-only by
    convention (copy to change). `secret` is the sealed CKA_VALUE (card key, AAD = handle).

    A slotted class that decodes lazily: the crypto hot path reads a row per request and most
    often needs none of its attributes."""

    __slots__ = ("_decoded", "card", "cls", "handle", "key_type", "secret", "stored")

    def __init__(
        self,
        handle: str,
        card: str,
        cls: int,
        key_type: int | None,
        stored: str,
        secret: bytes | None,
    ) -> None:
        self.handle = handle
        self.card = card
        self.cls = cls
        self.key_type = key_type
        self.stored = stored  # the backend's text form; handlers use attrs / wire
        self.secret = secret
        self._decoded: tuple[Attrs, dict[str, Any]] | None = None

    @classmethod
    def new(
        cls,
        handle: str,
        card: str,
        klass: int,
        key_type: int | None,
        attrs: Attrs,
        secret: bytes | None,
    ) -> ObjectRow:
        """A row to insert, from decoded attributes."""
        return cls(handle, card, klass, key_type, encode_stored(attrs), secret)

    @property
    def attrs(self) -> Attrs:
        if self._decoded is None:
            self._decoded = _decode_stored(self.stored)
        return self._decoded[0]

    @property
    def wire(self) -> dict[str, Any]:
        if self._decoded is None:
            self._decoded = _decode_stored(self.stored)
        return self._decoded[1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObjectRow):
            return NotImplemented
        mine = (self.handle, self.card, self.cls, self.key_type, self.attrs, self.secret)
        return mine == (
            other.handle,
            other.card,
            other.cls,
            other.key_type,
            other.attrs,
            other.secret,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # never the secret
        return f"ObjectRow({self.handle!r}, card={self.card!r}, cls={self.cls})"


class IdempotencyRow(NamedTuple):
    key: str
    fingerprint: bytes
    status: int
    body: bytes  # sealed under the master key's response subkey
    created: float


@dataclass(frozen=True)
class StoreActivity:
    """What the admin listener's /metrics and /readyz read from the store (one query)."""

    active_sessions: int  # activations that have not expired
    locked_cards: int  # softcards refusing activation now (passphrase lockout)


class ReadTx(abc.ABC):
    """The reads (READ COMMITTED, one statement each; see the module docstring)."""

    @abc.abstractmethod
    def card_get(self, card: str) -> CardRow | None:
        """In a WriteTx: locks the card's row until the transaction ends."""

    @abc.abstractmethod
    def card_list(self, visible_to: str | None = None) -> list[tuple[CardRow, CardCounts]]:
        """Every card with its object counts, by name; with visible_to (an identity name) only
        those it owns or was granted."""

    @abc.abstractmethod
    def grant_exists(self, card: str, client: str) -> bool: ...

    @abc.abstractmethod
    def grant_list(self, card: str) -> list[str]:
        """The identities granted use of the card, sorted."""

    @abc.abstractmethod
    def card_counts(self, card: str) -> CardCounts: ...

    @abc.abstractmethod
    def session_valid(self, session: str, card: str, now: float) -> bool: ...

    @abc.abstractmethod
    def object_get(self, card: str, handle: str) -> ObjectRow | None:
        """In a WriteTx: locks the object's row until the transaction ends."""

    @abc.abstractmethod
    def session_object(
        self, session: str, card: str, now: float, handle: str
    ) -> tuple[bool, ObjectRow | None]:
        """(does the session live, the card's object with that handle) as of now, in ONE
        statement: the check every crypto request makes."""

    @abc.abstractmethod
    def object_search(
        self, card: str, cls: int | None, key_type: int | None
    ) -> Iterator[ObjectRow]:
        """The card's objects of that class and key type (None: any), in creation order. The
        rows are fetched before the first one is yielded (no cursor stays open)."""

    @abc.abstractmethod
    def idempotency_get(self, key: str) -> IdempotencyRow | None:
        """In a WriteTx: claims the key until the transaction ends (module docstring)."""

    @abc.abstractmethod
    def activity(self, now: float) -> StoreActivity:
        """Live activations and locked softcards as of now; also the readiness probe's query."""


class WriteTx(ReadTx):
    """One write transaction: the reads, plus the changes."""

    @abc.abstractmethod
    def idempotency_put(self, row: IdempotencyRow) -> None:
        """Insert or replace (an expired row with the same key may still be there)."""

    @abc.abstractmethod
    def idempotency_expire(self, before: float) -> None: ...

    @abc.abstractmethod
    def card_insert(self, row: CardRow) -> bool:
        """False when the name is taken (the transaction stays usable)."""

    @abc.abstractmethod
    def card_delete(self, card: str) -> None:
        """The card, its objects, its sessions and its grants."""

    @abc.abstractmethod
    def card_set_failures(self, card: str, failures: int, locked_until: float) -> None: ...

    @abc.abstractmethod
    def card_reserve_attempt(
        self, card: str, now: float, threshold: int, lease_until: float
    ) -> int | None:
        """Reserve one passphrase evaluation before the slow hash, in ONE statement (so two
        reservations on the same card, from any process or replica, never both see the same
        count). Commit it (end the WriteTx) before the hash: the reservation is what others see.

        Refused (None) when the card is locked (locked_until > now), when the attempts in
        flight already fill the quota (threshold - failures while below the threshold, one at
        a time at or above it), or when there is no such card. Otherwise pending + 1 (pending
        whose pending_until has passed counts as 0: a process died mid-evaluation),
        pending_until = lease_until, and the result is failures + pending."""

    @abc.abstractmethod
    def card_settle_attempt(
        self, card: str, success: bool, now: float, threshold: int, max_seconds: int
    ) -> None:
        """After the evaluation, in ONE statement: pending - 1 (not below 0); success sets
        failures and locked_until to 0; a failure adds 1 to failures and, when they reach
        threshold, locks the card until now + min(2 ** (failures - threshold), max_seconds)."""

    @abc.abstractmethod
    def session_insert(self, session: str, card: str, expires: float, client: str) -> None:
        """client: the identity the activation is bound to (its grant can end it)."""

    @abc.abstractmethod
    def session_extend(self, session: str, card: str, expires: float) -> bool:
        """Move a live session's expiry (renewal); False when there is no such session."""

    @abc.abstractmethod
    def grant_put(self, card: str, client: str) -> None:
        """Let identity client use the (existing) card; no-op when it already may. Locks the
        card's row like card_get."""

    @abc.abstractmethod
    def grant_delete(self, card: str, client: str) -> bool:
        """Withdraw a grant and end that identity's activations of the card; False if none.
        Locks the card's row like card_get, so an activation that checks the grant under that
        lock either commits first (and its session is ended here) or sees no grant."""

    @abc.abstractmethod
    def session_delete(self, session: str) -> bool: ...

    @abc.abstractmethod
    def session_expire(self, before: float) -> None: ...

    @abc.abstractmethod
    def object_insert(self, row: ObjectRow) -> None: ...

    @abc.abstractmethod
    def object_delete(self, card: str, handle: str) -> bool: ...

    @abc.abstractmethod
    def object_set_attrs(self, card: str, handle: str, attrs: Attrs) -> bool:
        """Replace an object's stored attributes (renaming); False if there is no such object."""


@dataclass(frozen=True)
class Migration:
    """One numbered schema step: its `sql` statements, then `run` (a step that needs code, e.g.
    rewriting rows: called with the backend's own connection and the keyword arguments given to
    Store.migrate), in one transaction with the version bump.

    Version 1 creates the schema; steps after it change it. The steps are written once
    (store_sql.schema_steps) and rendered in each backend's types (sqlite_store.MIGRATIONS,
    pg_store.MIGRATIONS): the same numbers and meaning."""

    version: int
    what: str
    sql: tuple[str, ...] = ()
    run: Callable[..., None] | None = None


def check_migrations(steps: tuple[Migration, ...]) -> int:
    """The newest version of a backend's list, after checking it is 1, 2, 3, ... in order."""
    for i, step in enumerate(steps, 1):
        if step.version != i:
            raise AssertionError(f"migration {step.version} out of order (expected {i})")
    return len(steps)


class Store(abc.ABC):
    """A key service database. Safe to use from several threads and several processes."""

    scheme: ClassVar[str]
    reads_block: ClassVar[bool] = False  # see the module docstring

    @classmethod
    @abc.abstractmethod
    def open(cls, cfg: StoreConfig) -> Store:
        """The backend for cfg.url (connections are made lazily or in the background)."""

    @abc.abstractmethod
    def migrate(self, **step_args: Any) -> tuple[int, int]:
        """Bring the schema to the newest version (creating it on an empty database).
        Returns (version before, version after). StoreError if the database is newer.
        step_args: what steps with code need (passed to Migration.run)."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version of the database (0: empty)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def read(self) -> AbstractContextManager[ReadTx]:
        """Reads at READ COMMITTED (module docstring)."""

    @abc.abstractmethod
    def write(self) -> AbstractContextManager[WriteTx]:
        """One write transaction: commit on normal exit, roll back on an exception."""

    def change_mark(self) -> object | None:
        """A value that differs from every earlier one once anything in the store may have
        changed (a commit by any connection of any process, this one's included), or None when
        the backend cannot tell cheaply. The service caches what the crypto path read from the
        store only while the mark stays the same (handlers.Service._key); on None it asks the
        store on every request. Read it BEFORE the reads it vouches for."""
        return None

    # True once change_mark has been read and costs no system call and no statement (a few
    # hundred instructions): the service then reads it for every request (else once per turn
    # of its event loop, which the requests handled in that turn share).
    cheap_mark: bool = False

    def describe(self) -> str:
        """Where the data is, for logs (no password)."""
        return self.scheme


@dataclass(frozen=True)
class StoreConfig:
    """What a backend is opened from (Settings carries one)."""

    url: str  # sqlite:////absolute/path or a PostgreSQL URL
    synchronous: str = "FULL"  # SQLite
    pool_size: int = 8  # PostgreSQL: connections per process
    pool_timeout: float = 5.0  # PostgreSQL: seconds to wait for a connection, then 503


# scheme -> "module:Class"; the module is imported only when that scheme is opened.
BACKENDS: Final[dict[str, str]] = {
    "sqlite": "pkcs11ws.server.sqlite_store:SQLiteStore",
    "postgresql": "pkcs11ws.server.pg_store:PostgresStore",
    "postgres": "pkcs11ws.server.pg_store:PostgresStore",
}


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise StoreError(f"store: {redact(url)!r} is not a store URL ({known})")
    return scheme


def redact(url: str) -> str:
    """A store URL without its password (user:secret@host -> user:***@host, and a password=
    parameter)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", rest)
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return f"{scheme}://{rest}"
    return f"{scheme}://{auth.split(':', 1)[0]}:***@{host}"


def backend_class(url: str) -> type[Store]:
    module, _, name = BACKENDS[scheme_of(url)].partition(":")
    cls: type[Store] = getattr(importlib.import_module(module), name)
    return cls


def open_store(cfg: StoreConfig, migrate: bool = True, **step_args: Any) -> Store:
    """Open the configured backend; with migrate, bring its schema up to date first (step_args:
    for Store.migrate)."""
    store = backend_class(cfg.url).open(cfg)
    if migrate:
        try:
            store.migrate(**step_args)
        except BaseException:
            store.close()
            raise
    return store
