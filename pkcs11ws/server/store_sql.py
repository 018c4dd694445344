"""The store's statements and their ReadTx/WriteTx implementation, once for both SQL backends.

Each statement is written here once, in SQLite's placeholder style (`?` and `:name`) with a few
`{tokens}` for what the two dialects spell differently (`{lock}`: FOR UPDATE in a PostgreSQL
write transaction, nothing in SQLite, whose write transactions hold the whole database;
`{order}`: the creation order column; `{greatest}`/`{least}`: the two-argument max/min).
`Statements.render()` makes each backend's set once, at import, converting the placeholders to
psycopg's `%s` / `%(name)s` for PostgreSQL, so no call converts anything.

The schema steps are here too (`schema_steps`), with the column types as parameters. What really
differs stays in the backend modules (sqlite_store.py, pg_store.py): connections, transactions,
how a card's rows go (SQLite deletes them itself, PostgreSQL cascades under the card's lock) and
PostgreSQL's explicit locks (the card row before a grant changes, an advisory lock claiming an
idempotency key).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Protocol

from pkcs11ws.protocol import Attrs
from pkcs11ws.server.store import (
    COUNTED_CLASSES,
    CardCounts,
    CardRewrap,
    CardRow,
    IdempotencyRow,
    Migration,
    ObjectRow,
    ReadTx,
    StoreActivity,
    StoreError,
    WriteTx,
    counted_in,
    encode_stored,
)

CARD_COLS: Final = (
    "id, name, created, salt, kdf_n, kdf_r, kdf_p, wrapped_key, failures, locked_until, owner"
)
NCOLS: Final = CARD_COLS.count(",") + 1
OBJ_COLS: Final = "handle, card, cls, key_type, attrs, secret"
# CardCounts' fields (keys: secret keys and both halves of key pairs), per store.COUNTED_CLASSES.
_COUNTS: Final = ",".join(
    f"(SELECT COUNT(*) FROM objects o WHERE o.card = s.id AND o.cls IN {counted_in(c)})"
    for c in COUNTED_CLASSES
)
_COUNT_BY_CLASS: Final = ", ".join(
    f"COUNT(*) FILTER (WHERE cls IN {counted_in(c)})" for c in COUNTED_CLASSES
)
_NAMED: Final = re.compile(r":([a-z_]+)")


class Statements:
    """Every shared statement, in SQLite's style; `render()` gives one backend's set."""

    card_get = f"SELECT {CARD_COLS} FROM softcards WHERE id = ?{{lock}}"
    card_list = f"SELECT {CARD_COLS}, {_COUNTS} FROM softcards s"
    card_list_visible = " WHERE s.owner = ? OR s.id IN (SELECT card FROM grants WHERE client = ?)"
    card_list_order = " ORDER BY s.name"
    grant_exists = "SELECT 1 FROM grants WHERE card = ? AND client = ?"
    grant_list = "SELECT client FROM grants WHERE card = ? ORDER BY client"
    card_counts = f"SELECT {_COUNT_BY_CLASS} FROM objects WHERE card = ?"
    session_valid = "SELECT 1 FROM sessions WHERE id = ? AND card = ? AND expires > ?"
    object_get = f"SELECT {OBJ_COLS} FROM objects WHERE handle = ? AND card = ?{{lock}}"
    # One indexed statement (two primary-key lookups): no row means no live session, a row of
    # NULLs means the session lives but the object does not.
    session_object = (
        "SELECT o.handle, o.card, o.cls, o.key_type, o.attrs, o.secret FROM sessions s"
        " LEFT JOIN objects o ON o.handle = ? AND o.card = s.card"
        " WHERE s.id = ? AND s.card = ? AND s.expires > ?"
    )
    object_search = f"SELECT {OBJ_COLS} FROM objects WHERE card = ?"
    object_search_cls = " AND cls = ?"
    object_search_key_type = " AND key_type = ?"
    object_search_order = " ORDER BY {order}"
    idempotency_get = (
        "SELECT key, fingerprint, status, body, created FROM idempotency WHERE key = ?"
    )
    activity = (
        "SELECT (SELECT COUNT(*) FROM sessions WHERE expires > ?),"
        " (SELECT COUNT(*) FROM softcards WHERE locked_until > ?)"
    )
    idempotency_put = (
        "INSERT INTO idempotency (key, fingerprint, status, body, created)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
        " fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status,"
        " body = EXCLUDED.body, created = EXCLUDED.created"
    )
    idempotency_expire = "DELETE FROM idempotency WHERE created < ?"
    # ON CONFLICT DO NOTHING, not an exception: on PostgreSQL an error aborts the transaction.
    card_insert = (
        f"INSERT INTO softcards ({CARD_COLS}) VALUES ({', '.join('?' * NCOLS)})"
        " ON CONFLICT DO NOTHING"
    )
    # Its objects, sessions and grants cascade: on PostgreSQL after the card's row lock, the
    # order a copy takes too (card, then object). SQLite's store deletes them first itself.
    card_delete = "DELETE FROM softcards WHERE id = ?"
    card_set_failures = "UPDATE softcards SET failures = ?, locked_until = ? WHERE id = ?"
    # One UPDATE: a concurrent one on the same card waits for the row (or database) lock, then
    # sees what this one wrote (PostgreSQL re-evaluates its WHERE at READ COMMITTED).
    card_reserve_attempt = (
        "UPDATE softcards SET"
        " pending = (CASE WHEN pending_until > :now THEN pending ELSE 0 END) + 1,"
        " pending_until = :lease"
        " WHERE id = :card AND locked_until <= :now"
        " AND failures + (CASE WHEN pending_until > :now THEN pending ELSE 0 END)"
        " < {greatest}(:threshold, failures + 1)"
        " RETURNING failures + pending"
    )
    card_settle_success = (
        "UPDATE softcards SET failures = 0, locked_until = 0,"
        " pending = {greatest}(pending - 1, 0) WHERE id = :card"
    )
    card_settle_failure = (
        "UPDATE softcards SET failures = failures + 1, pending = {greatest}(pending - 1, 0),"
        " locked_until = CASE WHEN failures + 1 >= :threshold"
        " THEN :now + {least}(1 << {least}(failures + 1 - :threshold, 30), :max)"
        " ELSE locked_until END WHERE id = :card"
    )
    session_insert = "INSERT INTO sessions (id, card, expires, client) VALUES (?, ?, ?, ?)"
    session_extend = "UPDATE sessions SET expires = ? WHERE id = ? AND card = ?"
    grant_put = "INSERT INTO grants (card, client) VALUES (?, ?) ON CONFLICT DO NOTHING"
    grant_delete = "DELETE FROM grants WHERE card = ? AND client = ?"
    grant_delete_sessions = "DELETE FROM sessions WHERE card = ? AND client = ?"
    session_delete = "DELETE FROM sessions WHERE id = ?"
    session_expire = "DELETE FROM sessions WHERE expires < ?"
    object_insert = f"INSERT INTO objects ({OBJ_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
    object_delete = "DELETE FROM objects WHERE card = ? AND handle = ?"
    object_set_attrs = "UPDATE objects SET attrs = ? WHERE card = ? AND handle = ?"
    meta_create = "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)"
    meta_version = "SELECT v FROM meta WHERE k = 'schema'"
    meta_set = (
        "INSERT INTO meta (k, v) VALUES ('schema', ?) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
    )
    card_keys = "SELECT id, wrapped_key FROM softcards{lock}"
    card_key_set = "UPDATE softcards SET wrapped_key = ? WHERE id = ?"

    @classmethod
    def render(
        cls, *, pyformat: bool, lock: str, order: str, greatest: str, least: str
    ) -> Statements:
        """This set for one backend (and, on PostgreSQL, for reads or for write transactions)."""
        tokens = {"lock": lock, "order": order, "greatest": greatest, "least": least}
        out = cls()
        for name, text in vars(Statements).items():
            if name.startswith("_") or not isinstance(text, str):
                continue
            text = text.format(**tokens)
            if "%" in text:  # psycopg would read it as a placeholder
                raise ValueError(f"Statements.{name}: write % as a parameter")
            if pyformat:
                text = _NAMED.sub(r"%(\1)s", text.replace("?", "%s"))
            setattr(out, name, text)  # the instance's text hides the template
        return out


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the statements need of a DB-API connection (sqlite3's and psycopg's both have it)."""

    def execute(self, sql: str, args: Any = ..., /) -> _Cursor: ...


