"""PostgreSQL backend of the key service store (`store: postgresql://USER@HOST:PORT/DB`), for
several stateless service replicas on one database.

psycopg 3 on Debian's libpq, one connection pool per process (psycopg_pool). Connections run in
autocommit: a read is one statement at READ COMMITTED; `write()` is an explicit READ COMMITTED
transaction whose isolation comes from explicit locks, as the store contract asks (store.py):
`card_get` / `object_get` inside a write transaction are `SELECT ... FOR UPDATE`, and
`idempotency_get` first takes a transaction-scoped advisory lock on the key, so two replicas
handling the same retried request run one after the other. No SERIALIZABLE, so no serialization
retries. Locks are taken in one order (idempotency key, card, object) except that deleting a card
removes its objects while copying one of them inserts under the card: should those two meet,
PostgreSQL breaks the deadlock by failing one, which is answered 503 and retried by the client
with its Idempotency-Key like any lost connection.

Connection loss: any connection-level failure (server gone, restart, admin shutdown, a primary
that became read-only after a switch, no free connection within database.pool_timeout) is
StoreUnavailable, which the service answers with 503; the broken connection is dropped and the
idle ones are checked, and the pool reconnects in the background when the database is back. A
libpq multi-host URL with target_session_attrs=read-write follows a primary switch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import psycopg
import psycopg_pool

from pkcs11ws import constants as C
from pkcs11ws.protocol import Attrs
from pkcs11ws.server.store import (
    CardCounts,
    CardRewrap,
    CardRow,
    IdempotencyRow,
    Migration,
    ObjectRow,
    ReadTx,
    Store,
    StoreActivity,
    StoreConfig,
    StoreError,
    StoreUnavailable,
    WriteTx,
    check_migrations,
    encode_stored,
    redact,
)

log = logging.getLogger("pkcs11ws.server")


def _master_key_step(
    con: psycopg.Connection[Any], card_rewrap: CardRewrap | None = None, **_: Any
) -> None:
    """Every card key also wrapped under the master key (sqlite_store._master_key_step)."""
    rows = con.execute("SELECT id, wrapped_key FROM softcards FOR UPDATE").fetchall()
    if rows and card_rewrap is None:
        raise StoreError("the master-key migration step needs the master key (card_rewrap)")
    for card_id, wrapped in rows:
        assert card_rewrap is not None
        new = card_rewrap(card_id, bytes(wrapped))
        con.execute("UPDATE softcards SET wrapped_key = %s WHERE id = %s", (new, card_id))


# The schema, one numbered step per change: the same numbers and meaning as
# sqlite_store.MIGRATIONS, in PostgreSQL's SQL. Append new steps at the end.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "softcards, objects, sessions, idempotency records", (
        """CREATE TABLE softcards (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created TEXT NOT NULL,
            salt BYTEA NOT NULL,
            kdf_n INTEGER NOT NULL, kdf_r INTEGER NOT NULL, kdf_p INTEGER NOT NULL,
            wrapped_key BYTEA NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            locked_until DOUBLE PRECISION NOT NULL DEFAULT 0)""",
        # seq: creation order (SQLite's rowid), which searches return.
        """CREATE TABLE objects (
            seq BIGSERIAL NOT NULL,
            handle TEXT PRIMARY KEY,
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            cls BIGINT NOT NULL,
            key_type BIGINT,
            attrs TEXT NOT NULL,
            secret BYTEA)""",
        "CREATE INDEX objects_card ON objects(card, cls, key_type)",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            expires DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX sessions_expires ON sessions(expires)",
        "CREATE INDEX sessions_card ON sessions(card)",
        """CREATE TABLE idempotency (
            key TEXT PRIMARY KEY,
            fingerprint BYTEA NOT NULL,
            status INTEGER NOT NULL,
            body BYTEA NOT NULL,
            created DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX idempotency_created ON idempotency(created)",
    )),
    # authz: softcards made before this step have no owner (admins only).
    Migration(2, "softcard owners, grants, the identity each activation is bound to", (
        "ALTER TABLE softcards ADD COLUMN owner TEXT",
        "CREATE INDEX softcards_owner ON softcards(owner)",
        """CREATE TABLE grants (
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            client TEXT NOT NULL,
            PRIMARY KEY (card, client))""",
        "CREATE INDEX grants_client ON grants(client)",
        "ALTER TABLE sessions ADD COLUMN client TEXT NOT NULL DEFAULT ''",
    )),
    Migration(3, "master-key wrap of card keys; lockout reservations", (
        "ALTER TABLE softcards ADD COLUMN pending INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE softcards ADD COLUMN pending_until DOUBLE PRECISION NOT NULL DEFAULT 0",
    ), _master_key_step),
)  # fmt: skip
SCHEMA_VERSION: Final = check_migrations(MIGRATIONS)

