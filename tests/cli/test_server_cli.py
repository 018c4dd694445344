"""pkcs11ws-server init / serve: files written, mutual TLS, curl, workers, SIGTERM, logging."""

from __future__ import annotations

import http.client
import ipaddress
import re
import shutil
import socket
import ssl
import stat
import subprocess
import time
import uuid
import warnings

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pkcs11ws import protocol
from pkcs11ws.server import settings
from tests.support.service import SCRYPT_N_TESTS, Api, b64, free_port, init_dir, new_idem


def test_init_writes_pki_and_configs(tmp_path):
    d = tmp_path / "kit"
    res = init_dir(d, 18123)
    assert res.returncode == 0, res.stderr
    pki = d / "pki"
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((d / "master.key").stat().st_mode) == 0o600
    assert len((d / "master.key").read_bytes()) == 32
    assert (d / "log").is_dir()

    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((pki / "client.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert in (server, client):
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku

    cfg = (d / "pkcs11webservices.cfg").read_text()
    lines = dict(
        line.split(None, 1) for line in cfg.splitlines() if line and not line.startswith("#")
    )
    root = str(d.resolve())
    assert lines == {
        "HOST": "127.0.0.1",
        "PORT": "18123",
        "CERT": f"{root}/pki/client.pem",
        "KEY": f"{root}/pki/client.key",
        "AUTH": f"{root}/pki/ca.pem",
        "LOGLEVEL": "4",
        "LOGSTDOUT": "0",
        "LOGFILEPATH": f"{root}/log/pkcs11webservices.log",
        "MAXRETRIES": "5",
        "RETRYDELAY": "1",
    }
    s = settings.load(d / "server.yaml")
    assert (s.port, s.workers, s.max_body, s.activation_ttl) == (18123, 1, 8 << 20, 8 * 3600)
    assert s.database_path == d.resolve() / "keys.db"
    assert s.tls_ca == d.resolve() / "pki" / "ca.pem"
    assert s.scrypt.n == SCRYPT_N_TESTS
    assert s.database_synchronous == "FULL"


def test_init_refuses_overwrite_without_force(tmp_path):
    d = tmp_path / "kit"
    assert init_dir(d, 18124).returncode == 0
    ca, master = (d / "pki" / "ca.pem").read_bytes(), (d / "master.key").read_bytes()
    client = (d / "pki" / "client.pem").read_bytes()
    res = init_dir(d, 18125)
    assert res.returncode != 0
    assert "--force" in res.stderr
    assert (d / "pki" / "ca.pem").read_bytes() == ca
    assert "PORT 18124" in (d / "pkcs11webservices.cfg").read_text()
    # --force rewrites the configuration files but never replaces the CA or the master key.
    res = init_dir(d, 18125, "--force")
    assert res.returncode == 0, res.stderr
    assert "kept" in res.stdout
    assert "PORT 18125" in (d / "pkcs11webservices.cfg").read_text()
    assert (d / "pki" / "ca.pem").read_bytes() == ca
    assert (d / "pki" / "client.pem").read_bytes() == client
    assert (d / "master.key").read_bytes() == master
    assert settings.load(d / "server.yaml").port == 18125


def test_init_replaces_ca_and_master_key_only_when_told(tmp_path):
    d = tmp_path / "kit"
    assert init_dir(d, 18127).returncode == 0
    ca, master = (d / "pki" / "ca.pem").read_bytes(), (d / "master.key").read_bytes()
    # A lone master key or CA (no server.yaml) is refused too: init never replaces either.
    (d / "server.yaml").unlink()
    res = init_dir(d, 18127)
    assert res.returncode != 0
    assert "--replace-ca-and-master-key" in res.stderr
    assert (d / "master.key").read_bytes() == master
    assert not (d / "server.yaml").exists()
    res = init_dir(d, 18127, "--replace-ca-and-master-key")
    assert res.returncode == 0, res.stderr
    assert (d / "pki" / "ca.pem").read_bytes() != ca
    assert (d / "master.key").read_bytes() != master
    assert stat.S_IMODE((d / "master.key").stat().st_mode) == 0o600


def test_init_admin_port(tmp_path):
    d = tmp_path / "kit"
    assert init_dir(d, 18128, "--admin-port", "18200").returncode == 0
    assert settings.load(d / "server.yaml").admin_port == 18200
    res = init_dir(tmp_path / "k2", 18129, "--admin-port", "18129")
    assert res.returncode != 0
    assert "two different ports" in res.stderr


def test_settings_relative_paths_and_defaults(tmp_path):
    (tmp_path / "server.yaml").write_text(
        "tls: {cert: pki/s.pem, key: pki/s.key, ca: pki/ca.pem}\ndatabase: {path: db/k.db}\n"
    )
    s = settings.load(tmp_path / "server.yaml")
    assert s.tls_cert == tmp_path.resolve() / "pki" / "s.pem"
    assert s.database_path == tmp_path.resolve() / "db" / "k.db"
    assert s.master_key == tmp_path.resolve() / "master.key"
    assert (s.port, s.scrypt.n, s.scrypt.r, s.scrypt.p) == (18001, 2**15, 8, 1)
    (tmp_path / "bad.yaml").write_text("tls: {cert: a, key: b, ca: c}\nport: 'x'\n")
    with pytest.raises(settings.SettingsError):
        settings.load(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("tls: {cert: a, key: b, ca: c}\nsurprise: 1\n")
    with pytest.raises(settings.SettingsError, match="surprise"):
        settings.load(tmp_path / "bad2.yaml")


def test_serve_rejects_bad_config(tmp_path):
    (tmp_path / "server.yaml").write_text("tls: {cert: nope.pem, key: nope.key, ca: ca.pem}\n")
    res = subprocess.run(
        [*_cli(), "serve", "--config", str(tmp_path / "server.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2
    assert "does not exist" in res.stderr


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "pkcs11ws.server.cli"]


def _raw_tls(service, ctx: ssl.SSLContext) -> bytes:
    """Handshake and one request on a raw socket; returns what the server sent back."""
    with (
        socket.create_connection(("127.0.0.1", service.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return tls.recv(4096)


def test_tls_requires_client_certificate(service):
    ctx = ssl.create_default_context(cafile=str(service.ca))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        data = _raw_tls(service, ctx)
        if not data:  # TLS 1.3: the server may simply close after rejecting the certificate
            raise ConnectionError("closed")
    ctx12 = ssl.create_default_context(cafile=str(service.ca))
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_tls(service, ctx12)


def test_tls_rejects_client_certificate_from_another_ca(service, tmp_path):
    other = tmp_path / "other"
    assert init_dir(other, 18126).returncode == 0
    ctx = ssl.create_default_context(cafile=str(service.ca))
    ctx.load_cert_chain(str(other / "pki" / "client.pem"), str(other / "pki" / "client.key"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        data = _raw_tls(service, ctx)
        if not data:
            raise ConnectionError("closed")
    # And the server's own certificate is not trusted by the other PKI's CA.
    ctx2 = ssl.create_default_context(cafile=str(other / "pki" / "ca.pem"))
    ctx2.load_cert_chain(str(service.cert), str(service.key))
    with pytest.raises(ssl.SSLCertVerificationError):
        _raw_tls(service, ctx2)


def test_tls_refuses_tls_1_1(service):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(service.ca))
    ctx.load_cert_chain(str(service.cert), str(service.key))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_tls(service, ctx)


def test_health_and_access_log(service, api):
    r = api.get("/health")
    assert r.status == 200
    assert r.json == {"status": "ok", "version": "0.1.0", "protocol": protocol.VERSION}
    assert r.headers["content-type"] == "application/json"
    marker = uuid.uuid4().hex
    r = api.get(f"/km/v1/softcards/{marker}")
    assert r.status == 404
    deadline = time.monotonic() + 5
    while f"GET /km/v1/softcards/{marker} 404" not in service.log_text():
        assert time.monotonic() < deadline, service.log_text()[-2000:]
        time.sleep(0.05)
    line = next(x for x in service.log_text().splitlines() if marker in x)
    assert re.search(r"GET /km/v1/softcards/\w+ 404 \d+\.\d+ms$", line), line
    # A percent-encoded newline in the path cannot start a forged log line.
    forged = uuid.uuid4().hex
    assert api.get(f"/x%0A{forged}%20INFO%20fake").status == 404
    deadline = time.monotonic() + 5
    while forged not in service.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not any(x.startswith(forged) for x in service.log_text().splitlines())


def test_openapi_document(api):
    r = api.get(protocol.OPENAPI_PATH)
    assert r.status == 200
    doc = r.json
    assert "openapi" in doc
    for ep in protocol.ENDPOINTS:
        assert ep.path in doc["paths"], ep.path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_and_without_client_certificate(service):
    base = ["curl", "-sS", "--cacert", str(service.ca), "--max-time", "20"]
    mtls = [*base, "--cert", str(service.cert), "--key", str(service.key)]
    res = subprocess.run(
        [*mtls, f"https://localhost:{service.port}/health"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert '"status":"ok"' in res.stdout
    name = "curl" + uuid.uuid4().hex[:12]
    body = f'{{"name": "{name}", "passphrase": "{b64(b"from curl")}"}}'
    res = subprocess.run(
        [
            *mtls,
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Idempotency-Key: {new_idem()}",
            "--data",
            body,
            "-w",
            "\n%{http_code}",
            f"https://127.0.0.1:{service.port}/km/v1/softcards",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out, code = res.stdout.rsplit("\n", 1)
    assert code == "200"
    assert f'"name":"{name}"' in out
    # No client certificate: the TLS handshake fails (TLS 1.2: during it; TLS 1.3: the server
    # aborts right after it), and no HTTP answer ever arrives.
    res = subprocess.run(
        [*base, f"https://localhost:{service.port}/health"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode != 0
    assert '"status"' not in res.stdout
    res = subprocess.run(
        [*base, "--tls-max", "1.2", f"https://localhost:{service.port}/health"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 35, (res.returncode, res.stderr)  # CURLE_SSL_CONNECT_ERROR


def test_workers_share_one_store(fresh_service, make_api):
    svc = fresh_service(workers=2)
    api = make_api(svc)
    card, token = api.new_card(b"two workers")
    key = api.import_key(card, token, 0x2B, b"k" * 32)
    pids: set[str] = set()
    # A fresh connection per request so the kernel hands them to either worker.
    for i in range(40):
        api.close()
        r = api.post(
            "/crypto/v1/sign",
            {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"%d" % i)},
            token=token,
        )
        assert r.status == 200, r.body
    deadline = time.monotonic() + 5
    while True:
        pids = set(
            re.findall(
                r" (\d+) INFO pkcs11ws\.server\.access: POST /crypto/v1/sign 200", svc.log_text()
            )
        )
        if len(pids) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(pids) == 2, "requests did not reach both workers"
    # Deactivation through one worker ends the session for every worker.
    api.close()
    assert api.post(f"/km/v1/softcards/{card}/deactivate", token=token).status == 200
    for _ in range(10):
        api.close()
        r = api.post(
            "/crypto/v1/sign",
            {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"x")},
            token=token,
        )
        assert r.status == 401 and r.code == "NOT_ACTIVATED"


def test_short_lifetimes_body_limit_and_sigterm(fresh_service, make_api):
    svc = fresh_service(overrides={"activation_ttl": 2, "idempotency_ttl": 2, "max_body": 4096})
    api: Api = make_api(svc)
    card, token = api.new_card(b"short lived")
    t0 = time.monotonic()
    idem = new_idem()
    tmpl = {"attrs": {"CKA_CLASS": 0, "CKA_LABEL": b64(b"short-lived")}}
    first = api.post(f"/km/v1/softcards/{card}/objects", tmpl, token=token, idem=idem)
    assert first.status == 200
    again = api.post(f"/km/v1/softcards/{card}/objects", tmpl, token=token, idem=idem)
    assert again.body == first.body

    # Content-Length over the limit: refused before the body is read.
    conn = http.client.HTTPSConnection("127.0.0.1", svc.port, context=api.ctx, timeout=10)
    conn.putrequest("POST", "/crypto/v1/random")
    conn.putheader("Content-Length", "5000")
    conn.endheaders()
    raw = conn.getresponse()
    assert raw.status == 413 and b"BODY_TOO_LARGE" in raw.read()
    conn.close()
    # Chunked (no Content-Length): refused on the streamed length.
    conn = http.client.HTTPSConnection("127.0.0.1", svc.port, context=api.ctx, timeout=10)
    conn.request(
        "POST", "/crypto/v1/random", body=iter([b" " * 3000, b" " * 3000]), encode_chunked=True
    )
    raw = conn.getresponse()
    assert raw.status == 413 and b"BODY_TOO_LARGE" in raw.read()
    conn.close()
    # Just under the limit is fine.
    padded = b'{"length": 16}' + b" " * 4000
    assert api.post("/crypto/v1/random", padded).status == 200

    time.sleep(max(0.0, 2.2 - (time.monotonic() - t0)))
    r = api.post(f"/km/v1/softcards/{card}/objects/search", {"attrs": {}}, token=token)
    assert r.status == 401 and r.code == "NOT_ACTIVATED"
    assert "expired" in r.json["message"]
    token = api.activate(card, b"short lived")
    # The idempotency record expired: the same key now makes a second object.
    later = api.post(f"/km/v1/softcards/{card}/objects", tmpl, token=token, idem=idem)
    assert later.status == 200 and later.json["handle"] != first.json["handle"]

    api.close()
    assert svc.stop() == 0
    text = svc.log_text()
    assert "Application shutdown complete" in text
    assert "Traceback" not in text


def test_lockout_state_is_in_the_store(fresh_service, make_api):
    """Wrong passphrases counted by one service process hold for the next one on that store."""
    svc = fresh_service()
    api = make_api(svc)
    card, _ = api.new_card(b"right passphrase")
    for _ in range(5):
        r = api.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(b"wrong")})
        assert r.code == "PASSPHRASE_INCORRECT"
    api.close()
    assert svc.stop() == 0
    port = free_port()
    doc = yaml.safe_load(svc.server_yaml.read_text())
    doc["lockout"]["max_seconds"] = 300
    svc.server_yaml.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [*_cli(), "serve", "--config", str(svc.server_yaml), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        svc.port, svc.pid, svc.proc = port, proc.pid, proc
        api2 = make_api(svc)
        deadline = time.monotonic() + 20
        while True:
            try:
                if api2.get("/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
            assert time.monotonic() < deadline
        r = api2.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(b"wrong")})
        # The 5th failure locked the card for a second; whether or not that second has passed,
        # the count (5) survived the restart: this 6th failure is not a first one.
        if r.code == "PASSPHRASE_INCORRECT":
            r = api2.post(
                f"/km/v1/softcards/{card}/activate", {"passphrase": b64(b"right passphrase")}
            )
        assert r.code == "PASSPHRASE_LOCKED", r.body
    finally:
        svc.stop()
