"""OpenSC's pkcs11-tool as a drop-in consumer of libpkcs11ws.so against the real key service:
generic-secret HMAC keys (`--keygen --key-type GENERIC:32`, its only HMAC key type) used by
`--id` with each HMAC mechanism, public certificates (`--write-object --type cert` always sends
CKA_PRIVATE false) read back with and without login, renaming through C_SetAttributeValue
(`--set-id`), and `--test-fork`. The passphrase travels as `--pin env:VAR`, never in argv.
"""

from __future__ import annotations

import pytest
from cryptography import x509

from tests.support.cards import client_card
from tests.support.certs import self_signed
from tests.support.pkcs11tool import Pkcs11Tool


@pytest.fixture(scope="module")
def dropin_tool(service):
    name, pin = client_card(service.client_cfg, "t")
    return Pkcs11Tool(service.client_cfg, name, pin)


@pytest.mark.parametrize("mech", ["SHA256-HMAC", "SHA384-HMAC", "SHA512-HMAC"])
def test_generic_secret_hmac_by_id(dropin_tool, tmp_path, mech):
    key_id = {"SHA256-HMAC": "a256", "SHA384-HMAC": "a384", "SHA512-HMAC": "a512"}[mech]
    out = dropin_tool.run(
        "--keygen",
        "--key-type",
        "GENERIC:32",
        "--id",
        key_id,
        "--label",
        f"mac-{key_id}",
        "--private",
        "--sensitive",
        "--usage-sign",
    ).stdout
    assert "Generic secret length 32" in out
    msg = tmp_path / "msg"
    mac = tmp_path / "mac"
    for size in (100, 40000):  # small: C_Sign; large: C_SignUpdate / C_SignFinal
        msg.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        dropin_tool.with_key("--sign", key_id, mech, msg, "-o", str(mac))
        assert mac.stat().st_size == int(mech[3:6]) // 8
        out = dropin_tool.with_key(
            "--verify", key_id, mech, msg, "--signature-file", str(mac)
        ).stdout
        assert "Signature is valid" in out
        msg.write_bytes(msg.read_bytes() + b"!")
        r = dropin_tool.with_key(
            "--verify", key_id, mech, msg, "--signature-file", str(mac), ok=False
        )
        # (pkcs11-tool 0.23 exits 0 on a bad MAC in its multi-part path: read what it says.)
        assert "Invalid signature" in r.stdout and "Signature is valid" not in r.stdout


def test_public_certificate_write_and_read(dropin_tool, tmp_path):
    der, _, _ = self_signed("pkcs11-tool cert")
    (tmp_path / "cert.der").write_bytes(der)
    out = dropin_tool.run(
        "--write-object",
        str(tmp_path / "cert.der"),
        "--type",
        "cert",
        "--id",
        "c0ffee",
        "--label",
        "tool-cert",
    ).stdout
    assert "Certificate Object" in out and "tool-cert" in out
    # Read back by id, logged in and not logged in (a public object).
    for login in (True, False):
        back = tmp_path / f"back-{login}.der"
        dropin_tool.run(
            "--read-object", "--type", "cert", "--id", "c0ffee", "-o", str(back), login=login
        )
        assert back.read_bytes() == der
        assert x509.load_der_x509_certificate(back.read_bytes()).subject.rfc4514_string() == (
            "CN=pkcs11-tool cert"
        )
    listed = dropin_tool.run("-O", login=False).stdout
    assert "tool-cert" in listed and "Secret Key Object" not in listed
    dropin_tool.run(
        "--keygen", "--key-type", "AES:16", "--label", "hidden-key", "--private", "--sensitive"
    )
    assert "hidden-key" in dropin_tool.run("-O").stdout
    assert "hidden-key" not in dropin_tool.run("-O", login=False).stdout


def test_rename_with_set_id(dropin_tool):
    """pkcs11-tool --set-id changes CKA_ID through C_SetAttributeValue."""
    dropin_tool.run(
        "--keygen",
        "--key-type",
        "AES:16",
        "--id",
        "0101",
        "--label",
        "to-rename",
        "--private",
        "--sensitive",
    )
    dropin_tool.run("--set-id", "0202", "--id", "0101", "--type", "secrkey")
    out = dropin_tool.run("-O", "--type", "secrkey").stdout
    block = out[out.index("to-rename") :]
    assert "ID:         0202" in block.split("Secret Key Object")[0]


def test_test_fork(dropin_tool):
    r = dropin_tool.run("--test-fork")
    assert "Calling C_Initialize in forked child process" in r.stdout + r.stderr
