"""Choosing and migrating the store: server.yaml's `store:` URL next to the older `database:` keys,
`pkcs11ws-server init --store`, `pkcs11ws-server migrate`, and the numbered migration steps on
both backends (a later step, as authz's and keystore's will be, runs once and in order)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pkcs11ws.server import pg_store, settings, sqlite_store
from pkcs11ws.server.store import Migration, StoreConfig, backend_class, open_store, redact
from tests.support.service import free_port, init_dir


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pkcs11ws.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def with_yaml(d: Path, change: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    p = d / "server.yaml"
    doc = yaml.safe_load(p.read_text())
    for k in drop:
        doc["database"].pop(k, None)
    doc.update(change)
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    res = init_dir(tmp_path / "ks", free_port())
    assert res.returncode == 0, res.stderr
    return tmp_path / "ks"


def test_default_is_sqlite_from_the_database_keys(initialised: Path) -> None:
    s = settings.load(initialised / "server.yaml")
    assert s.database_backend == "sqlite"
    assert s.store.url == f"sqlite:///{initialised.resolve() / 'keys.db'}"


@pytest.mark.parametrize(
    ("url", "expect"),
    [
        ("sqlite:///data/k.db", "REL/data/k.db"),  # relative to the yaml's folder
        ("sqlite:////var/lib/pkcs11ws/k.db", "/var/lib/pkcs11ws/k.db"),
    ],
)
def test_store_sqlite_urls(initialised: Path, url: str, expect: str) -> None:
    p = with_yaml(initialised, {"store": url}, drop=("path",))
    s = settings.load(p)
    want = Path(expect.replace("REL", str(initialised.resolve())))
    assert s.database_path == want and s.store.url == f"sqlite:///{want}"


@pytest.mark.parametrize(("change", "drop", "message"), [
    ({"store": "mysql://x/y"}, ("path",), "not a store URL"),
    ({"store": "sqlite:///k.db"}, (), "both name the SQLite file"),
    ({"store": "sqlite://"}, ("path",), "expected sqlite:///PATH"),
    ({"database": {"backend": "postgresql"}}, (), "store: postgresql://"),
    ({"store": 5}, ("path",), "expected a string"),
])  # fmt: skip
def test_bad_store_settings(
    initialised: Path, change: dict[str, Any], drop: tuple[str, ...], message: str
) -> None:
    p = with_yaml(initialised, change, drop)
    with pytest.raises(settings.SettingsError, match=message):
        settings.load(p)


def test_passwords_never_shown() -> None:
    assert redact("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write") == (
        "postgresql://u:***@h1:5432,h2:5432/db?target_session_attrs=read-write"
    )
    assert redact("postgresql://h/db?sslmode=require&password=s3cret&x=1") == (
        "postgresql://h/db?sslmode=require&password=***&x=1"
    )


def test_init_with_a_postgres_store_and_migrate(postgres: Any, tmp_path: Path) -> None:
    url = postgres.new_database()
    res = init_dir(tmp_path / "pg", free_port(), "--store", url)
    assert res.returncode == 0, res.stderr
    yaml_path = tmp_path / "pg" / "server.yaml"
    s = settings.load(yaml_path)
    assert (s.database_backend, s.store.url, s.store.pool_size) == ("postgresql", url, 8)
    assert not (tmp_path / "pg" / "keys.db").exists()
    first = cli("migrate", "--config", str(yaml_path))
    assert first.returncode == 0, first.stderr
    newest = pg_store.SCHEMA_VERSION
    assert f"schema version 0 -> {newest}" in first.stdout
    again = cli("migrate", "--config", str(yaml_path))
    assert f"schema version {newest}, up to date" in again.stdout


def test_init_store_refuses_sqlite_and_garbage(tmp_path: Path) -> None:
    for bad in ("sqlite:///x.db", "nonsense"):
        res = init_dir(tmp_path / bad.replace("/", "_"), free_port(), "--store", bad)
        assert res.returncode == 1, res.stdout
        assert "store" in res.stderr
        assert not (tmp_path / bad.replace("/", "_") / "server.yaml").exists()


def test_migrate_an_unreachable_database_fails_cleanly(initialised: Path) -> None:
    port = free_port()  # nothing listens there
    p = with_yaml(
        initialised,
        {"store": f"postgresql://u:pw@127.0.0.1:{port}/db", "database": {"pool_timeout": 2}},
    )
    res = cli("migrate", "--config", str(p))
    assert res.returncode == 2
    assert "unavailable" in res.stderr
    assert "pw" not in res.stderr.replace("pkcs11ws", "")  # the password is never printed


def test_migrate_upgrades_an_existing_sqlite_database(initialised: Path) -> None:
    # A database made by version 1 of the code (schema row "1") is recognised, not recreated.
    s = settings.load(initialised / "server.yaml")
    store = open_store(s.store)
    store.close()
    con = sqlite3.connect(s.database_path)
    assert con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()[0] == str(
        sqlite_store.SCHEMA_VERSION
    )
    con.close()
    res = cli("migrate", "--config", str(initialised / "server.yaml"))
    assert "up to date" in res.stdout, res.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_later_step_runs_once_in_order(
    backend: str, tmp_path: Path, request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    module: Any = sqlite_store if backend == "sqlite" else pg_store
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'k.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    cfg = StoreConfig(url=url, pool_timeout=30)
    store = open_store(cfg)
    base = store.schema_version()
    store.close()

    def rows_by_code(con: Any, value: int) -> None:  # a step with code, given migrate's args
        con.execute(f"INSERT INTO later_step VALUES ({int(value)})")

    step = Migration(
        base + 1,
        "a test step",
        ("CREATE TABLE later_step (x INTEGER)", "INSERT INTO later_step VALUES (1)"),
        rows_by_code,
    )
    monkeypatch.setattr(module, "MIGRATIONS", (*module.MIGRATIONS, step))
    monkeypatch.setattr(module, "SCHEMA_VERSION", base + 1)
    store = backend_class(url).open(cfg)
    try:
        assert store.migrate(value=41) == (base, base + 1)
        assert store.migrate(value=1000) == (base + 1, base + 1)  # done: not run again
        with store.write() as tx:
            con = tx.con  # type: ignore[attr-defined]
            assert con.execute("SELECT SUM(x) FROM later_step").fetchone()[0] == 42
    finally:
        store.close()
    # A step that fails leaves the version where it was (one transaction per step).
    bad = Migration(base + 2, "fails", ("CREATE TABLE half_done (x INTEGER)", "NOT SQL"))
    monkeypatch.setattr(module, "MIGRATIONS", (*module.MIGRATIONS, bad))
    monkeypatch.setattr(module, "SCHEMA_VERSION", base + 2)
    store = backend_class(url).open(cfg)
    try:
        with pytest.raises(Exception):  # noqa: B017 - each driver's own syntax error
            store.migrate()
        assert store.schema_version() == base + 1
        with store.write() as tx:
            con = tx.con  # type: ignore[attr-defined]
            exists = con.execute(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'"
                if backend == "sqlite"
                else "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'half_done'"
            ).fetchone()[0]
        assert exists == 0
    finally:
        store.close()
