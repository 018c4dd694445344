"""The key hierarchy as an attacker with a copy of the disk would try it, over real mutual TLS.

- keys.db (with its WAL) copied without master.key opens nothing, even with the right
  passphrase: not offline (scrypt + AES-GCM by hand), not with the service code and another
  master key; and without its master key the service does not start.
- a v1 store (card keys wrapped under scrypt only) is migrated by steps 2 and 3 and every key
  works.
- a master key held by SoftHSM2 (python-pkcs11, key non-extractable) works end to end across a
  restart.
- state files are owner-only; the minimum passphrase length is enforced and configurable.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pkcs11ws import constants as C
from pkcs11ws.server import sealing, sqlite_store
from pkcs11ws.server.masterkey import FileMasterKey
from pkcs11ws.server.sealing import MasterKeys, SealError
from tests.support.dropin_util import snippet
from tests.support.service import b64, init_dir, new_idem, unb64

PASS = b"the right passphrase"
SIGN = "/crypto/v1/sign"
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")


def _sign(api, token, key, data=b"payload"):
    r = api.post(SIGN, {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(data)}, token=token)
    return unb64(api.ok(r)["signature"])


def _card_with_key(api):
    card, token = api.new_card(PASS)
    value = os.urandom(32)
    key = api.import_key(card, token, C.CKK_GENERIC_SECRET, value, CKA_SIGN=True)
    return card, token, key, value


def _copy_db(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(src) + suffix)
        if p.exists():
            shutil.copyfile(p, Path(str(dst) + suffix))


def _serve_exit(yaml_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pkcs11ws.server.cli", "serve", "--config", str(yaml_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_copied_store_without_master_key_yields_nothing(fresh_service, make_api, tmp_path):
    svc = fresh_service()
    api = make_api(svc)
    card, token, key, value = _card_with_key(api)
    mac = _sign(api, token, key)
    stolen = tmp_path / "stolen.db"
    _copy_db(svc.dir / "keys.db", stolen)  # while the service runs: the WAL holds the rows
    assert value not in b"".join(
        Path(str(stolen) + s).read_bytes() for s in ("", "-wal") if Path(str(stolen) + s).exists()
    )

    # Offline, with the right passphrase: scrypt gives the KEK, but what the store holds is
    # wrapped under the master key first, so neither the stored blob nor any part of it opens.
    con = sqlite3.connect(stolen)
    row = con.execute(
        "SELECT salt, kdf_n, kdf_r, kdf_p, wrapped_key FROM softcards WHERE id = ?", (card,)
    ).fetchone()
    secret = con.execute("SELECT secret FROM objects WHERE handle = ?", (key,)).fetchone()[0]
    con.close()
    salt, n, r, p, wrapped = row
    kek = sealing.kek(PASS, salt, n, r, p)
    for start in range(0, len(wrapped) - 28):
        with pytest.raises(SealError):
            sealing.unwrap_card_key(kek, wrapped[start:], card)
    # Another master key (a service of the attacker's own) does not remove the outer layer.
    other = MasterKeys(FileMasterKey(os.urandom(32)))
    with pytest.raises(SealError):
        other.unwrap_card(wrapped, card)
    # With the real master key the chain opens: the test above is not vacuous.
    real = MasterKeys(FileMasterKey((svc.dir / "master.key").read_bytes()))
    card_key = sealing.unwrap_card_key(kek, real.unwrap_card(wrapped, card), card)
    assert sealing.decrypt_value(card_key, key, secret) == value

    # The service code on the copy, with its own (different) master key: no activation.
    thief = tmp_path / "thief"
    res = init_dir(thief, 1, "--force")
    assert res.returncode == 0, res.stderr

    def plant(d: Path) -> None:
        _copy_db(stolen, d / "keys.db")

    svc2 = fresh_service(directory=thief, prepare=plant)
    api2 = make_api(svc2)
    r = api2.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(PASS)})
    assert r.status == 500 and r.code == "INTERNAL", r.body
    assert b"token" not in r.body
    assert "not wrapped under this service's master key" in svc2.log_text()
    api2.close()
    svc2.stop()

    # Without any master key the service refuses to start, and says why.
    (thief / "master.key").unlink()
    res = _serve_exit(thief / "server.yaml")
    assert res.returncode == 2
    assert "master key" in res.stderr and "does not exist" in res.stderr, res.stderr

    # The original service still signs as before.
    assert _sign(api, token, key) == mac


def test_state_files_are_owner_only(fresh_service, make_api):
    svc = fresh_service(overrides={"log": {"file": "log/service.log"}})
    api = make_api(svc)
    _card_with_key(api)
    d = svc.dir
    paths = {
        d: 0o700,
        d / "log": 0o700,
        d / "master.key": 0o600,
        d / "keys.db": 0o600,
        d / "keys.db-wal": 0o600,
        d / "keys.db-shm": 0o600,
        d / "log" / "service.log": 0o600,
        d / "pki" / "server.key": 0o600,
    }
    for p, mode in paths.items():
        assert stat.S_IMODE(p.stat().st_mode) == mode, (p, oct(p.stat().st_mode))


def test_existing_state_files_are_narrowed_and_loose_master_key_refused(fresh_service, make_api):
    svc = fresh_service()
    make_api(svc).new_card(PASS)
    assert svc.stop() == 0
    for s in ("", "-wal", "-shm"):
        p = Path(str(svc.dir / "keys.db") + s)
        if p.exists():
            p.chmod(0o644)
    (svc.dir / "master.key").chmod(0o644)
    res = _serve_exit(svc.server_yaml)
    assert res.returncode == 2 and "chmod 600" in res.stderr, res.stderr
    (svc.dir / "master.key").chmod(0o600)
    svc2 = fresh_service(directory=svc.dir)
    make_api(svc2).new_card(PASS)
    for s in ("", "-wal", "-shm"):
        p = Path(str(svc.dir / "keys.db") + s)
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_minimum_passphrase_length(fresh_service, make_api, api):
    def create(a, passphrase):
        body = {"name": "m" + os.urandom(6).hex(), "passphrase": b64(passphrase)}
        return a.post("/km/v1/softcards", body, idem=new_idem())

    r = create(api, b"7 bytes")
    assert (r.status, r.code) == (400, "PASSPHRASE_LEN_RANGE")
    assert "at least 8 bytes" in r.json["message"]
    assert create(api, b"8 bytes!").status == 200
    svc = fresh_service(overrides={"passphrase_min_length": 12})
    a = make_api(svc)
    r = create(a, b"11 bytes...")
    assert r.code == "PASSPHRASE_LEN_RANGE" and "at least 12 bytes" in r.json["message"]
    assert create(a, b"12 bytes....").status == 200


def _downgrade_to_v1(d: Path) -> list[bytes]:
    """Rewrite a store as the first release kept it: card keys wrapped under scrypt only,
    schema version 1. Returns the v1 blobs."""
    keys = MasterKeys(FileMasterKey((d / "master.key").read_bytes()))
    con = sqlite3.connect(d / "keys.db", isolation_level=None)
    blobs = []
    con.execute("BEGIN")
    for card_id, outer in con.execute("SELECT id, wrapped_key FROM softcards").fetchall():
        inner = keys.unwrap_card(outer, card_id)
        blobs.append(inner)
        con.execute("UPDATE softcards SET wrapped_key = ? WHERE id = ?", (inner, card_id))
    con.execute("UPDATE meta SET v = '1' WHERE k = 'schema'")
    for column in ("pending", "pending_until"):  # the master-key step's lockout columns
        con.execute(f"ALTER TABLE softcards DROP COLUMN {column}")
    # and what the identities' step 2 added (owners, grants, the identity of each session)
    con.execute("DROP INDEX softcards_owner")
    con.execute("ALTER TABLE softcards DROP COLUMN owner")
    con.execute("DROP TABLE grants")
    con.execute("ALTER TABLE sessions DROP COLUMN client")
    con.execute("COMMIT")
    con.close()
    con = sqlite3.connect(d / "keys.db")
    columns = [r[1] for r in con.execute("PRAGMA table_info(softcards)")]
    assert columns == [
        "id",
        "name",
        "created",
        "salt",
        "kdf_n",
        "kdf_r",
        "kdf_p",
        "wrapped_key",
        "failures",
        "locked_until",
    ]
    con.close()
    return blobs


def test_v1_store_is_migrated_without_passphrases(fresh_service, make_api):
    svc = fresh_service()
    api = make_api(svc)
    cards = [_card_with_key(api) for _ in range(3)]
    macs = [_sign(api, token, key) for _, token, key, _ in cards]
    api.close()
    assert svc.stop() == 0
    v1 = _downgrade_to_v1(svc.dir)
    # What the v1 code did: the passphrase alone opens a v1 card key.
    con = sqlite3.connect(svc.dir / "keys.db")
    for (card, *_), blob in zip(cards, v1, strict=True):
        salt, n, r, p = con.execute(
            "SELECT salt, kdf_n, kdf_r, kdf_p FROM softcards WHERE id = ?", (card,)
        ).fetchone()
        sealing.unwrap_card_key(sealing.kek(PASS, salt, n, r, p), blob, card)
    con.close()

    svc2 = fresh_service(directory=svc.dir)
    api2 = make_api(svc2)
    for (card, _, key, _), mac in zip(cards, macs, strict=True):
        token = api2.activate(card, PASS)
        assert _sign(api2, token, key) == mac
    con = sqlite3.connect(svc.dir / "keys.db")
    newest = str(sqlite_store.SCHEMA_VERSION)
    assert con.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()[0] == newest
    stored = [r[0] for r in con.execute("SELECT wrapped_key FROM softcards")]
    con.close()
    assert not set(stored) & set(v1)  # no scrypt-only blob is left on disk


@pytest.mark.skipif(not SOFTHSM.exists(), reason="SoftHSM2 is not installed")
def test_softhsm_master_key_end_to_end(fresh_service, make_api, tmp_path, monkeypatch):
    pkcs11 = pytest.importorskip("pkcs11")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))  # inherited by the service processes
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "pkcs11ws",
            "--pin",
            "4321",
            "--so-pin",
            "87654321",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pin = tmp_path / "hsm.pin"
    pin.write_text("4321")
    pin.chmod(0o600)
    # The README's server.yaml snippet, as written there (only the PIN file moved here).
    doc = yaml.safe_load(snippet("master-key-token", {"hsm.pin": str(pin)}))
    master = doc["master_pkcs11"]
    assert (master["module"], master["token"], master["key"]) == (
        str(SOFTHSM),
        "pkcs11ws",
        "pkcs11ws-master",
    )

    def to_token(d: Path) -> None:
        (d / "master.key").unlink()  # the file must play no part
        cmd = [
            sys.executable,
            "-m",
            "pkcs11ws.server.cli",
            "master-key",
            "--config",
            str(d / "server.yaml"),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0 and "created the master key" in res.stdout, res.stderr
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert again.returncode == 0 and "exists" in again.stdout

    svc = fresh_service(overrides={"master_pkcs11": master}, prepare=to_token)
    api = make_api(svc)
    card, token, key, _ = _card_with_key(api)
    mac = _sign(api, token, key)
    api.close()
    assert svc.stop() == 0

    # The key is in the token and cannot be read out of it.
    lib = pkcs11.lib(str(SOFTHSM))
    with lib.get_token(token_label="pkcs11ws").open(user_pin="4321") as session:
        k = session.get_key(label="pkcs11ws-master")
        assert k[pkcs11.Attribute.EXTRACTABLE] is False and k[pkcs11.Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.PKCS11Error):
            k[pkcs11.Attribute.VALUE]

    svc2 = fresh_service(directory=svc.dir)  # restart on the same store and token
    api2 = make_api(svc2)
    token2 = api2.activate(card, PASS)
    assert _sign(api2, token2, key) == mac
    api2.close()
    svc2.stop()

    # The token's key is the only way in: with it gone from the config, no start.
    doc = yaml.safe_load(svc.server_yaml.read_text())
    doc["master_pkcs11"]["key"] = "no-such-key"
    svc.server_yaml.write_text(yaml.safe_dump(doc))
    res = _serve_exit(svc.server_yaml)
    assert res.returncode == 2 and "no-such-key" in res.stderr, res.stderr


def test_settings_for_master_key_passphrase_and_connections(tmp_path):
    from pkcs11ws.server import settings

    tls = "tls: {cert: a, key: b, ca: c}\n"

    def load(text: str) -> settings.Settings:
        (tmp_path / "s.yaml").write_text(tls + text)
        return settings.load(tmp_path / "s.yaml")

    s = load("")
    assert (s.master_key, s.master_pkcs11) == (tmp_path.resolve() / "master.key", None)
    assert (s.passphrase_min_length, s.scrypt_concurrency) == (8, 2)
    assert (s.connections.max, s.connections.handshake_timeout) == (1000, 5)
    assert load("master_key: k/mk\n").master_key == tmp_path.resolve() / "k" / "mk"
    s = load("master_pkcs11: {module: /m.so, token: t, key: k, pin_file: pin}\n")
    assert s.master_key is None and s.master_pkcs11 is not None
    assert (s.master_pkcs11.token, s.master_pkcs11.key) == ("t", "k")
    assert s.master_pkcs11.pin_file == tmp_path.resolve() / "pin"
    s = load("passphrase_min_length: 12\nscrypt: {max_concurrent: 4}\nconnections: {max: 9}\n")
    assert (s.passphrase_min_length, s.scrypt_concurrency, s.connections.max) == (12, 4, 9)
    assert s.connections.max_headers == 100  # the other keys keep their defaults
    for bad, word in [
        ("master_pkcs11: {module: /m.so, token: t}\n", "master_pkcs11.key"),
        ("master_pkcs11: {module: m, token: t, key: k, pin_file: p, pin: '1'}\n", "pin"),
        ("master_key: {file: a}\n", "master_key"),
        ("passphrase_min_length: 0\n", "passphrase_min_length"),
        ("connections: {max: 0}\n", "connections.max"),
        ("connections: {idle: 3}\n", "idle"),
        ("scrypt: {max_concurrent: 0}\n", "scrypt.max_concurrent"),
    ]:
        with pytest.raises(settings.SettingsError, match=word):
            load(bad)
