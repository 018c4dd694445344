"""The store contract (pkcs11ws/server/store.py), run against every backend of the registry.

Each test gets an empty, migrated store: SQLite in a temporary folder, PostgreSQL as a fresh
database on the session's real PostgreSQL server (conftest `postgres`). The concurrency tests use
real threads with one store per thread where the backend would share nothing between processes
either (SQLite: separate connections; PostgreSQL: separate pools): what holds here holds across
worker processes and replicas.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import constants as C
from pkcs11ws.protocol import Attrs, AttrValue
from pkcs11ws.server import store as store_mod
from pkcs11ws.server.store import (
    CardCounts,
    CardRow,
    IdempotencyRow,
    ObjectRow,
    Store,
    StoreConfig,
    StoreError,
    open_store,
)

BACKENDS = sorted({v: k for k, v in reversed(store_mod.BACKENDS.items())}.values())
VENDOR_KEY_TYPE = 0x80000001  # a key type past 32 bits signed: must round-trip


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory of stores on ONE new empty database (each call: another connection set)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    cfg = StoreConfig(url=url, pool_size=4, pool_timeout=30)
    made: list[Store] = []

    def make() -> Store:
        s = open_store(cfg)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


def card_row(name: str | None = None, owner: str | None = None) -> CardRow:
    return CardRow(
        str(uuid.uuid4()),
        name or uuid.uuid4().hex[:20],
        "2026-01-02T03:04:05Z",
        b"\x00salt\xff" * 2,
        4096,
        8,
        1,
        b"\x01wrapped\x00" * 6,
        owner=owner,
    )


def new_card_row(store: Store, name: str | None = None, owner: str | None = None) -> CardRow:
    row = card_row(name, owner)
    with store.write() as tx:
        assert tx.card_insert(row)
    return row


def key_row(card: str, label: bytes = b"k", key_type: int = C.CKK_AES) -> ObjectRow:
    attrs: Attrs = {
        "CKA_CLASS": C.CKO_SECRET_KEY,
        "CKA_KEY_TYPE": key_type,
        "CKA_LABEL": label,
        "CKA_SIGN": True,
        "CKA_ID": b"\x00\x01",
    }
    return ObjectRow.new(
        str(uuid.uuid4()), card, C.CKO_SECRET_KEY, key_type, attrs, b"sealed\x00" + label
    )


def data_row(card: str, label: bytes = b"d") -> ObjectRow:
    attrs: Attrs = {"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": label, "CKA_APPLICATION": b"app"}
    return ObjectRow.new(str(uuid.uuid4()), card, C.CKO_DATA, None, attrs, b"sealed-data")


# ------------------------------------------------------------------------------------------
# Schema versions


def test_migrate_is_idempotent_and_reports_versions(store: Store) -> None:
    newest = store.schema_version()
    assert newest >= 1
    assert store.migrate() == (newest, newest)


def test_migrate_from_empty_in_parallel(make_store: Callable[[], Store], tmp_path: Path) -> None:
    # Several replicas starting at once on an empty database: one migrates, the others wait and
    # find it done; nobody fails.
    first = make_store()
    newest = first.schema_version()
    # A second, truly empty database for this backend.
    if first.scheme == "sqlite":
        cfg = StoreConfig(url=f"sqlite:///{tmp_path / 'other.db'}")
    else:
        pg_url = first.cfg.url  # type: ignore[attr-defined]
        cfg = StoreConfig(url=_new_db_like(pg_url), pool_size=2, pool_timeout=30)
    stores = [store_mod.backend_class(cfg.url).open(cfg) for _ in range(4)]
    results: list[Any] = []
    try:
        assert stores[0].schema_version() == 0
        threads = [
            threading.Thread(target=lambda st=st: results.append(st.migrate())) for st in stores
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 4, results
        assert all(r[1] == newest for r in results)
        # Each migrator reports the version it first saw: 0, or a step another one had
        # already committed (steps commit one at a time), never past the newest.
        assert all(0 <= r[0] <= newest for r in results)
        assert all(st.schema_version() == newest for st in stores)
    finally:
        for st in stores:
            st.close()


def _new_db_like(url: str) -> str:
    import psycopg

    base, _, _ = url.rpartition("/")
    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(base + "/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def test_newer_schema_is_refused(store: Store) -> None:
    newest = store.schema_version()
    with store.write() as tx:
        con = tx.con  # type: ignore[attr-defined]
        sql = f"UPDATE meta SET v = '{newest + 1}' WHERE k = 'schema'"
        con.execute(sql)
    assert store.schema_version() == newest + 1
    with pytest.raises(StoreError, match="newer"):
        store.migrate()


# ------------------------------------------------------------------------------------------
# Softcards


def test_card_insert_get_list_counts(store: Store) -> None:
    a = new_card_row(store, "alpha")
    b = new_card_row(store, "beta")
    with store.read() as r:
        assert r.card_get(a.id) == a
        assert r.card_get("no-such-card") is None
        assert [c for c, _ in r.card_list()] == [a, b]
        assert r.card_counts(a.id) == CardCounts(0, 0, 0)
    with store.write() as tx:
        tx.object_insert(key_row(a.id))
        tx.object_insert(key_row(a.id))
        tx.object_insert(data_row(a.id))
    with store.read() as r:
        assert r.card_counts(a.id) == CardCounts(2, 0, 1)
        assert dict((c.id, n) for c, n in r.card_list()) == {
            a.id: CardCounts(2, 0, 1),
            b.id: CardCounts(0, 0, 0),
        }


def test_card_name_taken_keeps_the_transaction_usable(store: Store) -> None:
    a = new_card_row(store, "same")
    other = card_row("other")
    with store.write() as tx:
        assert not tx.card_insert(card_row("same"))
        assert tx.card_insert(other)  # the failed insert did not poison the transaction
    with store.read() as r:
        assert r.card_get(other.id) == other
        assert [c.id for c, _ in r.card_list()] == [other.id, a.id]


def test_card_delete_takes_objects_and_sessions(store: Store) -> None:
    a, b = new_card_row(store), new_card_row(store)
    ka, kb = key_row(a.id), key_row(b.id)
    now = time.time()
    with store.write() as tx:
        tx.object_insert(ka)
        tx.object_insert(kb)
        tx.session_insert("sa", a.id, now + 60, "app1")
        tx.session_insert("sb", b.id, now + 60, "app1")
    with store.write() as tx:
        tx.card_delete(a.id)
    with store.read() as r:
        assert r.card_get(a.id) is None
        assert r.object_get(a.id, ka.handle) is None
        assert not r.session_valid("sa", a.id, now)
        assert r.object_get(b.id, kb.handle) == kb
        assert r.session_valid("sb", b.id, now)


def test_card_failures(store: Store) -> None:
    a = new_card_row(store)
    with store.write() as tx:
        tx.card_set_failures(a.id, 3, 1234.5)
    with store.read() as r:
        got = r.card_get(a.id)
    assert got is not None and (got.failures, got.locked_until) == (3, 1234.5)


# ------------------------------------------------------------------------------------------
# Owners and grants (schema step 2)


def test_owners_and_visible_cards(store: Store) -> None:
    mine = new_card_row(store, "mine", owner="alice")
    theirs = new_card_row(store, "theirs", owner="bob")
    legacy = new_card_row(store, "legacy")  # made before identities: no owner, admins only
    with store.read() as r:
        assert r.card_get(mine.id) == mine and r.card_get(legacy.id) == legacy
        assert [c for c, _ in r.card_list()] == [legacy, mine, theirs]
        assert [c for c, _ in r.card_list("alice")] == [mine]
        assert r.card_list("carol") == []


def test_grants_end_only_that_identitys_sessions(store: Store) -> None:
    a = new_card_row(store, "granted", owner="alice")
    b = new_card_row(store, "other", owner="alice")
    now = time.time()
    with store.write() as tx:
        tx.grant_put(a.id, "bob")
        tx.grant_put(a.id, "bob")  # already may: no-op
        tx.grant_put(a.id, "carol")
        tx.grant_put(b.id, "bob")
        tx.session_insert("alice-a", a.id, now + 100, "alice")
        tx.session_insert("bob-a", a.id, now + 100, "bob")
        tx.session_insert("bob-b", b.id, now + 100, "bob")
    with store.read() as r:
        assert r.grant_list(a.id) == ["bob", "carol"]
        assert r.grant_exists(a.id, "bob") and not r.grant_exists(a.id, "dave")
        assert not r.grant_exists("no-such-card", "bob")
        assert [c.id for c, _ in r.card_list("bob")] == [a.id, b.id]
    with store.write() as tx:
        assert tx.grant_delete(a.id, "bob")
        assert not tx.grant_delete(a.id, "bob")  # none left
        assert tx.grant_list(a.id) == ["carol"]  # a WriteTx sees its own change
    with store.read() as r:
        assert not r.session_valid("bob-a", a.id, now)  # ended with the grant
        assert r.session_valid("alice-a", a.id, now)  # the owner's stays
        assert r.session_valid("bob-b", b.id, now)  # bob's grant on the other card stays
        assert [c.id for c, _ in r.card_list("bob")] == [b.id]
    with store.write() as tx:
        tx.card_delete(a.id)
    with store.read() as r:
        assert r.grant_list(a.id) == [] and not r.grant_exists(a.id, "carol")
        assert r.card_list("carol") == []
    # A new card that happens to reuse nothing inherits no grant.
    with store.write() as tx:
        assert tx.card_insert(card_row("granted", owner="alice"))
    with store.read() as r:
        assert r.card_list("carol") == []


def test_session_extend(store: Store) -> None:
    a = new_card_row(store, owner="alice")
    now = time.time()
    with store.write() as tx:
        tx.session_insert("s", a.id, now + 10, "alice")
    with store.write() as tx:
        assert tx.session_extend("s", a.id, now + 1000)
        assert not tx.session_extend("s", "another-card", now + 1000)
        assert not tx.session_extend("no-such-session", a.id, now + 1000)
    with store.read() as r:
        assert r.session_valid("s", a.id, now + 500)
    with store.write() as tx:
        assert tx.session_delete("s")
        assert not tx.session_extend("s", a.id, now + 2000)  # logout ends renewed logins too


# ------------------------------------------------------------------------------------------
# Sessions


def test_sessions(store: Store) -> None:
    a, b = new_card_row(store), new_card_row(store)
    now = time.time()
    with store.write() as tx:
        tx.session_insert("live", a.id, now + 100, "app1")
        tx.session_insert("old", a.id, now - 1, "app1")
    with store.read() as r:
        assert r.session_valid("live", a.id, now)
        assert not r.session_valid("live", b.id, now)  # another card's session
        assert not r.session_valid("old", a.id, now)  # expired
        assert not r.session_valid("none", a.id, now)
    with store.write() as tx:
        tx.session_expire(now)
        assert tx.session_delete("live")
        assert not tx.session_delete("live")
        assert not tx.session_delete("old")  # expired sessions were removed
    with store.read() as r:
        assert not r.session_valid("live", a.id, now)


def test_session_object_in_one_answer(store: Store) -> None:
    a, b = new_card_row(store), new_card_row(store)
    k, kb = key_row(a.id), key_row(b.id)
    now = time.time()
    with store.write() as tx:
        tx.object_insert(k)
        tx.object_insert(kb)
        tx.session_insert("s", a.id, now + 100, "app1")
    with store.read() as r:
        assert r.session_object("s", a.id, now, k.handle) == (True, k)
        assert r.session_object("s", a.id, now, "missing") == (True, None)
        assert r.session_object("s", a.id, now, kb.handle) == (True, None)  # another card's
        assert r.session_object("s", a.id, now + 200, k.handle) == (False, None)
        assert r.session_object("x", a.id, now, k.handle) == (False, None)


def test_change_mark_moves_with_every_commit(make_store: Callable[[], Store]) -> None:
    """A backend with a change mark (Store.change_mark) shows every commit in it: one made
    through another store (another process's connections), a write of its own, even a
    write that changed nothing the mark's reader had read; a read moves nothing."""
    mine, theirs = make_store(), make_store()
    if mine.change_mark() is None:
        assert theirs.change_mark() is None  # the service asks the store every request
        return
    a = new_card_row(mine)
    seen = [mine.change_mark()]

    def moved() -> bool:
        mark = mine.change_mark()
        seen.append(mark)
        return mark != seen[-2]

    with mine.read() as r:
        r.card_get(a.id)
    assert not moved()
    assert not moved()
    with theirs.write() as tx:
        tx.session_insert("s1", a.id, time.time() + 100, "app1")
    assert moved()
    with theirs.write() as tx:
        tx.grant_put(a.id, "app2")
    assert moved()
    with mine.write() as tx:
        tx.grant_delete(a.id, "app2")
    assert moved()
    # In another thread (the service's writes run in worker threads with their own
    # connections).
    worker = threading.Thread(target=lambda: new_card_row(mine))
    worker.start()
    worker.join()
    assert moved()
    assert not moved()


# ------------------------------------------------------------------------------------------
# Objects


def test_objects_round_trip_decoded(store: Store) -> None:
    a = new_card_row(store)
    k = key_row(a.id, b"\xff\x00 label", VENDOR_KEY_TYPE)
    with store.write() as tx:
        tx.object_insert(k)
        assert tx.object_get(a.id, k.handle) == k  # a transaction sees its own changes
    with store.read() as r:
        got = r.object_get(a.id, k.handle)
    assert got is not None
    assert got.attrs == {
        "CKA_CLASS": C.CKO_SECRET_KEY,
        "CKA_KEY_TYPE": VENDOR_KEY_TYPE,
        "CKA_LABEL": b"\xff\x00 label",
        "CKA_SIGN": True,
        "CKA_ID": b"\x00\x01",
    }
    assert got.wire["CKA_LABEL"] == "/wAgbGFiZWw="  # protocol (base64) form
    assert (got.cls, got.key_type, got.secret) == (
        C.CKO_SECRET_KEY,
        VENDOR_KEY_TYPE,
        b"sealed\x00\xff\x00 label",
    )
    with store.read() as r:
        assert r.object_get("other-card", k.handle) is None


def test_object_search_filters_and_order(store: Store) -> None:
    a, b = new_card_row(store), new_card_row(store)
    rows = [
        key_row(a.id, b"1"),
        data_row(a.id, b"2"),
        key_row(a.id, b"3", C.CKK_SHA256_HMAC),
        key_row(b.id, b"4"),
        key_row(a.id, b"5"),
    ]
    for row in rows:  # one transaction each: creation order is what searches return
        with store.write() as tx:
            tx.object_insert(row)
    with store.read() as r:
        assert [o.handle for o in r.object_search(a.id, None, None)] == [
            rows[0].handle,
            rows[1].handle,
            rows[2].handle,
            rows[4].handle,
        ]
        assert [o.handle for o in r.object_search(a.id, C.CKO_SECRET_KEY, C.CKK_AES)] == [
            rows[0].handle,
            rows[4].handle,
        ]
        assert [o.handle for o in r.object_search(a.id, C.CKO_DATA, None)] == [rows[1].handle]
        assert list(r.object_search(a.id, C.CKO_CERTIFICATE, None)) == []
        assert list(r.object_search("no-card", None, None)) == []


def test_object_delete_and_rename(store: Store) -> None:
    a = new_card_row(store)
    k = key_row(a.id)
    with store.write() as tx:
        tx.object_insert(k)
    with store.write() as tx:
        assert tx.object_set_attrs(a.id, k.handle, {**k.attrs, "CKA_LABEL": b"new"})
        assert not tx.object_set_attrs(a.id, "missing", {"CKA_LABEL": b"x"})
    with store.read() as r:
        got = r.object_get(a.id, k.handle)
    assert got is not None and got.attrs["CKA_LABEL"] == b"new" and got.secret == k.secret
    with store.write() as tx:
        assert not tx.object_delete("other-card", k.handle)
        assert tx.object_delete(a.id, k.handle)
        assert not tx.object_delete(a.id, k.handle)


def test_rollback_on_exception_keeps_nothing(store: Store) -> None:
    a = new_card_row(store)
    k = key_row(a.id)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.write() as tx:
        tx.object_insert(k)
        tx.card_set_failures(a.id, 9, 9.0)
        tx.idempotency_put(IdempotencyRow("key-rolled-back", b"f", 200, b"b", 1.0))
        raise Boom
    with store.read() as r:
        assert r.object_get(a.id, k.handle) is None
        assert r.card_get(a.id) == a
        assert r.idempotency_get("key-rolled-back") is None


# ------------------------------------------------------------------------------------------
# Idempotency records


def test_idempotency_records(store: Store) -> None:
    with store.write() as tx:
        assert tx.idempotency_get("k1") is None
        tx.idempotency_put(IdempotencyRow("k1", b"\x00fp", 201, b"\x00body", 100.0))
        tx.idempotency_put(IdempotencyRow("k2", b"fp2", 200, b"b2", 300.0))
    with store.read() as r:
        assert r.idempotency_get("k1") == IdempotencyRow("k1", b"\x00fp", 201, b"\x00body", 100.0)
    with store.write() as tx:  # replace (an expired record under the same key)
        tx.idempotency_put(IdempotencyRow("k1", b"fp3", 200, b"b3", 400.0))
        tx.idempotency_expire(350.0)
    with store.read() as r:
        assert r.idempotency_get("k1") == IdempotencyRow("k1", b"fp3", 200, b"b3", 400.0)
        assert r.idempotency_get("k2") is None


# ------------------------------------------------------------------------------------------
# Isolation: what the service relies on under concurrency (several processes or replicas)

WORKERS = 6


def _in_parallel(make_store: Callable[[], Store], job: Callable[[Store, int], None]) -> None:
    stores = [make_store() for _ in range(WORKERS)]
    errors: list[BaseException] = []
    start = threading.Barrier(WORKERS)

    def run(i: int) -> None:
        try:
            start.wait(30)
            job(stores[i], i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_read_modify_write_of_a_card_loses_no_increment(
    make_store: Callable[[], Store], store: Store
) -> None:
    # The lockout count: read the card in a write transaction, add one, write it back. The read
    # locks the row, so concurrent transactions never count from the same value.
    a = new_card_row(store)

    def job(s: Store, i: int) -> None:
        for _ in range(5):
            with s.write() as tx:
                cur = tx.card_get(a.id)
                assert cur is not None
                time.sleep(0.002)  # widen the window a lost update would need
                tx.card_set_failures(a.id, cur.failures + 1, 0.0)

    _in_parallel(make_store, job)
    with store.read() as r:
        got = r.card_get(a.id)
    assert got is not None and got.failures == WORKERS * 5


def test_idempotency_claim_runs_a_change_once(
    make_store: Callable[[], Store], store: Store
) -> None:
    # The service's commit: look the key up, make the change only if there is no record, write
    # the record. Retries of one request reaching several replicas at once make one object.
    a = new_card_row(store)

    def job(s: Store, i: int) -> None:
        with s.write() as tx:
            if tx.idempotency_get("one-request") is not None:
                return
            time.sleep(0.01)
            tx.object_insert(data_row(a.id, str(i).encode()))
            tx.idempotency_put(IdempotencyRow("one-request", b"fp", 201, str(i).encode(), 1.0))

    _in_parallel(make_store, job)
    with store.read() as r:
        objects = list(r.object_search(a.id, None, None))
        record = r.idempotency_get("one-request")
    assert len(objects) == 1
    assert record is not None and record.body == objects[0].attrs["CKA_LABEL"]


def test_concurrent_renames_are_not_lost(make_store: Callable[[], Store], store: Store) -> None:
    # A rename reads the object's attributes and writes them back with one name changed; each
    # worker sets its own attribute, and every one of them must survive.
    a = new_card_row(store)
    k = key_row(a.id)
    with store.write() as tx:
        tx.object_insert(k)

    changes: list[tuple[str, AttrValue]] = [
        ("CKA_ENCRYPT", True),
        ("CKA_DECRYPT", True),
        ("CKA_VERIFY", True),
        ("CKA_START_DATE", b"20260101"),
        ("CKA_END_DATE", b"20270101"),
        ("CKA_CHECK_VALUE", b"\x01\x02\x03"),
    ]
    assert len(changes) == WORKERS

    def job(s: Store, i: int) -> None:
        with s.write() as tx:
            cur = tx.object_get(a.id, k.handle)
            assert cur is not None
            time.sleep(0.002)
            tx.object_set_attrs(a.id, k.handle, {**cur.attrs, changes[i][0]: changes[i][1]})

    _in_parallel(make_store, job)
    with store.read() as r:
        got = r.object_get(a.id, k.handle)
    assert got is not None
    assert all(got.attrs.get(name) == value for name, value in changes)


def test_a_checked_empty_card_gains_no_key_before_delete(
    make_store: Callable[[], Store], store: Store
) -> None:
    # delete_softcard: count the card's keys, delete if none. An object inserted meanwhile must
    # either be counted or fail (the card is gone), never be deleted silently with the card.
    a = new_card_row(store)
    other = make_store()
    inserted: list[bool] = []
    counted = threading.Event()

    def insert() -> None:
        counted.wait(30)
        try:
            with other.write() as tx:
                tx.object_insert(key_row(a.id))
            inserted.append(True)
        except Exception:
            inserted.append(False)

    t = threading.Thread(target=insert)
    t.start()
    with store.write() as tx:
        assert tx.card_get(a.id) is not None
        keys = tx.card_counts(a.id).keys
        counted.set()
        time.sleep(0.2)  # the insert runs now, and must wait for this transaction
        if keys == 0:
            tx.card_delete(a.id)
    t.join(60)
    assert inserted == [False]
    with store.read() as r:
        assert r.card_get(a.id) is None


def test_a_withdrawn_grant_leaves_no_activation_behind(
    make_store: Callable[[], Store], store: Store
) -> None:
    # activate: read the card in a write transaction (lock), check the grant, insert the session.
    # A withdrawal racing it must either end that session or be seen by it: never a live
    # session of an identity that has no grant any more.
    a = new_card_row(store, owner="alice")
    with store.write() as tx:
        tx.grant_put(a.id, "bob")
    now = time.time()

    def job(s: Store, i: int) -> None:
        if i == 0:
            time.sleep(0.01)
            with s.write() as tx:
                assert tx.grant_delete(a.id, "bob")
            return
        for n in range(5):
            with s.write() as tx:
                card = tx.card_get(a.id)
                assert card is not None
                if not tx.grant_exists(a.id, "bob"):
                    return
                time.sleep(0.002)
                tx.session_insert(f"s{i}-{n}", a.id, now + 100, "bob")

    _in_parallel(make_store, job)
    with store.read() as r:
        assert not r.grant_exists(a.id, "bob")
        live = [
            f"s{i}-{n}"
            for i in range(1, WORKERS)
            for n in range(5)
            if r.session_valid(f"s{i}-{n}", a.id, now)
        ]
    assert live == []


# ------------------------------------------------------------------------------------------
# Lockout reservations (WriteTx.card_reserve_attempt / card_settle_attempt)


def test_reservation_rules(store: Store) -> None:
    a = new_card_row(store)
    now = 1000.0

    def reserve(t: float, card: str = a.id) -> int | None:
        with store.write() as tx:
            return tx.card_reserve_attempt(card, t, 3, t + 60)

    def settle(success: bool, t: float) -> None:
        with store.write() as tx:
            tx.card_settle_attempt(a.id, success, t, 3, 300)

    def state() -> tuple[int, float]:
        with store.read() as r:
            card = r.card_get(a.id)
        assert card is not None
        return card.failures, card.locked_until

    assert [reserve(now) for _ in range(4)] == [1, 2, 3, None]  # quota: threshold in flight
    assert reserve(now, "no such card") is None
    settle(False, now)
    settle(False, now)
    assert reserve(now) is None  # 2 failed + 1 in flight fill the quota of 3
    settle(False, now)  # the 3rd failure locks for 1 s
    assert state() == (3, now + 1)
    assert reserve(now + 0.5) is None  # locked
    assert reserve(now + 1) == 4  # lock over: one attempt at a time
    assert reserve(now + 1) is None
    settle(False, now + 2)
    assert state() == (4, now + 2 + 2)
    assert reserve(now + 4) == 5
    # A reservation whose process died runs out with its lease: the next one may go.
    assert reserve(now + 4 + 61) == 5
    settle(True, now + 66)
    assert state() == (0, 0)
    assert [reserve(now + 70) for _ in range(3)] == [1, 2, 3]
    for _ in range(40):  # the lock grows to max_seconds and stays there
        settle(False, now + 80)
    assert state() == (40, now + 80 + 300)


def test_parallel_reservations_never_exceed_the_quota(
    make_store: Callable[[], Store], store: Store
) -> None:
    # Many reservations at once from separate connection sets (as from workers or replicas):
    # exactly `threshold` are granted, each with its own count.
    a = new_card_row(store)
    got: list[int | None] = []
    lock = threading.Lock()

    def job(s: Store, i: int) -> None:
        for _ in range(5):
            with s.write() as tx:
                n = tx.card_reserve_attempt(a.id, 2000.0, 5, 2060.0)
            with lock:
                got.append(n)

    _in_parallel(make_store, job)
    granted = sorted(n for n in got if n is not None)
    assert granted == [1, 2, 3, 4, 5], got


def test_master_key_step_rewraps_cards_of_an_earlier_schema(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database left just before the master-key step, holding cards: that step
    # rewrites every wrapped_key through card_rewrap, and refuses to run without it.
    from pkcs11ws.server import pg_store, sqlite_store

    module: Any = sqlite_store if store.scheme == "sqlite" else pg_store
    if store.scheme == "sqlite":
        cfg = StoreConfig(url=f"sqlite:///{tmp_path / 'v1.db'}")
    else:
        cfg = StoreConfig(url=_new_db_like(store.cfg.url), pool_timeout=30)  # type: ignore[attr-defined]
    newest = module.SCHEMA_VERSION
    step = next(m for m in module.MIGRATIONS if m.run is not None and "master-key" in m.what)
    monkeypatch.setattr(module, "SCHEMA_VERSION", step.version - 1)
    old = store_mod.backend_class(cfg.url).open(cfg)
    try:
        old.migrate()
        cards = [new_card_row(old) for _ in range(3)]
    finally:
        old.close()
    monkeypatch.setattr(module, "SCHEMA_VERSION", newest)
    s = store_mod.backend_class(cfg.url).open(cfg)
    try:
        with pytest.raises(StoreError, match="master key"):
            s.migrate()
        assert s.schema_version() == step.version - 1  # nothing half done
        seen: list[str] = []

        def rewrap(card: str, inner: bytes) -> bytes:
            seen.append(card)
            return b"outer:" + card.encode() + b":" + inner

        assert s.migrate(card_rewrap=rewrap) == (step.version - 1, newest)
        assert sorted(seen) == sorted(c.id for c in cards)
        with s.read() as r:
            for c in cards:
                got = r.card_get(c.id)
                assert got is not None
                assert got.wrapped_key == b"outer:" + c.id.encode() + b":" + c.wrapped_key
        with s.write() as tx:  # the reservation columns are there
            assert tx.card_reserve_attempt(cards[0].id, 1.0, 3, 61.0) == 1
    finally:
        s.close()
