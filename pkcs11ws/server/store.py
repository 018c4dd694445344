"""The storage interface of the key service, independent of the database.

Rows hold only what may rest on disk: wrapped card keys, sealed object values, sealed idempotent
responses, and attributes that are not secret. Reads are single statements; every change runs in
one write transaction (`Store.write()`), which is also where the idempotency record of that change
is written, so a change and its record commit together or not at all.

SQLiteStore (sqlite_store.py) is the embedded backend; a PostgreSQL backend implements the same
two abstract classes (Store and WriteTx) with its own SQL.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class CardRow:
    id: str
    name: str
    created: str  # ISO 8601 UTC
    salt: bytes
    kdf_n: int
    kdf_r: int
    kdf_p: int
    wrapped_key: bytes
    failures: int = 0  # consecutive wrong passphrases
    locked_until: float = 0.0  # unix time before which activation is refused
    owner: str | None = None  # the identity that created it (None: made before identities)


@dataclass(frozen=True)
class CardCounts:
    keys: int
    certificates: int
    data: int


class ObjectRow(NamedTuple):
    """A tuple, not a dataclass: searches build one per stored object, and tuples are cheap."""

    handle: str
    card: str
    cls: int
    key_type: int | None
    attrs_json: str  # the non-secret attributes, as protocol.encode_attrs JSON
    secret: bytes | None  # sealed CKA_VALUE (under the card key, AAD = handle)


@dataclass(frozen=True)
class IdempotencyRow:
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


class WriteTx(abc.ABC):
    """The operations allowed inside one write transaction."""

    @abc.abstractmethod
    def idempotency_get(self, key: str) -> IdempotencyRow | None: ...

    @abc.abstractmethod
    def idempotency_put(self, row: IdempotencyRow) -> None:
        """Insert or replace (an expired row with the same key may still be there)."""

    @abc.abstractmethod
    def idempotency_expire(self, before: float) -> None: ...

    @abc.abstractmethod
    def card_insert(self, row: CardRow) -> bool:
        """False when the name is taken."""

    @abc.abstractmethod
    def card_get(self, card: str) -> CardRow | None: ...

    @abc.abstractmethod
    def card_counts(self, card: str) -> CardCounts: ...

    @abc.abstractmethod
    def card_delete(self, card: str) -> None:
        """The card, its objects and its sessions."""

    @abc.abstractmethod
    def card_set_failures(self, card: str, failures: int, locked_until: float) -> None: ...

    @abc.abstractmethod
    def session_insert(self, session: str, card: str, expires: float, client: str) -> None:
        """client: the identity the activation is bound to (its grant can end it)."""

    @abc.abstractmethod
    def session_extend(self, session: str, card: str, expires: float) -> bool:
        """Move a live session's expiry (renewal); False when there is no such session."""

    @abc.abstractmethod
    def grant_put(self, card: str, client: str) -> None:
        """Let identity client use the card (no-op when it already may)."""

    @abc.abstractmethod
    def grant_delete(self, card: str, client: str) -> bool:
        """Withdraw a grant and end that identity's activations of the card; False if none."""

    @abc.abstractmethod
    def session_delete(self, session: str) -> bool: ...

    @abc.abstractmethod
    def session_expire(self, before: float) -> None: ...

    @abc.abstractmethod
    def object_insert(self, row: ObjectRow) -> None: ...

    @abc.abstractmethod
    def object_delete(self, card: str, handle: str) -> bool: ...

    @abc.abstractmethod
    def object_get(self, card: str, handle: str) -> ObjectRow | None: ...

    @abc.abstractmethod
    def object_set_attrs(self, card: str, handle: str, attrs_json: str) -> bool:
        """Replace an object's stored attributes (renaming); False if there is no such object."""


class Store(abc.ABC):
    """A key service database. Safe to use from several threads and several processes."""

    @abc.abstractmethod
    def init_schema(self) -> None:
        """Create the tables if missing (idempotent; safe when workers race)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def write(self) -> AbstractContextManager[WriteTx]:
        """One write transaction: commit on normal exit, roll back on an exception."""

    @abc.abstractmethod
    def card_get(self, card: str) -> CardRow | None: ...

    @abc.abstractmethod
    def card_list(self, visible_to: str | None = None) -> list[tuple[CardRow, CardCounts]]:
        """All cards, or (visible_to: an identity name) those it owns or was granted."""

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
    def object_get(self, card: str, handle: str) -> ObjectRow | None: ...

    def session_object(
        self, session: str, card: str, now: float, handle: str
    ) -> tuple[bool, ObjectRow | None]:
        """(does the session live, the card's object with that handle) as of now: the check
        every crypto request makes. Backends should answer it in one query; this default
        asks twice."""
        if not self.session_valid(session, card, now):
            return False, None
        return True, self.object_get(card, handle)

    @abc.abstractmethod
    def object_search(
        self, card: str, cls: int | None, key_type: int | None
    ) -> Iterator[ObjectRow]: ...

    @abc.abstractmethod
    def idempotency_get(self, key: str) -> IdempotencyRow | None: ...

    @abc.abstractmethod
    def activity(self, now: float) -> StoreActivity:
        """Live activations and locked softcards as of now; also the readiness probe's query."""
