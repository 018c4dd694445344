"""Store schema step 2 (owners, grants, the identity of each session) applied to a database made
at version 1, on real SQLite and a real PostgreSQL: softcards made before identities existed have
no owner and are visible to admins only, their sessions survive the step, and grants work on
them afterwards. (The operations themselves are in tests/unit/test_store_contract.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pkcs11ws.server import pg_store, sqlite_store
from pkcs11ws.server.store import StoreConfig, backend_class

LEGACY_CARD = (
    "INSERT INTO softcards (id, name, created, salt, kdf_n, kdf_r, kdf_p, wrapped_key)"
    " VALUES ('old-card', 'legacy', '2026-01-01T00:00:00Z', {blob}, 2, 1, 1, {blob})"
)
LEGACY_SESSION = "INSERT INTO sessions (id, card, expires) VALUES ('s1', 'old-card', 1e12)"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_version_1_store_is_migrated(
    backend: str, tmp_path: Path, request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    module: Any = sqlite_store if backend == "sqlite" else pg_store
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'k.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    cfg = StoreConfig(url=url, pool_timeout=30)
    steps = module.MIGRATIONS
    assert [m.version for m in steps[:2]] == [1, 2]
    # A database as version 1 of the code left it, with a softcard and a live session.
    with monkeypatch.context() as m:
        m.setattr(module, "MIGRATIONS", steps[:1])
        m.setattr(module, "SCHEMA_VERSION", 1)
        old = backend_class(url).open(cfg)
        try:
            assert old.migrate() == (0, 1)
            with old.write() as tx:
                con = tx.con  # type: ignore[attr-defined]
                con.execute(LEGACY_CARD.format(blob="x'00'" if backend == "sqlite" else "'\\x00'"))
                con.execute(LEGACY_SESSION)
        finally:
            old.close()
    for _ in range(2):  # a second worker starting finds the steps applied
        store = backend_class(url).open(cfg)
        try:
            # The master-key step (3) re-wraps card keys: a stand-in for the master key here
            # (that step's own test is in tests/unit/test_store_contract.py).
            before, after = store.migrate(card_rewrap=lambda card, inner: b"outer:" + inner)
            assert after == module.SCHEMA_VERSION and before in (1, after)
            with store.read() as r:
                legacy = r.card_get("old-card")
                assert legacy is not None and legacy.owner is None
                assert [c.id for c, _ in r.card_list()] == ["old-card"]  # admins see it
                assert r.card_list("app1") == []  # an app identity does not
                assert r.session_valid("s1", "old-card", 0.0)  # sessions survive the step
            with store.write() as tx:
                tx.grant_put("old-card", "app1")
            with store.read() as r:
                assert [c.id for c, _ in r.card_list("app1")] == ["old-card"]
            with store.write() as tx:
                assert tx.grant_delete("old-card", "app1")
                # The legacy session belongs to no identity (client ''): a grant withdrawal of
                # a named identity leaves it alone.
                assert tx.session_valid("s1", "old-card", 0.0)
        finally:
            store.close()