# Advisory lock keys (first argument of the two-int form): one namespace for this application.
_LOCK_NS: Final = 0x504B3131  # "PK11"
_MIGRATE_LOCK: Final = 1
_IDEM_LOCK: Final = 2

_CARD_COLS: Final = (
    "id, name, created, salt, kdf_n, kdf_r, kdf_p, wrapped_key, failures, locked_until, owner"
)
_NCOLS: Final = _CARD_COLS.count(",") + 1
_OBJ_COLS: Final = "handle, card, cls, key_type, attrs, secret"
_COUNTS_SQL: Final = ",".join(
    f"(SELECT COUNT(*) FROM objects o WHERE o.card = s.id AND o.cls = {c})"
    for c in (C.CKO_SECRET_KEY, C.CKO_CERTIFICATE, C.CKO_DATA)
)


def _card(row: tuple[Any, ...]) -> CardRow:
    return CardRow(*row)


def _obj(row: tuple[Any, ...]) -> ObjectRow:
    return ObjectRow(row[0], row[1], row[2], row[3], row[4], row[5])


class _Reads(ReadTx):
    """The reads on one connection; in a write transaction the row reads lock (FOR UPDATE)."""

    _lock: str = ""

    def __init__(self, con: psycopg.Connection[Any]) -> None:
        self.con = con

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.con.execute(sql, args).fetchone()
        return row

    def card_get(self, card: str) -> CardRow | None:
        row = self._one(f"SELECT {_CARD_COLS} FROM softcards WHERE id = %s{self._lock}", (card,))
        return _card(row) if row else None

    def card_list(self, visible_to: str | None = None) -> list[tuple[CardRow, CardCounts]]:
        sql = f"SELECT {_CARD_COLS}, {_COUNTS_SQL} FROM softcards s"
        args: tuple[str, ...] = ()
        if visible_to is not None:
            sql += " WHERE s.owner = %s OR s.id IN (SELECT card FROM grants WHERE client = %s)"
            args = (visible_to, visible_to)
        rows = self.con.execute(sql + " ORDER BY s.name", args).fetchall()
        n = _NCOLS
        return [(_card(r[:n]), CardCounts(r[n], r[n + 1], r[n + 2])) for r in rows]

    def grant_exists(self, card: str, client: str) -> bool:
        row = self._one("SELECT 1 FROM grants WHERE card = %s AND client = %s", (card, client))
        return row is not None

    def grant_list(self, card: str) -> list[str]:
        rows = self.con.execute(
            "SELECT client FROM grants WHERE card = %s ORDER BY client", (card,)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def card_counts(self, card: str) -> CardCounts:
        row = self._one(
            "SELECT COUNT(*) FILTER (WHERE cls = %s), COUNT(*) FILTER (WHERE cls = %s),"
            " COUNT(*) FILTER (WHERE cls = %s) FROM objects WHERE card = %s",
            (C.CKO_SECRET_KEY, C.CKO_CERTIFICATE, C.CKO_DATA, card),
        )
        assert row is not None
        return CardCounts(int(row[0]), int(row[1]), int(row[2]))

    def session_valid(self, session: str, card: str, now: float) -> bool:
        row = self._one(
            "SELECT 1 FROM sessions WHERE id = %s AND card = %s AND expires > %s",
            (session, card, now),
        )
        return row is not None

    def object_get(self, card: str, handle: str) -> ObjectRow | None:
        row = self._one(
            f"SELECT {_OBJ_COLS} FROM objects WHERE handle = %s AND card = %s{self._lock}",
            (handle, card),
        )
        return _obj(row) if row else None

    def session_object(
        self, session: str, card: str, now: float, handle: str
    ) -> tuple[bool, ObjectRow | None]:
        row = self._one(
            "SELECT o.handle, o.card, o.cls, o.key_type, o.attrs, o.secret FROM sessions s"
            " LEFT JOIN objects o ON o.handle = %s AND o.card = s.card"
            " WHERE s.id = %s AND s.card = %s AND s.expires > %s",
            (handle, session, card, now),
        )
        if row is None:
            return False, None
        return True, (_obj(row) if row[0] is not None else None)

    def object_search(
        self, card: str, cls: int | None, key_type: int | None
    ) -> Iterator[ObjectRow]:
        sql = f"SELECT {_OBJ_COLS} FROM objects WHERE card = %s"
        args: list[object] = [card]
        if cls is not None:
            sql += " AND cls = %s"
            args.append(cls)
        if key_type is not None:
            sql += " AND key_type = %s"
            args.append(key_type)
        rows = self.con.execute(sql + " ORDER BY seq", args).fetchall()
        return (_obj(r) for r in rows)

    def idempotency_get(self, key: str) -> IdempotencyRow | None:
        row = self._one(
            "SELECT key, fingerprint, status, body, created FROM idempotency WHERE key = %s",
            (key,),
        )
        return IdempotencyRow(*row) if row else None

    def activity(self, now: float) -> StoreActivity:
        row = self._one(
            "SELECT (SELECT COUNT(*) FROM sessions WHERE expires > %s),"
            " (SELECT COUNT(*) FROM softcards WHERE locked_until > %s)",
            (now, now),
        )
        assert row is not None
        return StoreActivity(int(row[0]), int(row[1]))


class _Tx(_Reads, WriteTx):
    _lock = " FOR UPDATE"

    def idempotency_get(self, key: str) -> IdempotencyRow | None:
        # The claim (store contract): a concurrent transaction with the same key waits here
        # until this one ends. hashtextextended: a 64-bit hash; a collision only serialises
        # two unrelated requests.
        self.con.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (key, _IDEM_LOCK)
        )
        return super().idempotency_get(key)

    def idempotency_put(self, row: IdempotencyRow) -> None:
        self.con.execute(
            "INSERT INTO idempotency (key, fingerprint, status, body, created)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET"
            " fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status,"
            " body = EXCLUDED.body, created = EXCLUDED.created",
            (row.key, row.fingerprint, row.status, row.body, row.created),
        )

    def idempotency_expire(self, before: float) -> None:
        self.con.execute("DELETE FROM idempotency WHERE created < %s", (before,))

    def card_insert(self, row: CardRow) -> bool:
        # ON CONFLICT DO NOTHING, not an exception: an error would abort the transaction.
        cur = self.con.execute(
            f"INSERT INTO softcards ({_CARD_COLS}) VALUES ({', '.join(['%s'] * _NCOLS)})"
            " ON CONFLICT DO NOTHING",
            (row.id, row.name, row.created, row.salt, row.kdf_n, row.kdf_r, row.kdf_p,
             row.wrapped_key, row.failures, row.locked_until, row.owner),
        )  # fmt: skip
        return cur.rowcount == 1

    def card_delete(self, card: str) -> None:
        # objects, sessions and grants cascade
        self.con.execute("DELETE FROM softcards WHERE id = %s", (card,))

    def card_set_failures(self, card: str, failures: int, locked_until: float) -> None:
        self.con.execute(
            "UPDATE softcards SET failures = %s, locked_until = %s WHERE id = %s",
            (failures, locked_until, card),
        )

    def card_reserve_attempt(
        self, card: str, now: float, threshold: int, lease_until: float
    ) -> int | None:
        # One UPDATE: a concurrent one on the same card waits for this row lock, then
        # re-checks its WHERE against what this one wrote (READ COMMITTED re-evaluation).
        row = self.con.execute(
            "UPDATE softcards SET"
            " pending = (CASE WHEN pending_until > %(now)s THEN pending ELSE 0 END) + 1,"
            " pending_until = %(lease)s"
            " WHERE id = %(card)s AND locked_until <= %(now)s"
            " AND failures + (CASE WHEN pending_until > %(now)s THEN pending ELSE 0 END)"
            " < GREATEST(%(threshold)s, failures + 1)"
            " RETURNING failures + pending",
            {"now": now, "lease": lease_until, "card": card, "threshold": threshold},
        ).fetchone()
        return int(row[0]) if row else None

    def card_settle_attempt(
        self, card: str, success: bool, now: float, threshold: int, max_seconds: int
    ) -> None:
        if success:
            sql = (
                "UPDATE softcards SET failures = 0, locked_until = 0,"
                " pending = GREATEST(pending - 1, 0) WHERE id = %(card)s"
            )
        else:
            sql = (
                "UPDATE softcards SET failures = failures + 1, pending = GREATEST(pending - 1, 0),"
                " locked_until = CASE WHEN failures + 1 >= %(threshold)s"
                " THEN %(now)s + LEAST(1 << LEAST(failures + 1 - %(threshold)s, 30), %(max)s)"
                " ELSE locked_until END WHERE id = %(card)s"
            )
        args = {"card": card, "now": now, "threshold": threshold, "max": max_seconds}
        self.con.execute(sql, args)

    def session_insert(self, session: str, card: str, expires: float, client: str) -> None:
        self.con.execute(
            "INSERT INTO sessions (id, card, expires, client) VALUES (%s, %s, %s, %s)",
            (session, card, expires, client),
        )

    def session_extend(self, session: str, card: str, expires: float) -> bool:
        cur = self.con.execute(
            "UPDATE sessions SET expires = %s WHERE id = %s AND card = %s",
            (expires, session, card),
        )
        return cur.rowcount > 0

    def _lock_card(self, card: str) -> None:
        # Grants change under the card's row lock, the lock an activation holds while it checks
        # the grant and inserts its session (card_get FOR UPDATE): a withdrawal either ends an
        # activation that committed first or is seen by one that comes after.
        self.con.execute("SELECT 1 FROM softcards WHERE id = %s FOR UPDATE", (card,))

    def grant_put(self, card: str, client: str) -> None:
        self._lock_card(card)
        self.con.execute(
            "INSERT INTO grants (card, client) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (card, client),
        )

    def grant_delete(self, card: str, client: str) -> bool:
        self._lock_card(card)
        cur = self.con.execute("DELETE FROM grants WHERE card = %s AND client = %s", (card, client))
        self.con.execute("DELETE FROM sessions WHERE card = %s AND client = %s", (card, client))
        return cur.rowcount > 0

    def session_delete(self, session: str) -> bool:
        return self.con.execute("DELETE FROM sessions WHERE id = %s", (session,)).rowcount > 0

    def session_expire(self, before: float) -> None:
        self.con.execute("DELETE FROM sessions WHERE expires < %s", (before,))

    def object_insert(self, row: ObjectRow) -> None:
        self.con.execute(
            f"INSERT INTO objects ({_OBJ_COLS}) VALUES (%s, %s, %s, %s, %s, %s)",
            (row.handle, row.card, row.cls, row.key_type, row.stored, row.secret),
        )

    def object_delete(self, card: str, handle: str) -> bool:
        cur = self.con.execute(
            "DELETE FROM objects WHERE card = %s AND handle = %s", (card, handle)
        )
        return cur.rowcount > 0

    def object_set_attrs(self, card: str, handle: str, attrs: Attrs) -> bool:
        cur = self.con.execute(
            "UPDATE objects SET attrs = %s WHERE card = %s AND handle = %s",
            (encode_stored(attrs), card, handle),
        )
        return cur.rowcount > 0


