"""SQLite backend of the key service store (`store: sqlite:///path`): WAL mode, one connection per
thread.

Writes take the database lock up front (`BEGIN IMMEDIATE`) so a transaction never fails half way
on a lock upgrade, and so every write transaction is serialised against all others: the row
locks and idempotency claims of the store contract (store.py) hold trivially. busy_timeout makes
concurrent writers (other threads, other worker processes) wait instead of failing.
synchronous=FULL by default: an acknowledged write survives a power cut. Reads are autocommit
statements on a WAL snapshot: they never wait for a writer.

The database and its -wal/-shm files are owner-only: the file is created 0600 before SQLite
opens it (SQLite gives the -wal and -shm files the mode of the database file) and its folder
0700 when this creates it; existing files are narrowed to 0600 when opened.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final

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
    WriteTx,
    check_migrations,
    encode_stored,
)


def _master_key_step(
    con: sqlite3.Connection, card_rewrap: CardRewrap | None = None, **_: Any
) -> None:
    """Every card key also wrapped under the master key (no passphrase needed: the
    passphrase-wrapped blob is wrapped as it is). Migrating a store that holds cards needs
    card_rewrap (Store.migrate(card_rewrap=...)); the service passes it."""
    rows = con.execute("SELECT id, wrapped_key FROM softcards").fetchall()
    if rows and card_rewrap is None:
        raise StoreError("the master-key migration step needs the master key (card_rewrap)")
    for card_id, wrapped in rows:
        assert card_rewrap is not None
        new = card_rewrap(card_id, wrapped)
        con.execute("UPDATE softcards SET wrapped_key = ? WHERE id = ?", (new, card_id))


# The schema, one numbered step per change (store.Migration; the same numbers as pg_store's).
# Append new steps at the end; never edit a released one.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "softcards, objects, sessions, idempotency records", (
        """CREATE TABLE IF NOT EXISTS softcards (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created TEXT NOT NULL,
            salt BLOB NOT NULL,
            kdf_n INTEGER NOT NULL, kdf_r INTEGER NOT NULL, kdf_p INTEGER NOT NULL,
            wrapped_key BLOB NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            locked_until REAL NOT NULL DEFAULT 0)""",
        """CREATE TABLE IF NOT EXISTS objects (
            handle TEXT PRIMARY KEY,
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            cls INTEGER NOT NULL,
            key_type INTEGER,
            attrs TEXT NOT NULL,
            secret BLOB)""",
        "CREATE INDEX IF NOT EXISTS objects_card ON objects(card, cls, key_type)",
        """CREATE TABLE IF NOT EXISTS sessions (
            id TEXT PRIMARY KEY,
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            expires REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires)",
        "CREATE INDEX IF NOT EXISTS sessions_card ON sessions(card)",
        """CREATE TABLE IF NOT EXISTS idempotency (
            key TEXT PRIMARY KEY,
            fingerprint BLOB NOT NULL,
            status INTEGER NOT NULL,
            body BLOB NOT NULL,
            created REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency(created)",
    )),
    # authz: softcards made before this step have no owner (admins only).
    Migration(2, "softcard owners, grants, the identity each activation is bound to", (
        "ALTER TABLE softcards ADD COLUMN owner TEXT",
        "CREATE INDEX IF NOT EXISTS softcards_owner ON softcards(owner)",
        """CREATE TABLE IF NOT EXISTS grants (
            card TEXT NOT NULL REFERENCES softcards(id) ON DELETE CASCADE,
            client TEXT NOT NULL,
            PRIMARY KEY (card, client))""",
        "CREATE INDEX IF NOT EXISTS grants_client ON grants(client)",
        "ALTER TABLE sessions ADD COLUMN client TEXT NOT NULL DEFAULT ''",
    )),
    # Card keys under the master key, and the lockout's reservation columns (passphrase
    # evaluations in flight, and until when that count holds: a dead process's lease runs out).
    Migration(3, "master-key wrap of card keys; lockout reservations", (
        "ALTER TABLE softcards ADD COLUMN pending INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE softcards ADD COLUMN pending_until REAL NOT NULL DEFAULT 0",
    ), _master_key_step),
)  # fmt: skip
SCHEMA_VERSION: Final = check_migrations(MIGRATIONS)

_CARD_COLS: Final = (
    "id, name, created, salt, kdf_n, kdf_r, kdf_p, wrapped_key, failures, locked_until, owner"
)
_NCOLS: Final = _CARD_COLS.count(",") + 1
_OBJ_COLS: Final = "handle, card, cls, key_type, attrs, secret"
_COUNT: Final = "(SELECT COUNT(*) FROM objects o WHERE o.card = s.id AND o.cls = {})"
_COUNTS_SQL: Final = ",".join(
    _COUNT.format(c) for c in (C.CKO_SECRET_KEY, C.CKO_CERTIFICATE, C.CKO_DATA)
)


def _card(row: tuple[object, ...]) -> CardRow:
    return CardRow(*row)  # type: ignore[arg-type]


def sqlite_path(url: str) -> Path:
    """sqlite:////abs/path -> /abs/path (Settings has made relative paths absolute)."""
    rest = url.partition("://")[2]
    if not rest.startswith("/") or rest == "/":
        raise StoreError(f"store: {url!r}: expected sqlite:///PATH")
    return Path(rest[1:] if rest.startswith("//") else rest)


