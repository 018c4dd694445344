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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final

try:
    from pkcs11ws._native import sqlmark as _sqlmark
except ImportError:  # (not built: the change mark is read through a cursor)
    _sqlmark = None  # type: ignore[assignment]
from pkcs11ws.server.store import (
    Migration,
    Store,
    StoreConfig,
    StoreError,
    WriteTx,
    check_migrations,
)
from pkcs11ws.server.store_sql import SqlReads, SqlTx, Statements, migrate_step, schema_steps

_STATEMENTS: Final = Statements.render(
    pyformat=False, lock="", order="rowid", greatest="MAX", least="MIN"
)


# The schema steps (store_sql.schema_steps) in SQLite's types; the same numbers as pg_store's.
MIGRATIONS: Final[tuple[Migration, ...]] = schema_steps(
    _STATEMENTS, blob="BLOB", real="REAL", bigint="INTEGER", if_not_exists="IF NOT EXISTS ", seq=""
)
SCHEMA_VERSION: Final = check_migrations(MIGRATIONS)


def sqlite_path(url: str) -> Path:
    """sqlite:////abs/path -> /abs/path (Settings has made relative paths absolute)."""
    rest = url.partition("://")[2]
    if not rest.startswith("/") or rest == "/":
        raise StoreError(f"store: {url!r}: expected sqlite:///PATH")
    return Path(rest[1:] if rest.startswith("//") else rest)


class _Reads(SqlReads):
    """The shared reads (store_sql.py); SQLiteStore.read() hands one out as its own context."""

    __slots__ = ()
    sql = _STATEMENTS

    def __enter__(self) -> _Reads:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Tx(SqlTx):
    __slots__ = ()
    sql = _STATEMENTS

    def card_delete(self, card: str) -> None:
        self.con.execute("DELETE FROM objects WHERE card = ?", (card,))
        self.con.execute("DELETE FROM sessions WHERE card = ?", (card,))
        self.con.execute("DELETE FROM grants WHERE card = ?", (card,))
        super().card_delete(card)


class SQLiteStore(Store):
    scheme = "sqlite"
    reads_block = False

    def __init__(self, path: Path, synchronous: str = "FULL", busy_timeout_ms: int = 15000) -> None:
        self.path = path
        self._sync = synchronous
        self._busy = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._marks: list[_sqlmark.DataVersion] = []
        self._lock = threading.Lock()
        self._slow_mark = False  # a mark made so far steps a statement (Store.cheap_mark)

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
            self._local.con = con
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
            with self._transaction() as con:  # the write lock: one migrator at a time
                step = migrate_step(
                    con, _STATEMENTS, MIGRATIONS, SCHEMA_VERSION, str(self.path), **step_args
                )
            if step is None:
                return before, SCHEMA_VERSION

    def close(self) -> None:
        with self._lock:
            cons, self._all = self._all, []
            marks, self._marks = self._marks, []
        for mark in marks:
            mark.close()
        for con in cons:
            with suppress(sqlite3.Error):
                con.close()
        self._local = threading.local()

    def read(self) -> _Reads:
        return self._reader()

    def change_mark(self) -> object:
        # The wal-index header, read from C where SQLite's library is reachable (sqlmark.pyx:
        # ~0.1 us, no system call: cheap_mark then), else data_version, which changes when
        # another connection (of any process) committed since this connection last looked:
        # stepped from C (~3k instructions and two fcntl calls) or through a cursor (~12.7k).
        mark = getattr(self._local, "mark", None)
        if mark is None:
            mark = self._local.mark = self._new_mark()
        value = mark()
        # None: SQLite could not say; a value never seen before makes the caller read afresh.
        return object() if value is None else value

    def _new_mark(self) -> Callable[[], object]:
        self._reader()  # (creates the database file and puts it in WAL mode)
        if _sqlmark is not None and _sqlmark.available():
            try:
                mark = _sqlmark.DataVersion(str(self.path), self._busy)
            except OSError:
                pass  # (the cursor below fails the same way, or works: either way as before)
            else:
                with self._lock:
                    self._marks.append(mark)
                    self._slow_mark |= not mark.from_header
                    self.cheap_mark = not self._slow_mark
                return mark
        self._slow_mark, self.cheap_mark = True, False
        # A cursor of the thread's connection; its own writes do not move its data_version,
        # hence total_changes (the count of them) in the mark too.
        con: sqlite3.Connection = self._local.con
        cur = con.cursor()
        return lambda: (cur.execute("PRAGMA data_version").fetchone()[0], con.total_changes)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._reader()
        con: sqlite3.Connection = self._local.con
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
