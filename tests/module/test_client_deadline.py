"""Issue 10, transport side: a call never outlives TIMEOUT, a refused client certificate is a
configuration error (no retry, one log line), C_Initialize warns about a client certificate that
expired or soon expires, and abort() ends calls in flight (for C_Finalize).

Real parts: the real key service over mutual TLS (conftest `service`), a closed port, a
listening socket this test holds open and never answers, client certificates issued by the
service's own CA (expired, expiring) and by a foreign CA, and the module loaded through ctypes.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import glob
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycurl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkcs11ws import constants as C
from pkcs11ws.client import KeyServiceClient
from pkcs11ws.client.api import REJECTED
from pkcs11ws.client.certinfo import expiry_warning, validity
from pkcs11ws.client.transport import BASE_HEADERS
from pkcs11ws.config import load_config
from pkcs11ws.errors import CertificateRejected, Finalizing, TransportError
from pkcs11ws.log import Logger
from pkcs11ws.protocol import HEALTH_PATH
from tests.support.p11ctypes import CK_ULONG


def make_client(svc: Any, log: Path, **overrides: object) -> KeyServiceClient:
    env = {f"PKCS11WS_{k.upper()}": str(v) for k, v in overrides.items()}
    env.setdefault("PKCS11WS_LOGLEVEL", "3")
    env["PKCS11WS_LOGFILEPATH"] = str(log)
    cfg = load_config(str(svc.client_cfg), environ=env)
    logger = Logger()
    logger.configure(cfg)
    return KeyServiceClient(cfg, logger)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def issue(
    d: Path, name: str, *, ca: Path | None, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[Path, Path]:
    """A client certificate and key in d: signed by the CA whose files are ca/ca.pem and
    ca/ca.key (the service's dev PKI), or by a throw-away foreign CA when ca is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    if ca is None:
        issuer_key = ec.generate_private_key(ec.SECP256R1())
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
    else:
        loaded = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)  # the dev PKI's CA key
        issuer_key = loaded
        issuer = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes()).subject
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    pem, kp = d / f"{name}.pem", d / f"{name}.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(kp, 0o600)
    clients = ca.parent / "clients.yaml" if ca is not None else None
    if clients is not None and clients.exists():
        # The service serves only identities its clients file lists: register this one (the
        # service re-reads the file when an unknown certificate connects after it changed).
        from pkcs11ws.server import identity

        fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        identity.add_client(clients, f"{name}-{os.urandom(4).hex()}", "app", fp)
    return pem, kp


NOW = dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------------------------
# The deadline


def test_deadline_against_a_closed_port(service, tmp_path: Path) -> None:
    # MAXRETRIES 256 x RETRYDELAY 1 would be minutes; TIMEOUT 3 ends the call within 3 s.
    log = tmp_path / "p11.log"
    c = make_client(service, log, port=free_port(), maxretries=256, retrydelay=1, timeout=3)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as ei:
        c.health()
    elapsed = time.monotonic() - t0
    c.close()
    assert ei.value.ckr == C.CKR_DEVICE_ERROR
    assert elapsed < 3 + 2, elapsed  # margin for a loaded machine; never the minutes of retries
    text = log.read_text()
    # The retries that fit were made (a restarting service comes back within seconds) ...
    assert "retry 1/256 in 1s" in text and "Couldn't connect to server" in text
    # ... and the last one that could not start before the deadline was not waited for.
    assert "no retry within TIMEOUT 3s" in ei.value.message
    assert 2 <= c.stats()["requests"] <= 4


