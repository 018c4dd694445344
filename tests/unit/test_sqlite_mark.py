"""The SQLite store's change mark (SQLiteStore.change_mark), both ways of reading it: from C
through the SQLite library of Python's sqlite3 module (pkcs11ws/_native/sqlmark.pyx), and
through a cursor where that library cannot be reached. Every commit of any other connection
moves it, a read does not, and no mark of a closed store or of another thread's connection is
ever taken for a later one (test_store_contract.py checks the contract for every backend)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws._native import sqlmark
from pkcs11ws.server import sqlite_store
from pkcs11ws.server.sqlite_store import SQLiteStore


def _put(tx: Any, name: str) -> None:
    """A commit that touches no table the service's reads use (no card needed)."""
    tx.con.execute("INSERT INTO meta (k, v) VALUES (?, '1')", ("mark-test-" + name,))


def _open(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    store.migrate()
    return store


def test_the_mark_is_read_from_c_here(tmp_path: Path) -> None:
    """This build finds the library (otherwise the fast path would go untested)."""
    assert sqlmark.available()
    store = _open(tmp_path / "db.sqlite")
    try:
        store.change_mark()
        assert isinstance(store._local.mark, sqlmark.DataVersion)
    finally:
        store.close()


@pytest.mark.parametrize("way", ["c", "cursor"])
def test_mark_moves_with_every_commit_of_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    if way == "cursor":
        monkeypatch.setattr(sqlite_store, "_sqlmark", None)
    path = tmp_path / "db.sqlite"
    mine, theirs = _open(path), _open(path)
    # A plain connection as another program would hold one (no store code of ours).
    foreign = sqlite3.connect(path, isolation_level=None)
    try:
        seen = [mine.change_mark()]

        def moved() -> bool:
            seen.append(mine.change_mark())
            return seen[-1] != seen[-2]

        assert not moved()
        with theirs.write() as tx:
            _put(tx, "a")
        assert moved()
        assert not moved()
        with mine.write() as tx:  # its own writes: another connection than the mark's
            _put(tx, "b")
        assert moved()
        foreign.execute("DELETE FROM meta WHERE k = 'mark-test-a'")
        assert moved()
        with mine.read() as r:
            r.session_valid("s", "card", time.time())
        assert not moved()
        worker = threading.Thread(target=lambda: theirs.close())
        worker.start()
        worker.join()
        # Another thread's mark is its own connection's: never equal to this thread's.
        other: list[object] = []
        t = threading.Thread(target=lambda: other.append(mine.change_mark()))
        t.start()
        t.join()
        assert other[0] not in seen
    finally:
        foreign.close()
        mine.close()


def test_a_reopened_store_never_repeats_a_mark(tmp_path: Path) -> None:
    """data_version starts again with each connection: marks carry which connection said it."""
    path = tmp_path / "db.sqlite"
    store = _open(path)
    first = store.change_mark()
    store.close()
    again = _open(path)
    try:
        assert again.change_mark() != first
    finally:
        again.close()


def test_a_failed_reading_is_a_mark_never_seen(tmp_path: Path) -> None:
    """When SQLite cannot say (here: the mark's connection closed under it), the mark differs
    from every earlier one, so the service reads the store afresh."""
    store = _open(tmp_path / "db.sqlite")
    try:
        store.change_mark()
        store._local.mark.close()
        a, b = store.change_mark(), store.change_mark()
        assert a != b
    finally:
        store.close()
