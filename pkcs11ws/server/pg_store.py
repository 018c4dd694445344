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

from pkcs11ws.server.store import (
    IdempotencyRow,
    Migration,
    ReadTx,
    Store,
    StoreConfig,
    StoreUnavailable,
    WriteTx,
    check_migrations,
    redact,
)
from pkcs11ws.server.store_sql import SqlReads, SqlTx, Statements, migrate_step, schema_steps

log = logging.getLogger("pkcs11ws.server")


_READS: Final = Statements.render(
    pyformat=True, lock="", order="seq", greatest="GREATEST", least="LEAST"
)
_WRITES: Final = Statements.render(
    pyformat=True, lock=" FOR UPDATE", order="seq", greatest="GREATEST", least="LEAST"
)


# The schema steps (store_sql.schema_steps) in PostgreSQL's types; seq: creation order (SQLite's
# rowid), which searches return.
MIGRATIONS: Final[tuple[Migration, ...]] = schema_steps(
    _WRITES,
    blob="BYTEA",
    real="DOUBLE PRECISION",
    bigint="BIGINT",
    if_not_exists="",
    seq="\n            seq BIGSERIAL NOT NULL,",
)
SCHEMA_VERSION: Final = check_migrations(MIGRATIONS)

# Advisory lock keys (first argument of the two-int form): one namespace for this application.
_LOCK_NS: Final = 0x504B3131  # "PK11"
_MIGRATE_LOCK: Final = 1
_IDEM_LOCK: Final = 2


class _Reads(SqlReads):
    """The shared reads (store_sql.py), one statement each at READ COMMITTED."""

    __slots__ = ()
    sql = _READS


class _Tx(SqlTx):
    """The shared changes; card_get and object_get lock their row (FOR UPDATE in _WRITES)."""

    __slots__ = ()
    sql = _WRITES

    def idempotency_get(self, key: str) -> IdempotencyRow | None:
        # The claim (store contract): a concurrent transaction with the same key waits here
        # until this one ends. hashtextextended: a 64-bit hash; a collision only serialises
        # two unrelated requests.
        self.con.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (key, _IDEM_LOCK)
        )
        return super().idempotency_get(key)

    def _lock_card(self, card: str) -> None:
        # Grants change under the card's row lock, the lock an activation holds while it checks
        # the grant and inserts its session (card_get FOR UPDATE): a withdrawal either ends an
        # activation that committed first or is seen by one that comes after.
        self.con.execute("SELECT 1 FROM softcards WHERE id = %s FOR UPDATE", (card,))


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
                    step = migrate_step(
                        con, _WRITES, MIGRATIONS, SCHEMA_VERSION, self._shown, **step_args
                    )
                    if step is None:
                        return before, SCHEMA_VERSION
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