def test_deadline_against_a_service_that_never_answers(service, tmp_path: Path) -> None:
    # A socket that accepts TCP (the kernel's backlog does) but never says a word.
    with socket.socket() as hold:
        hold.bind(("127.0.0.1", 0))
        hold.listen(16)
        log = tmp_path / "p11.log"
        c = make_client(
            service,
            log,
            port=hold.getsockname()[1],
            maxretries=5,
            retrydelay=0,
            timeout=2,
            connecttimeout=60,
        )
        t0 = time.monotonic()
        with pytest.raises(TransportError) as ei:
            c.random(8)
        elapsed = time.monotonic() - t0
        c.close()
    assert ei.value.ckr == C.CKR_DEVICE_ERROR
    assert 1.5 <= elapsed < 2 + 2, elapsed
    assert "timed out" in ei.value.message.lower() or "timeout" in ei.value.message.lower()


def test_abort_ends_a_hung_call_and_a_retry_wait(service, tmp_path: Path) -> None:
    with socket.socket() as hold:
        hold.bind(("127.0.0.1", 0))
        hold.listen(16)
        hung = make_client(
            service, tmp_path / "a.log", port=hold.getsockname()[1], timeout=600, connecttimeout=600
        )
        waiting = make_client(
            service,
            tmp_path / "b.log",
            port=free_port(),
            maxretries=10,
            retrydelay=600,
            timeout=3600,
        )
        errors: dict[str, BaseException] = {}

        def run(name: str, client: KeyServiceClient) -> None:
            try:
                client.health()
            except BaseException as e:
                errors[name] = e

        threads = [
            threading.Thread(target=run, args=a) for a in (("hung", hung), ("waiting", waiting))
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)  # one is inside perform(), the other sleeping before its retry
        assert all(t.is_alive() for t in threads)
        t0 = time.monotonic()
        hung.abort()
        waiting.abort()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert time.monotonic() - t0 < 5
        for name in ("hung", "waiting"):
            e = errors[name]
            assert isinstance(e, Finalizing) and e.ckr == C.CKR_CRYPTOKI_NOT_INITIALIZED, (name, e)
        # Later calls fail at once, without the network.
        before = hung.stats()["requests"]
        with pytest.raises(Finalizing):
            hung.health()
        assert hung.stats()["requests"] == before
        hung.close()
        waiting.close()


# --------------------------------------------------------------------------------------------
# A client certificate the service refuses


@pytest.mark.parametrize("kind", ["foreign CA", "expired"])
def test_refused_client_certificate_is_a_configuration_error(
    service, tmp_path: Path, kind: str
) -> None:
    if kind == "expired":
        cert, key = issue(
            tmp_path,
            "expired",
            ca=service.ca.parent,
            not_before=NOW - dt.timedelta(days=60),
            not_after=NOW - dt.timedelta(days=1),
        )
    else:
        cert, key = issue(
            tmp_path,
            "foreign",
            ca=None,
            not_before=NOW - dt.timedelta(days=1),
            not_after=NOW + dt.timedelta(days=300),
        )
    log = tmp_path / "p11.log"
    c = make_client(service, log, cert=cert, key=key, maxretries=5, retrydelay=10)
    t0 = time.monotonic()
    with pytest.raises(CertificateRejected) as ei:
        c.health()
    assert time.monotonic() - t0 < 5  # no RETRYDELAY waited
    assert ei.value.ckr == C.CKR_GENERAL_ERROR
    assert REJECTED in ei.value.message
    # One attempt plus one confirmation on a new connection; no retry.
    assert c.stats()["requests"] == 2
    lines = log.read_text().splitlines()
    assert [ln for ln in lines if "retry" in ln] == []
    refused = [ln for ln in lines if REJECTED in ln]
    assert len(refused) == 1 and " ERROR " in refused[0] and str(cert) in refused[0]
    if kind == "expired":
        assert "expired on" in refused[0]
    c.close()
    # The certificate of the configuration is accepted by the same service.
    good = make_client(service, tmp_path / "good.log", maxretries=0)
    assert good.health()["status"] == "ok"
    good.close()


