"""OpenSC's pkcs11-tool drives libpkcs11ws.so against the real key service: the everyday admin
view (-I, -L, -T, -M, -O), login, AES and generic-secret key generation, AES-CBC(-PAD)
encryption round trips, HMAC sign/verify, and private data objects. The passphrase reaches
pkcs11-tool through its `--pin env:VAR` form, never in argv (0.23 refuses to read a PIN from
a stdin that is not a terminal: "util_getpass error").
"""

from __future__ import annotations

import os
import uuid

import pytest

from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.pkcs11tool import Pkcs11Tool


@pytest.fixture(scope="module")
def cards(service):
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    made = []
    for _ in range(2):
        name = "p" + uuid.uuid4().hex[:12]
        pin = uuid.uuid4().hex
        client.create_softcard(name, pin.encode())
        made.append((name, pin))
    client.close()
    return made


@pytest.fixture(scope="module")
def cards_tool(service, cards):
    name, pin = cards[0]
    return Pkcs11Tool(service.client_cfg, name, pin)


def test_info_and_slot_list(cards_tool, cards):
    out = cards_tool.run("-I", login=False, token=False).stdout
    assert "Cryptoki version 2.40" in out and "pkcs11ws" in out
    out = cards_tool.run("-L", login=False, token=False).stdout
    for name, _ in cards:
        assert f"token label        : {name}" in out
    assert "WSOP softcard" in out and "login required" in out
    out = cards_tool.run("-T", login=False, token=False).stdout
    assert cards[1][0] in out


def test_mechanisms(cards_tool):
    out = cards_tool.run("-M", login=False).stdout
    for name in (
        "AES-CBC,",
        "AES-CBC-PAD",
        "AES-KEY-GEN",
        "SHA256-HMAC",
        "SHA384-HMAC",
        "SHA512-HMAC",
        "GENERIC-SECRET-KEY-GEN",
    ):
        assert name in out


def test_wrong_passphrase(service, cards):
    bad = Pkcs11Tool(service.client_cfg, cards[0][0], "not-the-passphrase")
    r = bad.run("-O", ok=False)
    assert r.returncode != 0 and "CKR_PIN_INCORRECT" in r.stderr


@pytest.fixture(scope="module")
def aes_key(cards_tool) -> str:
    out = cards_tool.run(
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "tool-aes",
        "--id",
        "a1",
        "--private",
        "--sensitive",
    ).stdout
    assert "AES length 32" in out
    return "a1"


# Under 1024 bytes pkcs11-tool uses C_Encrypt/C_Decrypt, above C_*Update/C_*Final.
@pytest.mark.parametrize(
    "mech, size, ct_size",
    [
        ("AES-CBC-PAD", 1000, 1008),
        ("AES-CBC", 992, 992),
        ("AES-CBC-PAD", 5000, 5008),
        ("AES-CBC", 4096, 4096),
    ],
)
def test_aes_keygen_encrypt_decrypt(cards_tool, aes_key, tmp_path, mech, size, ct_size):
    msg, ct, pt = tmp_path / "msg", tmp_path / "ct", tmp_path / "pt"
    msg.write_bytes(os.urandom(size))
    iv = ("--iv", os.urandom(16).hex())
    cards_tool.with_key("--encrypt", aes_key, mech, msg, *iv, "-o", str(ct))
    cards_tool.with_key("--decrypt", aes_key, mech, ct, *iv, "-o", str(pt))
    assert pt.read_bytes() == msg.read_bytes()
    assert ct.stat().st_size == ct_size


@pytest.fixture(scope="module")
def mac_key(cards_tool) -> str:
    cards_tool.run(
        "--keygen",
        "--key-type",
        "GENERIC:32",
        "--label",
        "tool-mac",
        "--id",
        "b2",
        "--private",
        "--sensitive",
        "--usage-sign",
    )
    return "b2"


# pkcs11-tool signs and verifies 50000 bytes with C_*Update/C_*Final, 7 with C_Sign/C_Verify.
@pytest.mark.parametrize("size", [50000, 7], ids=["multipart", "single"])
def test_generic_secret_sign_verify(cards_tool, mac_key, tmp_path, size):
    msg, mac = tmp_path / "msg", tmp_path / "mac"
    msg.write_bytes(os.urandom(size))
    cards_tool.with_key("--sign", mac_key, "SHA256-HMAC", msg, "-o", str(mac))
    assert mac.stat().st_size == 32
    check = ("--verify", mac_key, "SHA256-HMAC", msg, "--signature-file", str(mac))
    assert "Signature is valid" in cards_tool.with_key(*check).stdout
    msg.write_bytes(msg.read_bytes() + b"!")
    r = cards_tool.with_key(*check, ok=False)
    assert "Invalid signature" in r.stdout and "Signature is valid" not in r.stdout


def test_private_data_object(cards_tool, tmp_path):
    blob = tmp_path / "data"
    blob.write_bytes(b"<config> & \xc3\xa9 \x00\x01 </config>")
    cards_tool.run(
        "--write-object", str(blob), "--type", "data", "--label", "tool-data", "--private"
    )
    cards_tool.run(
        "--read-object", "--type", "data", "--label", "tool-data", "-o", str(tmp_path / "back")
    )
    assert (tmp_path / "back").read_bytes() == blob.read_bytes()


def test_list_objects_needs_login(cards_tool):
    cards_tool.run(
        "--keygen", "--key-type", "AES:16", "--label", "tool-listed", "--private", "--sensitive"
    )
    out = cards_tool.run("-O").stdout
    assert "tool-listed" in out and "Secret Key Object" in out
    assert "tool-listed" not in cards_tool.run("-O", login=False).stdout
