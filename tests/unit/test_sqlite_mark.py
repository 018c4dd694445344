"""The SQLite store's change mark (SQLiteStore.change_mark), every way of reading it: from C
through the SQLite library of Python's sqlite3 module (pkcs11ws/_native/sqlmark.pyx), as the
wal-index header or as a statement, and through a cursor where that library cannot be reached.
Every commit of any other connection moves it, a read does not, and no mark of a closed store or
of another thread's connection is ever taken for a later one (test_store_contract.py checks the
contract for every backend)."""

from __future__ import annotations

import asyncio
import functools
import mmap
import os
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pkcs11ws._native import sqlmark
from pkcs11ws.server import sqlite_store
from pkcs11ws.server.handlers_crypto import CryptoHandlers
from pkcs11ws.server.sqlite_store import SQLiteStore


def _put(tx: Any, name: str) -> None:
    """A commit that touches no table the service's reads use (no card needed)."""
    tx.con.execute("INSERT INTO meta (k, v) VALUES (?, '1')", ("mark-test-" + name,))


def _open(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    store.migrate()
    return store


def test_the_mark_is_read_from_c_here(tmp_path: Path) -> None:
    """This build finds the library and reads the header (otherwise the fast path would go
    untested); the store says its mark is cheap then (the service reads it every request)."""
    assert sqlmark.available()
    store = _open(tmp_path / "db.sqlite")
    try:
        assert not store.cheap_mark  # (not known before a mark is made)
        store.change_mark()
        assert isinstance(store._local.mark, sqlmark.DataVersion)
        assert store._local.mark.from_header
        assert store.cheap_mark
    finally:
        store.close()


def _statement_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlmark's DataVersion as it is where the header cannot be read: the statement."""
    monkeypatch.setattr(
        sqlite_store,
        "_sqlmark",
        SimpleNamespace(
            available=sqlmark.available,
            DataVersion=functools.partial(sqlmark.DataVersion, header=False),
        ),
    )


@pytest.mark.parametrize("way", ["header", "statement", "cursor"])
def test_mark_moves_with_every_commit_of_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    if way == "cursor":
        monkeypatch.setattr(sqlite_store, "_sqlmark", None)
    elif way == "statement":
        _statement_only(monkeypatch)
    path = tmp_path / "db.sqlite"
    mine, theirs = _open(path), _open(path)
    # A plain connection as another program would hold one (no store code of ours).
    foreign = sqlite3.connect(path, isolation_level=None)
    try:
        seen = [mine.change_mark()]
        assert mine.cheap_mark == (way == "header")

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
        # The log checkpointed and emptied: the next commit restarts it from its first frame.
        foreign.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        moved()  # (the header says the log restarted, or not yet: either is no change)
        foreign.execute("INSERT INTO meta (k, v) VALUES ('mark-test-c', '1')")
        assert moved()
        assert not moved()
        foreign.execute("PRAGMA wal_checkpoint(RESTART)")
        moved()
        with theirs.write() as tx:
            _put(tx, "d")
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


def test_a_header_being_written_is_a_mark_never_seen(tmp_path: Path) -> None:
    """The header's two copies differ while a writer is between them (or the header is not
    initialised): that reading is a mark never seen, so the service reads the store afresh;
    equal again, the mark is the header's again."""
    path = tmp_path / "db.sqlite"
    store = _open(path)
    fd = os.open(f"{path}-shm", os.O_RDWR)
    # (The descriptor stays open until the store is closed: closing one would drop the
    # POSIX locks SQLite holds on the file in this process.)
    shm = mmap.mmap(fd, 4096)
    try:
        before = store.change_mark()
        assert store._local.mark.from_header
        second = 48 + 8  # the second copy's iChange
        shm[second] ^= 0xFF
        a, b = store.change_mark(), store.change_mark()
        assert a != b and before not in (a, b)
        shm[second] ^= 0xFF
        assert store.change_mark() == before
        shm[12] ^= 1  # isInit, in both copies: not initialised
        shm[48 + 12] ^= 1
        assert store.change_mark() != before
        shm[12] ^= 1
        shm[48 + 12] ^= 1
        assert store.change_mark() == before
    finally:
        store.close()
        shm.close()
        os.close(fd)


def _verdicts(h: CryptoHandlers) -> dict[Any, Any]:
    """The verdict cache as CryptoHandlers._key takes it for a request."""
    return h._verdicts if h._mark_read else h._verdict_cache()


@pytest.mark.parametrize("way", ["header", "statement"])
def test_verdicts_are_dropped_for_the_next_request_after_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """A cheap mark (the header) is read for every request: a commit between two requests
    handled in the same turn of the event loop is seen by the second. A costly one (the
    statement) is read once per turn: the next turn sees the commit."""
    if way == "statement":
        _statement_only(monkeypatch)
    path = tmp_path / "db.sqlite"
    mine, theirs = _open(path), _open(path)
    h = CryptoHandlers()
    h.store = mine
    h._init_crypto(mine)
    key = ("s", "card", b"k", "handle", "CKM_SHA256_HMAC", "sign")

    async def requests() -> None:
        _verdicts(h)[key] = object()  # a request's verdict, cached
        assert key in _verdicts(h)  # the next request, nothing changed
        with theirs.write() as tx:
            _put(tx, "v")
        if way == "header":
            assert key not in _verdicts(h)
            assert not h._mark_read  # (no callback per turn)
        else:
            assert key in _verdicts(h)  # the same turn
            await asyncio.sleep(0)
            assert key not in _verdicts(h)

    try:
        asyncio.run(requests())
    finally:
        mine.close()
        theirs.close()