def test_untrusted_service_is_not_called_a_refused_client(service, tmp_path: Path) -> None:
    # The other way round (the service is not signed by AUTH): libcurl's own verification
    # error, never retried, never blamed on the client certificate.
    _, _ = issue(tmp_path, "x", ca=None, not_before=NOW, not_after=NOW + dt.timedelta(days=1))
    other_ca = tmp_path / "x.pem"
    log = tmp_path / "p11.log"
    c = make_client(service, log, auth=other_ca, maxretries=5, retrydelay=10)
    with pytest.raises(TransportError) as ei:
        c.health()
    assert not isinstance(ei.value, CertificateRejected)
    assert c.stats()["requests"] == 1
    assert REJECTED not in log.read_text()
    c.close()


# --------------------------------------------------------------------------------------------
# The expiry warning at C_Initialize


def test_certificate_reader_agrees_with_cryptography(tmp_path: Path) -> None:
    paths = sorted(glob.glob("/usr/share/ca-certificates/mozilla/*.crt"))[:60]
    start = dt.datetime(1999, 12, 31, 23, 59, 58, tzinfo=dt.UTC)
    end = dt.datetime(2061, 3, 1, 0, 0, 1, tzinfo=dt.UTC)
    far = issue(tmp_path, "far", ca=None, not_before=start, not_after=end)[0]
    paths.append(str(far))  # GeneralizedTime after 2049, UTCTime before
    for path in paths:
        pem = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        expected = (
            int(cert.not_valid_before_utc.timestamp()),
            int(cert.not_valid_after_utc.timestamp()),
        )
        assert validity(pem) == expected, path
    assert validity(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n") is None
    assert validity(b"not a certificate") is None


def test_expiry_warning_texts(tmp_path: Path) -> None:
    soon, _ = issue(
        tmp_path,
        "soon",
        ca=None,
        not_before=NOW - dt.timedelta(days=300),
        not_after=NOW + dt.timedelta(days=10, hours=1),
    )
    later, _ = issue(
        tmp_path,
        "later",
        ca=None,
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=31),
    )
    gone, _ = issue(
        tmp_path,
        "gone",
        ca=None,
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(hours=1),
    )
    now = time.time()
    assert "expires on" in (expiry_warning(str(soon), now) or "")
    assert "(in 10 days)" in (expiry_warning(str(soon), now) or "")
    assert expiry_warning(str(later), now) is None
    assert "expired on" in (expiry_warning(str(gone), now) or "")
    assert expiry_warning(str(tmp_path / "missing.pem"), now) is None


def write_cfg(svc: Any, path: Path, **settings: object) -> Path:
    lines = [
        ln
        for ln in svc.client_cfg.read_text().splitlines()
        if not ln.strip() or ln.split()[0].lower() not in settings
    ]
    path.write_text("\n".join(lines + [f"{k.upper()} {v}" for k, v in settings.items()]) + "\n")
    return path


def test_c_initialize_warns_about_an_expiring_certificate(
    bare_mod, service, tmp_path: Path
) -> None:
    cert, key = issue(
        tmp_path,
        "expiring",
        ca=service.ca.parent,
        not_before=NOW - dt.timedelta(days=300),
        not_after=NOW + dt.timedelta(days=12, hours=1),
    )
    log = tmp_path / "module.log"
    cfg = write_cfg(service, tmp_path / "p11.cfg", cert=cert, key=key, loglevel=3, logfilepath=log)
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    lines = [ln for ln in log.read_text().splitlines() if " WARNING " in ln]
    assert len(lines) == 1 and "C_Initialize: CERT" in lines[0] and "(in 12 days)" in lines[0]
    assert "libpkcs11ws: C_Initialize" in lines[0]  # the seed's log format
    # Still valid: the module works.
    n = CK_ULONG(0)
    assert bare_mod.call("C_GetSlotList", 1, None, ctypes.byref(n)) == C.CKR_OK


