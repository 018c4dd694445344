"""`pkcs11ws-server backup` and `restore`: a consistent copy of the store while the service runs,
and putting one back while it does not.

backup: SQLite's online backup API copies the database in one step inside one read transaction,
so the copy is the store as of one instant (WAL mode: writers go on meanwhile); every change
acknowledged before the backup started is in it. It is written to a temporary file beside OUT,
checked (`PRAGMA integrity_check`, the schema row), synced and renamed, mode 0600.

restore: refuses while a service has the store open (`serve` holds a shared lock on
`<database.path>.lock` for its whole life; restore needs it exclusively) and refuses to replace
an existing store without --overwrite. It copies the checked backup beside the store, removes
the old store's -wal/-shm files (a stale WAL must never be replayed onto the restored pages) and
renames the copy into place.

What a recovery needs besides the backup: the master key file (the store holds keys only sealed
under it and the softcard passphrases), the passphrases themselves (never stored), and the PKI
for clients to connect (docs/design.md, Operations).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path
from typing import IO

from pkcs11ws.server.settings import Settings


class BackupError(Exception):
    """A backup or restore refused or failed; the message says why."""


def _lock_path(s: Settings) -> Path:
    return s.database_path.with_name(s.database_path.name + ".lock")


def hold_store(s: Settings) -> IO[bytes]:
    """Take the serving lock (shared: several `serve` on one store are allowed). Keep the
    returned file open while serving; closing it releases the lock."""
    s.database_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(_lock_path(s), "ab")  # noqa: SIM115 (held open for the life of the service)
    os.chmod(f.fileno(), 0o600)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BackupError(f"{s.database_path} is being restored; try again later") from None
    return f


def _check(path: Path) -> tuple[int, int]:
    """Integrity of a store file; returns (softcards, objects)."""
    try:
        con = sqlite3.connect(path)
    except sqlite3.Error as exc:
        raise BackupError(f"{path}: cannot open: {exc}") from None
    try:
        ok = con.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise BackupError(f"{path}: integrity check failed: {ok}")
        con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        cards = con.execute("SELECT COUNT(*) FROM softcards").fetchone()[0]
        objects = con.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
    except sqlite3.Error as exc:
        raise BackupError(f"{path}: not a pkcs11ws store: {exc}") from None
    finally:
        con.close()
    return int(cards), int(objects)


def _copy(src: Path, dst: Path) -> None:
    """SQLite online backup of src into the new file dst (0600), synced."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    source = sqlite3.connect(src)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)  # pages=-1: one step, one read transaction, one instant
        # The copy is a plain rollback-journal file: self-contained, no -wal beside it.
        target.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {src} failed: {exc}") from None
    finally:
        target.close()
        source.close()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(s: Settings, out: Path) -> tuple[int, int]:
    """Copy the store to `out` (which must not exist); returns (softcards, objects) copied."""
    if s.database_backend != "sqlite":
        raise BackupError(f"database.backend {s.database_backend}: use that database's tools")
    if not s.database_path.is_file():
        raise BackupError(f"{s.database_path}: no store there")
    out = out.resolve()
    if out.exists():
        raise BackupError(f"{out} exists; choose a new file name")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _copy(s.database_path, tmp)
        counts = _check(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(out.parent)
    return counts


def restore(s: Settings, source: Path, overwrite: bool = False) -> tuple[int, int]:
    """Put the backup `source` in place as the store; returns (softcards, objects)."""
    if s.database_backend != "sqlite":
        raise BackupError(f"database.backend {s.database_backend}: use that database's tools")
    source = source.resolve()
    if not source.is_file():
        raise BackupError(f"{source}: no such backup")
    counts = _check(source)
    db = s.database_path
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(s), "ab") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"{db} is in use by a running service: stop it first (systemctl stop, or SIGTERM)"
            ) from None
        if db.exists() and not overwrite:
            raise BackupError(f"{db} exists; add --overwrite to replace it with the backup")
        tmp = db.with_name(f".{db.name}.restore.{os.getpid()}.tmp")
        try:
            _copy(source, tmp)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    db.with_name(db.name + suffix).unlink()
            os.replace(tmp, db)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(db.parent)
    return counts
