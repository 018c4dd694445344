"""Store schema step 2 (owners, grants, the identity of each session) on real SQLite: a version-1
database is migrated in place; softcards made before identities existed have no owner and are
visible to admins only; grants and their withdrawal."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pkcs11ws.server import sqlite_store
from pkcs11ws.server.sqlite_store import SQLiteStore
from pkcs11ws.server.store import CardRow


def _v1(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript(sqlite_store._SCHEMA)
    con.execute("INSERT INTO meta (k, v) VALUES ('schema', '1')")
    con.execute(
        "INSERT INTO softcards (id, name, created, salt, kdf_n, kdf_r, kdf_p, wrapped_key)"
        " VALUES ('old-card', 'legacy', '2026-01-01T00:00:00Z', x'00', 2, 1, 1, x'00')"
    )
    con.execute("INSERT INTO sessions (id, card, expires) VALUES ('s1', 'old-card', 1e12)")
    con.commit()
    con.close()


def test_version_1_store_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    _v1(db)
    store = SQLiteStore(db)
    store.init_schema()
    store.init_schema()  # idempotent: a second worker starting finds the step applied
    try:
        con = sqlite3.connect(db)
        assert con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()[0] == str(
            sqlite_store.SCHEMA_VERSION
        )
        con.close()
        legacy = store.card_get("old-card")
        assert legacy is not None and legacy.owner is None
        assert [c.id for c, _ in store.card_list()] == ["old-card"]  # admins see it
        assert store.card_list("app1") == []  # an app identity does not
        assert store.session_valid("s1", "old-card", 0.0)  # sessions survive the step
    finally:
        store.close()


def test_owners_grants_and_sessions(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "keys.db")
    store.init_schema()
    try:
        row = CardRow("c1", "mine", "2026-01-01T00:00:00Z", b"s", 2, 1, 1, b"w", owner="alice")
        with store.write() as tx:
            assert tx.card_insert(row)
            tx.session_insert("sa", "c1", 1e12, "alice")
            tx.session_insert("sb", "c1", 1e12, "bob")
            tx.grant_put("c1", "bob")
            tx.grant_put("c1", "bob")  # no-op
        assert [c.id for c, _ in store.card_list("alice")] == ["c1"]
        assert [c.id for c, _ in store.card_list("bob")] == ["c1"]
        assert store.card_list("carol") == []
        assert store.grant_list("c1") == ["bob"] and store.grant_exists("c1", "bob")
        with store.write() as tx:
            assert tx.grant_delete("c1", "bob")
            assert not tx.grant_delete("c1", "bob")
            assert tx.session_extend("sa", "c1", 2e12)
            assert not tx.session_extend("nope", "c1", 2e12)
        # Withdrawing the grant ended bob's activation, not alice's.
        assert not store.session_valid("sb", "c1", 0.0)
        assert store.session_valid("sa", "c1", 1.5e12)
        assert store.card_list("bob") == []
        with store.write() as tx:
            tx.grant_put("c1", "carol")
            tx.card_delete("c1")
        assert store.grant_list("c1") == []
    finally:
        store.close()