# Errors that mean "the database is not there (as a writable primary) right now".
_UNAVAILABLE: Final = (
    psycopg.OperationalError,  # connection refused or lost, admin shutdown, pool timeout
    psycopg.InterfaceError,  # a connection already closed
    psycopg.errors.ReadOnlySqlTransaction,  # connected to a standby (after a switch)
)


class PostgresStore(Store):
    scheme = "postgresql"
    reads_block = True

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self._shown = redact(cfg.url)
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._pool_lock = threading.Lock()
        self._checking = False

    @classmethod
    def open(cls, cfg: StoreConfig) -> PostgresStore:
        return cls(cfg)

    def describe(self) -> str:
        return f"postgresql {self._shown}"

    def _get_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = psycopg_pool.ConnectionPool(
                        self.cfg.url,
                        min_size=1,
                        max_size=self.cfg.pool_size,
                        timeout=self.cfg.pool_timeout,
                        # A failed connection attempt is retried with a growing delay (1 s, 2 s,
                        # ...) until this; then the next request starts a fresh attempt at once.
                        # Short, so a database that is back is used within about a second.
                        reconnect_timeout=2.0,
                        kwargs={"autocommit": True},
                        name="pkcs11ws",
                        open=False,
                    )
                    self._pool.open(wait=False)
                pool = self._pool
        return pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        pool = self._get_pool()
        try:
            with pool.connection() as con:
                try:
                    yield con
                except psycopg.errors.ReadOnlySqlTransaction:
                    # A standby now (after a switch): closed, the pool drops it on return and
                    # the next connection looks for the primary again.
                    con.close()
                    raise
        except _UNAVAILABLE as exc:
            self._after_loss(pool)
            # libpq's messages name the host and the reason, never the password.
            why = (str(exc).splitlines() or [""])[0][:200]
            raise StoreUnavailable(
                f"database {self._shown} unavailable: {type(exc).__name__}: {why}"
            ) from None

    def _after_loss(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:
        # The other idle connections were most likely cut too: check them (in the background,
        # one check at a time) rather than fail one request on each.
        with self._pool_lock:
            if self._checking:
                return
            self._checking = True
        threading.Thread(target=self._check_pool, args=(pool,), daemon=True).start()

    def _check_pool(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:
        try:
            pool.check()
        except Exception:  # the pool is closing, or the check itself failed: nothing to do
            log.debug("connection pool check failed", exc_info=True)
        finally:
            with self._pool_lock:
                self._checking = False

    def schema_version(self) -> int:
        with self._connection() as con:
            return _version(con)

    def migrate(self, **step_args: Any) -> tuple[int, int]:
        with self._connection() as con:
            before = _version(con)
            while True:
                with con.transaction():
                    # One migrator at a time across every replica; re-read under the lock.
                    con.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _MIGRATE_LOCK))
                    con.execute(
                        "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)"
                    )
                    current = _version(con)
                    if current > SCHEMA_VERSION:
                        raise StoreError(
                            f"{self._shown}: schema version {current} is newer than this pkcs11ws"
                            f" knows ({SCHEMA_VERSION}): upgrade pkcs11ws"
                        )
                    if current == SCHEMA_VERSION:
                        return before, current
                    step = MIGRATIONS[current]
                    for stmt in step.sql:
                        con.execute(stmt)
                    if step.run is not None:
                        step.run(con, **step_args)
                    con.execute(
                        "INSERT INTO meta (k, v) VALUES ('schema', %s)"
                        " ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                        (str(step.version),),
                    )
                    log.info("store schema: step %d (%s) done", step.version, step.what)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextmanager
    def read(self) -> Iterator[ReadTx]:
        with self._connection() as con:
            yield _Reads(con)

    @contextmanager
    def write(self) -> Iterator[WriteTx]:
        with self._connection() as con, con.transaction():
            yield _Tx(con)


def _version(con: psycopg.Connection[Any]) -> int:
    row = con.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
    return int(row[0]) if row else 0
