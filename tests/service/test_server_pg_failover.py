"""A PostgreSQL primary switch: the key service follows the database to its new primary.

Two real PostgreSQL 15 clusters on this machine: a primary and a streaming-replication standby
cloned from it (pg_basebackup -R). The key service's store URL is a libpq multi-host URL with
target_session_attrs=read-write, as docs/postgresql.md recommends. The primary is stopped and the
standby promoted (what Patroni, repmgr or pg_auto_failover do): while there is no primary the
service answers 503 UNAVAILABLE; after the promotion it serves again from the new primary, with
the activations and objects made before the switch, without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pkcs11ws import constants as C
from tests.support.pg_util import PgServer
from tests.support.service import Api, b64, encode, new_idem, start_service

PASS = b"failover passphrase"


@pytest.fixture
def clusters() -> Iterator[tuple[PgServer, PgServer, str]]:
    primary = PgServer()
    made = [primary]
    try:
        db = primary.new_database().rsplit("/", 1)[1]
        standby = PgServer(standby_of=primary)
        made.append(standby)
        url = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{db}"
            "?target_session_attrs=read-write&connect_timeout=3"
        )
        yield primary, standby, url
    finally:
        for server in made:
            server.destroy()


def test_the_service_follows_a_promoted_standby(
    clusters: tuple[PgServer, PgServer, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    primary, standby, url = clusters
    svc = start_service(tmp_path_factory.mktemp("failover"), store=url)
    api = Api(svc)
    try:
        card = api.ok(
            api.post(
                "/km/v1/softcards", {"name": "failover", "passphrase": b64(PASS)}, idem=new_idem()
            )
        )["id"]
        token = api.activate(card, PASS)
        key = api.import_key(card, token, C.CKK_SHA256_HMAC, b"f" * 32, CKA_SIGN=True)
        sign = {"mechanism": "CKM_SHA256_HMAC", "key": key, "data": b64(b"before the switch")}
        before = api.ok(api.post("/crypto/v1/sign", sign, token=token))
        made = api.ok(
            api.post(
                f"/km/v1/softcards/{card}/objects",
                {"attrs": encode({"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": b"kept"})},
                token=token,
                idem=new_idem(),
            )
        )

        primary.stop()  # a fast shutdown sends the standby all of its WAL first
        r = api.post("/crypto/v1/sign", sign, token=token)
        assert (r.status, r.code) == (503, "UNAVAILABLE"), r.body  # a standby is not a primary

        standby.promote()
        deadline = time.monotonic() + 60
        while True:
            r = api.post("/crypto/v1/sign", sign, token=token)
            if r.status == 200 or time.monotonic() > deadline:
                break
            assert (r.status, r.code) == (503, "UNAVAILABLE"), r.body
            time.sleep(0.5)
        # Same activation, same key, same answer, now from the new primary.
        assert r.status == 200 and r.json == before
        kept = {"attrs": encode({"CKA_LABEL": b"kept"})}
        found = api.ok(api.post(f"/km/v1/softcards/{card}/objects/search", kept, token=token))
        assert [o["handle"] for o in found["objects"]] == [made["handle"]]
        # And it writes there.
        api.ok(
            api.post(
                f"/km/v1/softcards/{card}/objects",
                {"attrs": encode({"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": b"after"})},
                token=token,
                idem=new_idem(),
            )
        )
        assert "unavailable" in svc.log_text()
    finally:
        api.close()
        svc.stop()
