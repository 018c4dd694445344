"""Revocation without a restart: SIGHUP reloads the clients file (deny list) and the CRL in every
worker; a kept-alive connection of a revoked identity is refused on its next request, and the
service (its supervisor and workers) keeps running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from tests.support.service import Api, Service, issue_client

CARDS = "/km/v1/softcards"


def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_deny_list_and_sighup_with_two_workers(fresh_service, tmp_path: Path) -> None:
    svc: Service = fresh_service(workers=2)
    name = "carol-" + uuid.uuid4().hex[:6]
    d = issue_client(svc, name, tmp_path / "carol")
    # Several kept-alive connections, so both workers hold one of carol's.
    apis = [Api(svc, d / "client.pem", d / "client.key") for _ in range(6)]
    admin = Api(svc)
    try:
        for api in apis:
            assert api.get(CARDS).status == 200
        conns = [api.conn for api in apis]
        # Revoke: the fingerprint goes on the deny list; nothing happens until SIGHUP.
        clients = svc.dir / "clients.yaml"
        doc = yaml.safe_load(clients.read_text())
        doc["deny"] = [doc["clients"][name]["fingerprints"][0]]
        clients.write_text(yaml.safe_dump(doc))
        os.kill(svc.pid, signal.SIGHUP)

        def all_refused() -> bool:
            codes = [api.get(CARDS).code for api in apis]
            return all(c == "CLIENT_NOT_AUTHORIZED" for c in codes)

        assert _until(all_refused), "a kept connection of the revoked identity still served"
        # The same connections (no reconnect happened), refused on their next request.
        assert [api.conn for api in apis] == conns
        # The service lives on, the same supervisor, and serves the others.
        assert svc.proc.poll() is None
        assert admin.get(CARDS).status == 200
        fresh = Api(svc, d / "client.pem", d / "client.key")
        assert fresh.get("/health").code == "CLIENT_NOT_AUTHORIZED"
        fresh.close()
        lines = (svc.dir / "log" / "audit.log").read_text()
        assert '"code":"CLIENT_NOT_AUTHORIZED"' in lines
        assert lines.count('"op":"reload"') == 2  # one line per worker
        assert "reloaded (SIGHUP)" in svc.log_text()
    finally:
        for api in [*apis, admin]:
            api.close()


def _crl(svc: Service, serials: list[int]) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key = serialization.load_pem_private_key((svc.dir / "pki" / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(svc.ca.read_bytes())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
    )
    for serial in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    tmp = svc.dir / "ca.crl.tmp"
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(svc.dir / "ca.crl")


def test_crl_revokes_by_serial_on_sighup(fresh_service, tmp_path: Path) -> None:
    from cryptography import x509

    svc: Service = fresh_service()
    # server.yaml is read at start-up: switch the CRL on with a restart on the same folder.
    svc.stop()
    _crl(svc, [])
    doc = yaml.safe_load(svc.server_yaml.read_text())
    doc["crl"] = "ca.crl"
    svc.server_yaml.write_text(yaml.safe_dump(doc))
    log = svc.dir / "log" / "server2.out"
    cmd = [sys.executable, "-m", "pkcs11ws.server.cli", "serve", "--config", str(svc.server_yaml)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    admin = Api(svc)
    d = issue_client(svc, "dave-" + uuid.uuid4().hex[:6], tmp_path / "dave")
    api = Api(svc, d / "client.pem", d / "client.key")
    try:

        def up() -> bool:
            try:
                return admin.get("/health").status == 200
            except OSError:
                return False

        assert _until(up), log.read_text()
        assert api.get(CARDS).status == 200
        cert = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
        _crl(svc, [cert.serial_number])
        os.kill(proc.pid, signal.SIGHUP)
        assert _until(lambda: api.get(CARDS).code == "CLIENT_NOT_AUTHORIZED"), log.read_text()
        assert admin.get(CARDS).status == 200 and proc.poll() is None
    finally:
        api.close()
        admin.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