def _card(row: tuple[Any, ...]) -> CardRow:
    return CardRow(*row)


class SqlReads(ReadTx):
    """The reads, on one connection (in or out of a transaction)."""

    __slots__ = ("con",)
    sql: ClassVar[Statements]  # the backend's rendered set

    def __init__(self, con: Connection) -> None:
        self.con = con

    def card_get(self, card: str) -> CardRow | None:
        row = self.con.execute(self.sql.card_get, (card,)).fetchone()
        return _card(row) if row else None

    def card_list(self, visible_to: str | None = None) -> list[tuple[CardRow, CardCounts]]:
        q = self.sql
        sql = q.card_list
        args: tuple[str, ...] = ()
        if visible_to is not None:
            sql += q.card_list_visible
            args = (visible_to, visible_to)
        rows = self.con.execute(sql + q.card_list_order, args).fetchall()
        n = NCOLS
        return [(_card(r[:n]), CardCounts(r[n], r[n + 1], r[n + 2])) for r in rows]

    def grant_exists(self, card: str, client: str) -> bool:
        return self.con.execute(self.sql.grant_exists, (card, client)).fetchone() is not None

    def grant_list(self, card: str) -> list[str]:
        rows = self.con.execute(self.sql.grant_list, (card,)).fetchall()
        return [str(r[0]) for r in rows]

    def card_counts(self, card: str) -> CardCounts:
        row = self.con.execute(self.sql.card_counts, (card,)).fetchone()
        return CardCounts(int(row[0]), int(row[1]), int(row[2]))

    def session_valid(self, session: str, card: str, now: float) -> bool:
        row = self.con.execute(self.sql.session_valid, (session, card, now)).fetchone()
        return row is not None

    def object_get(self, card: str, handle: str) -> ObjectRow | None:
        row = self.con.execute(self.sql.object_get, (handle, card)).fetchone()
        return ObjectRow(*row) if row else None

    def session_object(
        self, session: str, card: str, now: float, handle: str
    ) -> tuple[bool, ObjectRow | None]:
        row = self.con.execute(self.sql.session_object, (handle, session, card, now)).fetchone()
        if row is None:
            return False, None
        return True, (ObjectRow(*row) if row[0] is not None else None)

    def object_search(
        self, card: str, cls: int | None, key_type: int | None
    ) -> Iterator[ObjectRow]:
        q = self.sql
        sql = q.object_search
        args: list[object] = [card]
        if cls is not None:
            sql += q.object_search_cls
            args.append(cls)
        if key_type is not None:
            sql += q.object_search_key_type
            args.append(key_type)
        # fetchall: no cursor stays open across an await on a thread's connection.
        rows = self.con.execute(sql + q.object_search_order, args).fetchall()
        return (ObjectRow(*r) for r in rows)

    def idempotency_get(self, key: str) -> IdempotencyRow | None:
        row = self.con.execute(self.sql.idempotency_get, (key,)).fetchone()
        return IdempotencyRow(*row) if row else None

    def activity(self, now: float) -> StoreActivity:
        row = self.con.execute(self.sql.activity, (now, now)).fetchone()
        return StoreActivity(int(row[0]), int(row[1]))


