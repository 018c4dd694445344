"""ckcheckinst against the real key service and module: a clean pass with the self-test, and each
failure it must name with its fix (missing config, wrong CA, expired certificates, mismatched
key, service down, wrong passphrase, unknown softcard, broken library), plus SoftHSM2."""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pkcs11ws.__main__ import module_path
from tests.support.service import free_port, init_dir
from tests.support.tools_util import (
    HSM_LABEL,
    HSM_PIN,
    SOFTHSM,
    activated_card,
    card_counts,
    clean_env,
    service_env,
    tool,
)


def check(*args: str, env: dict[str, str], stdin: str | None = None):
    return tool("ckcheckinst", *args, env=env, stdin=stdin)


def lines(out: str) -> dict[str, tuple[str, str]]:
    """check name -> (outcome, text) for every outcome line."""
    res = {}
    for ln in out.splitlines():
        m = re.match(r"^(OK|FAILED|SKIPPED|WARNING) +([^:]+): (.*)$", ln)
        if m and m.group(1) != "WARNING":
            res[m.group(2)] = (m.group(1), m.group(3))
    return res


def outcome(out: str, name: str) -> str:
    return lines(out)[name][0]


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    days_ago: int,
    ca: bool = False,
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=days_ago + 30))
        .not_valid_after(now - dt.timedelta(days=days_ago))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_all_checks_pass_with_the_self_test(service):
    card = activated_card(service)
    res = check("--softcard", card.name, env=service_env(service), stdin=card.passphrase + "\n")
    assert res.returncode == 0, res.stdout + res.stderr
    got = lines(res.stdout)
    names = [
        "configuration",
        "CERT",
        "KEY",
        "AUTH",
        "key service",
        "module",
        "slots and tokens",
        f"softcard {card.name}",
        "self-test AES",
        "self-test HMAC",
        "self-test EC key pair",
        "self-test digest",
        "self-test cleanup",
    ]
    assert list(got) == names
    assert all(o == "OK" for o, _ in got.values()), res.stdout
    assert res.stdout.rstrip().endswith(f"ckcheckinst: all {len(names)} checks passed")
    assert f"{service.client_cfg} (from $PKCS11WS_CONFIG)" in got["configuration"][1]
    assert "PKCS11WS_* environment overrides: PKCS11WS_RETRYDELAY" in res.stdout
    assert f"https://127.0.0.1:{service.port}" in got["key service"][1]
    assert re.search(rf"^ +slot \d+: token '{card.name}'", res.stdout, re.M)
    assert "CKM_SHA256_KEY_GEN" in got["self-test HMAC"][1]
    assert "CKM_ECDSA_SHA256" in got["self-test EC key pair"][1]
    assert card.passphrase not in res.stdout + res.stderr
    counts = card_counts(service, card.id)
    assert counts is not None and counts["keys"] == 0  # the temporary keys are gone


def test_config_given_with_option_and_overrides_named(service):
    env = clean_env(PKCS11WS_LOGLEVEL="0")
    res = check("--config", str(service.client_cfg), env=env)
    assert res.returncode == 0, res.stdout
    assert f"{service.client_cfg} (given with --config)" in res.stdout
    assert "PKCS11WS_* environment overrides: PKCS11WS_LOGLEVEL" in res.stdout


def test_missing_config(tmp_path):
    missing = tmp_path / "pkcs11webservices.cfg"
    (tmp_path / "example_pkcs11webservices.cfg").write_text("HOST x\n")
    res = check(env=clean_env(PKCS11WS_CONFIG=str(missing)))
    assert res.returncode == 1
    got = lines(res.stdout)
    o, text = got["configuration"]
    assert o == "FAILED" and f"{missing}: configuration file not found" in text
    assert f"Fix: copy {tmp_path}/example_pkcs11webservices.cfg to {missing}" in text
    assert [got[n][0] for n in ("CERT", "KEY", "AUTH", "key service")] == ["SKIPPED"] * 4
    assert got["module"][0] == "FAILED" and "CKR_GENERAL_ERROR" in got["module"][1]
    assert "ckcheckinst: 2 of 2 checks FAILED" in res.stdout


def test_invalid_config_line(tmp_path, service):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(service.client_cfg.read_text() + "PORT notanumber\n")
    res = check(env=clean_env(PKCS11WS_CONFIG=str(cfg)))
    assert res.returncode == 1
    o, text = lines(res.stdout)["configuration"]
    assert o == "FAILED" and "PORT: 'notanumber' is not an integer" in text and "Fix:" in text


def test_wrong_ca(service, tmp_path):
    other = tmp_path / "other"
    assert init_dir(other, free_port()).returncode == 0  # a second, unrelated PKI
    res = check(env=service_env(service, PKCS11WS_AUTH=str(other / "pki" / "ca.pem")))
    assert res.returncode == 1
    got = lines(res.stdout)
    assert got["AUTH"][0] == "OK"  # a valid CA, just the wrong one
    o, text = got["key service"]
    assert o == "FAILED" and "SSL certificate problem" in text
    assert "AUTH must be the CA certificate that signed the service's certificate" in text
    assert got["slots and tokens"][0] == "SKIPPED"