class _Reads(ReadTx):
    """The reads, on one connection (in or out of a transaction)."""

    __slots__ = ("con",)

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __enter__(self) -> _Reads:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def card_get(self, card: str) -> CardRow | None:
        r = self.con.execute(f"SELECT {_CARD_COLS} FROM softcards WHERE id = ?", (card,))
        row = r.fetchone()
        return _card(row) if row else None

    def card_list(self, visible_to: str | None = None) -> list[tuple[CardRow, CardCounts]]:
        sql = f"SELECT {_CARD_COLS}, {_COUNTS_SQL} FROM softcards s"
        args: tuple[str, ...] = ()
        if visible_to is not None:
            sql += " WHERE s.owner = ? OR s.id IN (SELECT card FROM grants WHERE client = ?)"
            args = (visible_to, visible_to)
        rows = self.con.execute(sql + " ORDER BY s.name", args).fetchall()
        n = _NCOLS
        return [(_card(r[:n]), CardCounts(r[n], r[n + 1], r[n + 2])) for r in rows]

    def grant_exists(self, card: str, client: str) -> bool:
        row = self.con.execute(
            "SELECT 1 FROM grants WHERE card = ? AND client = ?", (card, client)
        ).fetchone()
        return row is not None

    def grant_list(self, card: str) -> list[str]:
        rows = self.con.execute(
            "SELECT client FROM grants WHERE card = ? ORDER BY client", (card,)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def card_counts(self, card: str) -> CardCounts:
        row = self.con.execute(
            "SELECT COALESCE(SUM(cls = ?), 0), COALESCE(SUM(cls = ?), 0),"
            " COALESCE(SUM(cls = ?), 0) FROM objects WHERE card = ?",
            (C.CKO_SECRET_KEY, C.CKO_CERTIFICATE, C.CKO_DATA, card),
        ).fetchone()
        return CardCounts(int(row[0]), int(row[1]), int(row[2]))

    def session_valid(self, session: str, card: str, now: float) -> bool:
        row = self.con.execute(
            "SELECT 1 FROM sessions WHERE id = ? AND card = ? AND expires > ?",
            (session, card, now),
        ).fetchone()
        return row is not None

    def object_get(self, card: str, handle: str) -> ObjectRow | None:
        row = self.con.execute(
            f"SELECT {_OBJ_COLS} FROM objects WHERE handle = ? AND card = ?", (handle, card)
        ).fetchone()
        return ObjectRow(*row) if row else None

    def session_object(
        self, session: str, card: str, now: float, handle: str
    ) -> tuple[bool, ObjectRow | None]:
        # One indexed statement (two primary-key lookups): no row means no live session, a row
        # of NULLs means the session lives but the object does not.
        row = self.con.execute(
            "SELECT o.handle, o.card, o.cls, o.key_type, o.attrs, o.secret FROM sessions s"
            " LEFT JOIN objects o ON o.handle = ? AND o.card = s.card"
            " WHERE s.id = ? AND s.card = ? AND s.expires > ?",
            (handle, session, card, now),
        ).fetchone()
        if row is None:
            return False, None
        return True, (ObjectRow(*row) if row[0] is not None else None)

    def object_search(
        self, card: str, cls: int | None, key_type: int | None
    ) -> Iterator[ObjectRow]:
        sql = f"SELECT {_OBJ_COLS} FROM objects WHERE card = ?"
        args: list[object] = [card]
        if cls is not None:
            sql += " AND cls = ?"
            args.append(cls)
        if key_type is not None:
            sql += " AND key_type = ?"
            args.append(key_type)
        # fetchall: the cursor must not stay open across an await on this thread's connection.
        rows = self.con.execute(sql + " ORDER BY rowid", args).fetchall()
        return (ObjectRow(*r) for r in rows)

    def idempotency_get(self, key: str) -> IdempotencyRow | None:
        row = self.con.execute(
            "SELECT key, fingerprint, status, body, created FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        return IdempotencyRow(*row) if row else None

    def activity(self, now: float) -> StoreActivity:
        row = self.con.execute(
            "SELECT (SELECT COUNT(*) FROM sessions WHERE expires > ?),"
            " (SELECT COUNT(*) FROM softcards WHERE locked_until > ?)",
            (now, now),
        ).fetchone()
        return StoreActivity(int(row[0]), int(row[1]))


class _Tx(_Reads, WriteTx):
    __slots__ = ()

    def idempotency_put(self, row: IdempotencyRow) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO idempotency (key, fingerprint, status, body, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (row.key, row.fingerprint, row.status, row.body, row.created),
        )

    def idempotency_expire(self, before: float) -> None:
        self.con.execute("DELETE FROM idempotency WHERE created < ?", (before,))

    def card_insert(self, row: CardRow) -> bool:
        try:
            self.con.execute(
                f"INSERT INTO softcards ({_CARD_COLS}) VALUES ({', '.join('?' * _NCOLS)})",
                (row.id, row.name, row.created, row.salt, row.kdf_n, row.kdf_r, row.kdf_p,
                 row.wrapped_key, row.failures, row.locked_until, row.owner),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            return False
        return True

    def card_delete(self, card: str) -> None:
        self.con.execute("DELETE FROM objects WHERE card = ?", (card,))
        self.con.execute("DELETE FROM sessions WHERE card = ?", (card,))
        self.con.execute("DELETE FROM grants WHERE card = ?", (card,))
        self.con.execute("DELETE FROM softcards WHERE id = ?", (card,))

    def card_set_failures(self, card: str, failures: int, locked_until: float) -> None:
        self.con.execute(
            "UPDATE softcards SET failures = ?, locked_until = ? WHERE id = ?",
            (failures, locked_until, card),
        )

    def card_reserve_attempt(
        self, card: str, now: float, threshold: int, lease_until: float
    ) -> int | None:
        rows = self.con.execute(
            "UPDATE softcards SET"
            " pending = (CASE WHEN pending_until > :now THEN pending ELSE 0 END) + 1,"
            " pending_until = :lease"
            " WHERE id = :card AND locked_until <= :now"
            " AND failures + (CASE WHEN pending_until > :now THEN pending ELSE 0 END)"
            " < MAX(:threshold, failures + 1)"
            " RETURNING failures + pending",
            {"now": now, "lease": lease_until, "card": card, "threshold": threshold},
        ).fetchall()  # all rows: the statement is finished here
        return int(rows[0][0]) if rows else None

    def card_settle_attempt(
        self, card: str, success: bool, now: float, threshold: int, max_seconds: int
    ) -> None:
        if success:
            sql = (
                "UPDATE softcards SET failures = 0, locked_until = 0,"
                " pending = MAX(pending - 1, 0) WHERE id = :card"
            )
        else:
            sql = (
                "UPDATE softcards SET failures = failures + 1, pending = MAX(pending - 1, 0),"
                " locked_until = CASE WHEN failures + 1 >= :threshold"
                " THEN :now + MIN(1 << MIN(failures + 1 - :threshold, 30), :max)"
                " ELSE locked_until END WHERE id = :card"
            )
        args = {"card": card, "now": now, "threshold": threshold, "max": max_seconds}
        self.con.execute(sql, args)

    def session_insert(self, session: str, card: str, expires: float, client: str) -> None:
        self.con.execute(
            "INSERT INTO sessions (id, card, expires, client) VALUES (?, ?, ?, ?)",
            (session, card, expires, client),
        )

    def session_extend(self, session: str, card: str, expires: float) -> bool:
        cur = self.con.execute(
            "UPDATE sessions SET expires = ? WHERE id = ? AND card = ?", (expires, session, card)
        )
        return cur.rowcount > 0

    def grant_put(self, card: str, client: str) -> None:
        self.con.execute(
            "INSERT OR IGNORE INTO grants (card, client) VALUES (?, ?)", (card, client)
        )

    def grant_delete(self, card: str, client: str) -> bool:
        cur = self.con.execute("DELETE FROM grants WHERE card = ? AND client = ?", (card, client))
        self.con.execute("DELETE FROM sessions WHERE card = ? AND client = ?", (card, client))
        return cur.rowcount > 0

    def session_delete(self, session: str) -> bool:
        return self.con.execute("DELETE FROM sessions WHERE id = ?", (session,)).rowcount > 0

    def session_expire(self, before: float) -> None:
        self.con.execute("DELETE FROM sessions WHERE expires < ?", (before,))

    def object_insert(self, row: ObjectRow) -> None:
        self.con.execute(
            f"INSERT INTO objects ({_OBJ_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
            (row.handle, row.card, row.cls, row.key_type, row.stored, row.secret),
        )

    def object_delete(self, card: str, handle: str) -> bool:
        cur = self.con.execute("DELETE FROM objects WHERE card = ? AND handle = ?", (card, handle))
        return cur.rowcount > 0

    def object_set_attrs(self, card: str, handle: str, attrs: Attrs) -> bool:
        cur = self.con.execute(
            "UPDATE objects SET attrs = ? WHERE card = ? AND handle = ?",
            (encode_stored(attrs), card, handle),
        )
        return cur.rowcount > 0


class SQLiteStore(Store):
    scheme = "sqlite"
    reads_block = False

    def __init__(self, path: Path, synchronous: str = "FULL", busy_timeout_ms: int = 15000) -> None:
        self.path = path
        self._sync = synchronous
        self._busy = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, cfg: StoreConfig) -> SQLiteStore:
        return cls(sqlite_path(cfg.url), cfg.synchronous)

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _reader(self) -> _Reads:
        reader: _Reads | None = getattr(self._local, "reader", None)
        if reader is None:
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o700, parents=True)
            _owner_only(self.path)
            # isolation_level=None: autocommit, transactions only where we say BEGIN.
            con = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self._busy / 1000
            )
            con.execute(f"PRAGMA busy_timeout = {int(self._busy)}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute(f"PRAGMA synchronous = {self._sync}")
            con.execute("PRAGMA foreign_keys = ON")
            reader = self._local.reader = _Reads(con)
            with self._lock:
                self._all.append(con)
        return reader

    def schema_version(self) -> int:
        con = self._reader().con
        has_meta = con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return 0
        row = con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        return int(row[0]) if row else 0

    def migrate(self, **step_args: Any) -> tuple[int, int]:
        before = self.schema_version()
        while True:
            with self._transaction() as con:
                # Under the write lock: another process may have migrated meanwhile.
                con.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
                row = con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
                current = int(row[0]) if row else 0
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: schema version {current} is newer than this pkcs11ws"
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
                    "INSERT OR REPLACE INTO meta (k, v) VALUES ('schema', ?)", (str(step.version),)
                )

    def close(self) -> None:
        with self._lock:
            cons, self._all = self._all, []
        for con in cons:
            with suppress(sqlite3.Error):
                con.close()
        self._local = threading.local()

    def read(self) -> _Reads:
        return self._reader()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        con = self._reader().con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[WriteTx]:
        with self._transaction() as con:
            yield _Tx(con)


def _owner_only(path: Path) -> None:
    """Create the database file 0600 if missing (so SQLite's -wal/-shm get 0600 too); narrow
    an existing one and its companions to 0600.

    Never open (and so close) an existing database file here: closing any descriptor of it
    drops every POSIX lock this process holds on it, SQLite's included."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # let sqlite3.connect report it
    for suffix in ("", "-wal", "-shm", "-journal"):
        with suppress(FileNotFoundError):
            p = Path(str(path) + suffix)
            if p.stat().st_mode & 0o077:
                p.chmod(0o600)