class SqlTx(SqlReads, WriteTx):
    """The changes, inside the backend's write transaction."""

    __slots__ = ()

    def _lock_card(self, card: str) -> None:
        """Before a grant changes (PostgreSQL takes the card's row lock; SQLite holds all)."""

    def idempotency_put(self, row: IdempotencyRow) -> None:
        args = (row.key, row.fingerprint, row.status, row.body, row.created)
        self.con.execute(self.sql.idempotency_put, args)

    def idempotency_expire(self, before: float) -> None:
        self.con.execute(self.sql.idempotency_expire, (before,))

    def card_insert(self, row: CardRow) -> bool:
        args = (
            row.id,
            row.name,
            row.created,
            row.salt,
            row.kdf_n,
            row.kdf_r,
            row.kdf_p,
            row.wrapped_key,
            row.failures,
            row.locked_until,
            row.owner,
        )
        return self.con.execute(self.sql.card_insert, args).rowcount == 1

    def card_delete(self, card: str) -> None:
        self.con.execute(self.sql.card_delete, (card,))

    def card_set_failures(self, card: str, failures: int, locked_until: float) -> None:
        self.con.execute(self.sql.card_set_failures, (failures, locked_until, card))

    def card_reserve_attempt(
        self, card: str, now: float, threshold: int, lease_until: float
    ) -> int | None:
        args = {"now": now, "lease": lease_until, "card": card, "threshold": threshold}
        # All rows: SQLite finishes a RETURNING statement only when its rows are read.
        rows = self.con.execute(self.sql.card_reserve_attempt, args).fetchall()
        return int(rows[0][0]) if rows else None

    def card_settle_attempt(
        self, card: str, success: bool, now: float, threshold: int, max_seconds: int
    ) -> None:
        sql = self.sql.card_settle_success if success else self.sql.card_settle_failure
        args = {"card": card, "now": now, "threshold": threshold, "max": max_seconds}
        self.con.execute(sql, args)

    def session_insert(self, session: str, card: str, expires: float, client: str) -> None:
        self.con.execute(self.sql.session_insert, (session, card, expires, client))

    def session_extend(self, session: str, card: str, expires: float) -> bool:
        return self.con.execute(self.sql.session_extend, (expires, session, card)).rowcount > 0

    def grant_put(self, card: str, client: str) -> None:
        self._lock_card(card)
        self.con.execute(self.sql.grant_put, (card, client))

    def grant_delete(self, card: str, client: str) -> bool:
        self._lock_card(card)
        cur = self.con.execute(self.sql.grant_delete, (card, client))
        self.con.execute(self.sql.grant_delete_sessions, (card, client))
        return cur.rowcount > 0

    def session_delete(self, session: str) -> bool:
        return self.con.execute(self.sql.session_delete, (session,)).rowcount > 0

    def session_expire(self, before: float) -> None:
        self.con.execute(self.sql.session_expire, (before,))

    def object_insert(self, row: ObjectRow) -> None:
        args = (row.handle, row.card, row.cls, row.key_type, row.stored, row.secret)
        self.con.execute(self.sql.object_insert, args)

    def object_delete(self, card: str, handle: str) -> bool:
        return self.con.execute(self.sql.object_delete, (card, handle)).rowcount > 0

    def object_set_attrs(self, card: str, handle: str, attrs: Attrs) -> bool:
        args = (encode_stored(attrs), card, handle)
        return self.con.execute(self.sql.object_set_attrs, args).rowcount > 0