def test_expired_client_certificate(service, tmp_path):
    pki = service.dir / "pki"
    ca_key = _load_key(pki / "ca.key")
    ca_name = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()).subject
    expired = tmp_path / "expired.pem"
    cn = ca_name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    expired.write_bytes(
        _cert("pkcs11ws client", _load_key(pki / "client.key"), str(cn), ca_key, days_ago=2)
    )
    res = check(env=service_env(service, PKCS11WS_CERT=str(expired)))
    assert res.returncode == 1
    got = lines(res.stdout)
    o, text = got["CERT"]
    assert o == "FAILED" and "the client certificate 'CN=pkcs11ws client' expired on" in text
    assert "Fix: issue a new client certificate" in text
    assert got["KEY"][0] == "OK"  # still its key
    assert got["key service"][0] == "FAILED"  # and the service refuses it


def test_expired_ca(service, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    ca = tmp_path / "old-ca.pem"
    ca.write_bytes(_cert("old CA", key, "old CA", key, days_ago=1, ca=True))
    res = check(env=service_env(service, PKCS11WS_AUTH=str(ca)))
    assert res.returncode == 1
    o, text = lines(res.stdout)["AUTH"]
    assert o == "FAILED" and "the CA certificate 'CN=old CA' expired on" in text


def test_key_does_not_match_certificate(service):
    res = check(env=service_env(service, PKCS11WS_KEY=str(service.dir / "pki" / "server.key")))
    assert res.returncode == 1
    o, text = lines(res.stdout)["KEY"]
    assert o == "FAILED" and "does not match the certificate in CERT" in text


def test_unparsable_certificate(service, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    res = check(env=service_env(service, PKCS11WS_CERT=str(junk), PKCS11WS_AUTH=str(junk)))
    got = lines(res.stdout)
    assert got["CERT"][0] == "FAILED" and "is not a PEM X.509 certificate" in got["CERT"][1]
    assert got["AUTH"][0] == "FAILED" and "holds no PEM X.509 certificate" in got["AUTH"][1]
    assert res.returncode == 1


def test_service_down(service, tmp_path):
    port = free_port()
    res = check(env=service_env(service, PKCS11WS_PORT=str(port)))
    assert res.returncode == 1
    got = lines(res.stdout)
    o, text = got["key service"]
    assert o == "FAILED" and f"nothing accepts connections at 127.0.0.1:{port}" in text
    assert "start the key service" in text
    assert got["module"][0] == "OK" and got["slots and tokens"][0] == "SKIPPED"
    # Our module under another name (the install's symlink) is recognised as ours too, so the
    # slot listing does not wait through the module's retries.
    link = tmp_path / "libpkcs11webservices.so"
    link.symlink_to(module_path())
    env = service_env(service, PKCS11WS_PORT=str(port), PKCS11WS_RETRYDELAY="30")
    t0 = time.monotonic()
    res = check("--library", str(link), env=env)
    assert res.returncode == 1 and lines(res.stdout)["slots and tokens"][0] == "SKIPPED"
    assert time.monotonic() - t0 < 20


def test_wrong_passphrase(service):
    card = activated_card(service)
    res = check("--softcard", card.name, env=service_env(service), stdin="wrong passphrase\n")
    assert res.returncode == 1
    o, text = lines(res.stdout)[f"softcard {card.name}"]
    assert o == "FAILED" and "C_Login returned CKR_PIN_INCORRECT" in text
    assert "give the passphrase set when the softcard was generated" in text
    assert "self-test AES" not in res.stdout


def test_unknown_softcard_and_missing_passphrase(service):
    res = check("--softcard", "nosuchcard", env=service_env(service), stdin="x\n")
    assert res.returncode == 1
    o, text = lines(res.stdout)["softcard nosuchcard"]
    assert o == "FAILED" and "no token is labelled 'nosuchcard'" in text and "softcardtool" in text
    res = check("--softcard", "nosuchcard", env=service_env(service), stdin="")
    assert res.returncode == 2 and "no passphrase on standard input" in res.stderr


def test_library_that_is_not_a_module(service, tmp_path):
    res = check("--library", str(tmp_path / "nope.so"), env=service_env(service))
    assert res.returncode == 1
    got = lines(res.stdout)
    assert got["module"][0] == "FAILED" and "cannot load" in got["module"][1]
    assert got["slots and tokens"][0] == "SKIPPED"


def test_self_test_on_softhsm(service, hsm):
    env = service_env(service, SOFTHSM2_CONF=str(hsm.conf))
    res = check("--library", SOFTHSM, "--softcard", HSM_LABEL, env=env, stdin=HSM_PIN + "\n")
    assert res.returncode == 0, res.stdout
    got = lines(res.stdout)
    assert all(o == "OK" for o, _ in got.values())
    assert "SoftHSM" in got["module"][1]
    # SoftHSM 2.6 lacks the 3.0 CKM_SHA256_KEY_GEN: the HMAC key comes from the generic one.
    assert "CKM_GENERIC_SECRET_KEY_GEN" in got["self-test HMAC"][1]