def test_c_initialize_warns_about_an_expired_certificate_then_calls_say_refused(
    bare_mod, service, tmp_path: Path
) -> None:
    cert, key = issue(
        tmp_path,
        "expired",
        ca=service.ca.parent,
        not_before=NOW - dt.timedelta(days=300),
        not_after=NOW - dt.timedelta(days=2),
    )
    log = tmp_path / "module.log"
    cfg = write_cfg(
        service,
        tmp_path / "p11.cfg",
        cert=cert,
        key=key,
        loglevel=3,
        maxretries=5,
        retrydelay=10,
        logfilepath=log,
    )
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    text = log.read_text()
    assert "C_Initialize: CERT" in text and "expired on" in text
    n = CK_ULONG(0)
    t0 = time.monotonic()
    assert bare_mod.call("C_GetSlotList", 1, None, ctypes.byref(n)) == C.CKR_GENERAL_ERROR
    assert time.monotonic() - t0 < 5
    text = log.read_text()
    assert text.count(REJECTED) == 1 and "retry" not in text


def test_a_handles_timeout_is_reset_only_when_it_would_outlive_the_request_or_lag_a_step(
    service: Any, tmp_path: Path
) -> None:
    # A request with a deadline (every batch request) sets the handle's timeouts only when
    # they would outlive the time left or fall more than a step (TIMEOUT/64) below it, and
    # then to the time left rounded down to a step: the deadline moves by the microsecond
    # from one request to the next, a setopt pair costs per request.
    c = make_client(service, tmp_path / "log", maxretries=0, timeout=8, connecttimeout=10)
    try:
        t = c.transport
        step = t._step_ms
        assert step == 8000 // 64
        assert t.request("GET", HEALTH_PATH, None, BASE_HEADERS)[0] == 200
        (conn,) = t.servers[0].idle
        assert conn.timeout_ms == 8000
        sets: list[tuple[int, int]] = []
        setopt = conn.curl.setopt

        def counting(option: int, value: Any) -> None:
            if option in (pycurl.TIMEOUT_MS, pycurl.CONNECTTIMEOUT_MS):
                sets.append((option, value))
            setopt(option, value)

        conn.curl = _Recording(conn.curl, counting)
        for _ in range(3):  # the full TIMEOUT left: 8 s would outlive it by a fraction of a ms
            assert t.request("GET", HEALTH_PATH, None, BASE_HEADERS, time.monotonic() + 8)[0] == 200
        assert sets == [(pycurl.TIMEOUT_MS, 8000 - step), (pycurl.CONNECTTIMEOUT_MS, 8000 - step)]
        assert conn.timeout_ms == 8000 - step  # set once, then kept
        sets.clear()
        assert t.request("GET", HEALTH_PATH, None, BASE_HEADERS)[0] == 200  # no deadline: kept
        assert sets == []
        # 2 s left: the handle's 8 s would outlive it; set to the time left, a step down.
        deadline = time.monotonic() + 2
        assert t.request("GET", HEALTH_PATH, None, BASE_HEADERS, deadline)[0] == 200
        assert len(sets) == 2 and 2000 - 2 * step < conn.timeout_ms <= 2000
        assert conn.timeout_ms % step == 0
        sets.clear()
        for _ in range(3):  # the same deadline, a few ms later: kept
            assert t.request("GET", HEALTH_PATH, None, BASE_HEADERS, deadline)[0] == 200
        assert sets == []
        # A request without a deadline gets TIMEOUT again (the 2 s are more than a step below).
        assert t.request("GET", HEALTH_PATH, None, BASE_HEADERS)[0] == 200
        assert sets == [(pycurl.TIMEOUT_MS, 8000), (pycurl.CONNECTTIMEOUT_MS, 8000)]
        assert conn.timeout_ms == 8000
    finally:
        c.close()


class _Recording:
    """A pycurl handle whose setopt goes through `setopt` (the rest is the handle's)."""

    def __init__(self, curl: Any, setopt: Callable[[int, Any], None]) -> None:
        self._curl, self.setopt = curl, setopt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._curl, name)