def rewrap_card_keys(sql: Statements) -> Callable[..., None]:
    """Schema step 3's data change, on the backend's write set: every card key also wrapped under
    the master key (no passphrase needed: the passphrase-wrapped blob is wrapped as it is).
    Migrating a store that holds cards needs card_rewrap (Store.migrate(card_rewrap=...)); the
    service passes it."""

    def step(con: Connection, card_rewrap: CardRewrap | None = None, **_: Any) -> None:
        rows = con.execute(sql.card_keys).fetchall()
        if rows and card_rewrap is None:
            raise StoreError("the master-key migration step needs the master key (card_rewrap)")
        for card_id, wrapped in rows:
            assert card_rewrap is not None
            con.execute(sql.card_key_set, (card_rewrap(card_id, bytes(wrapped)), card_id))

    return step


def schema_steps(
    sql: Statements, *, blob: str, real: str, bigint: str, if_not_exists: str, seq: str
) -> tuple[Migration, ...]:
    """The schema, one numbered step per change (store.Migration), in one backend's types:
    blob BLOB/BYTEA, real REAL/DOUBLE PRECISION, bigint INTEGER/BIGINT, if_not_exists for
    SQLite's CREATEs, seq PostgreSQL's creation-order column (SQLite has its rowid). sql: the
    backend's write statements, for step 3's rewrap. Append new steps at the end; never edit a
    released one (what it creates must stay what it created)."""
    ine = if_not_exists
    return (
        Migration(1, "softcards, objects, sessions, idempotency records", (
            f"""CREATE TABLE {ine}softcards (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created TEXT NOT NULL,
            salt {blob} NOT NULL,
            kdf_n INTEGER NOT NULL, kdf_r INTEGER NOT NULL, kdf_p INTEGER NOT NULL,
            wrapped_key {blob} NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            locked_until {real} NOT NULL DEFAULT 0)""",
            f"""CREATE TABLE {ine}objects ({seq}
            handle TEXT PRIMARY KEY,
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            cls {bigint} NOT NULL,
            key_type {bigint},
            attrs TEXT NOT NULL,
            secret {blob})""",
            f"CREATE INDEX {ine}objects_card ON objects(card, cls, key_type)",
            f"""CREATE TABLE {ine}sessions (
            id TEXT PRIMARY KEY,
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            expires {real} NOT NULL)""",
            f"CREATE INDEX {ine}sessions_expires ON sessions(expires)",
            f"CREATE INDEX {ine}sessions_card ON sessions(card)",
            f"""CREATE TABLE {ine}idempotency (
            key TEXT PRIMARY KEY,
            fingerprint {blob} NOT NULL,
            status INTEGER NOT NULL,
            body {blob} NOT NULL,
            created {real} NOT NULL)""",
            f"CREATE INDEX {ine}idempotency_created ON idempotency(created)",
        )),
        # authz: softcards made before this step have no owner (admins only).
        Migration(2, "softcard owners, grants, the identity each activation is bound to", (
            "ALTER TABLE softcards ADD COLUMN owner TEXT",
            f"CREATE INDEX {ine}softcards_owner ON softcards(owner)",
            f"""CREATE TABLE {ine}grants (
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            client TEXT NOT NULL,
            PRIMARY KEY (card, client))""",
            f"CREATE INDEX {ine}grants_client ON grants(client)",
            "ALTER TABLE sessions ADD COLUMN client TEXT NOT NULL DEFAULT ''",
        )),
        # Card keys under the master key, and the lockout's reservation columns (passphrase
        # evaluations in flight, and until when that count holds: a dead process's lease runs
        # out).
        Migration(3, "master-key wrap of card keys; lockout reservations", (
            "ALTER TABLE softcards ADD COLUMN pending INTEGER NOT NULL DEFAULT 0",
            f"ALTER TABLE softcards ADD COLUMN pending_until {real} NOT NULL DEFAULT 0",
        ), rewrap_card_keys(sql)),
    )  # fmt: skip


def migrate_step(
    con: Connection,
    sql: Statements,
    steps: tuple[Migration, ...],
    newest: int,
    where: str,
    **step_args: Any,
) -> Migration | None:
    """One turn of Store.migrate, inside the backend's transaction and lock: the version as
    committed now (another process may have migrated meanwhile), a database newer than `newest`
    (the backend's SCHEMA_VERSION) refused, else the next step run and recorded. None when the
    schema is at `newest`."""
    con.execute(sql.meta_create)
    row = con.execute(sql.meta_version).fetchone()
    current = int(row[0]) if row else 0
    if current > newest:
        raise StoreError(
            f"{where}: schema version {current} is newer than this pkcs11ws knows ({newest}):"
            " upgrade pkcs11ws"
        )
    if current == newest:
        return None
    step = steps[current]
    for stmt in step.sql:
        con.execute(stmt)
    if step.run is not None:
        step.run(con, **step_args)
    con.execute(sql.meta_set, (str(step.version),))
    return step
