"""OpenSC's pkcs11-tool (Debian opensc 0.23) on libpkcs11ws.so: what
tests/consumers/test_consumer_pkcs11tool_cards.py does not already cover.

- -T and -M for one token: the token's strings and flags, every WSOP mechanism with its
  functions and key sizes (pkcs11-tool has no names for the _GENERAL HMACs and CKM_SHA*_KEY_GEN
  and prints them as mechtype-0x...);
- a wrong passphrase: exit status 1, CKR_PIN_INCORRECT on stderr, and nothing made;
- AES:16 and AES:24 key generation with encryption round trips (AES:32 is in the other file);
- known answers through pkcs11-tool with IMPORTED keys (--write-object --type secrkey):
  NIST SP 800-38A F.2 AES-CBC for 128/192/256-bit keys; RFC 4231 HMAC-SHA-256/384/512 with a
  generic secret key (cases 2 and 6: a short key and one longer than the block; imported
  through the service's API, as pkcs11-tool cannot write generic secret keys);
- data objects with an application label and OID, listed by -O, read back, deleted; a data
  object pkcs11-tool writes public (no --private) is refused by the WSOP rules;
- secret keys deleted with --delete-object.
The passphrase reaches pkcs11-tool as `--pin env:VAR`, never in argv.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pkcs11ws import constants as C
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.known_answers import CBC_IV, CBC_PLAINTEXT, CBC_VECTORS, HMAC_VECTORS
from tests.support.pkcs11tool import Pkcs11Tool


@pytest.fixture
def tool(service) -> Pkcs11Tool:
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "t" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    made = client.create_softcard(name, pin.encode())
    client.close()
    return Pkcs11Tool(service.client_cfg, name, pin, made["id"])


def test_token_and_mechanisms(tool):
    out = tool.run("-T", login=False).stdout
    assert f"token label        : {tool.card}" in out
    assert "token model        : WSOP softcard" in out
    assert "token flags        : login required, rng, token initialized, PIN initialized" in out
    assert "pin min/max        : 1/256" in out
    lines = [ln.strip() for ln in tool.run("-M", login=False).stdout.splitlines()[1:]]
    from pkcs11ws import mechanisms

    # One line per row of the mechanism table; the secret-key rows read exactly so (the key
    # pair, RSA, ECDSA and GCM rows: tests/consumers/test_consumer_pkcs11tool_asym.py).
    assert len(lines) == len(mechanisms.MECHANISMS)
    expected = [
        "AES-CBC, keySize={16,32}, encrypt, decrypt",
        "AES-CBC-PAD, keySize={16,32}, encrypt, decrypt",
        "AES-KEY-GEN, keySize={16,32}, generate",
        "SHA256-HMAC, keySize={1,1024}, sign, verify",
        "mechtype-0x252, keySize={1,1024}, sign, verify",  # CKM_SHA256_HMAC_GENERAL
        "SHA384-HMAC, keySize={1,1024}, sign, verify",
        "mechtype-0x262, keySize={1,1024}, sign, verify",
        "SHA512-HMAC, keySize={1,1024}, sign, verify",
        "mechtype-0x272, keySize={1,1024}, sign, verify",
        "mechtype-0x4005, keySize={1,1024}, generate",  # CKM_SHA256_KEY_GEN
        "mechtype-0x4006, keySize={1,1024}, generate",
        "mechtype-0x4007, keySize={1,1024}, generate",
        "GENERIC-SECRET-KEY-GEN, keySize={1,1024}, generate",
    ]
    assert [ln for ln in lines if ln in expected] == expected


def test_wrong_passphrase(tool):
    bad = Pkcs11Tool(tool.cfg, tool.card, "wrong-" + tool.pin)
    r = bad.run(
        "--keygen", "--key-type", "AES:16", "--label", "never", "--private", "--sensitive", ok=False
    )
    assert r.returncode == 1
    assert "CKR_PIN_INCORRECT" in r.stderr
    assert "never" not in tool.run("-O").stdout


@pytest.mark.parametrize("size", [16, 24])
def test_aes_keygen_sizes(tool, tmp_path, size):
    out = tool.run(
        "--keygen",
        "--key-type",
        f"AES:{size}",
        "--label",
        f"aes{size}",
        "--id",
        f"{size:02x}",
        "--private",
        "--sensitive",
    ).stdout
    assert f"AES length {size}" in out
    msg = tmp_path / "msg"
    msg.write_bytes(os.urandom(777))
    iv = os.urandom(16).hex()
    tool.with_key(
        "--encrypt", f"{size:02x}", "AES-CBC-PAD", msg, "--iv", iv, "-o", str(tmp_path / "ct")
    )
    assert (tmp_path / "ct").stat().st_size == 784
    tool.with_key(
        "--decrypt",
        f"{size:02x}",
        "AES-CBC-PAD",
        tmp_path / "ct",
        "--iv",
        iv,
        "-o",
        str(tmp_path / "pt"),
    )
    assert (tmp_path / "pt").read_bytes() == msg.read_bytes()


def import_secret(
    tool: Pkcs11Tool, tmp_path: Path, value: bytes, key_type: str, key_id: str, *usage: str
) -> None:
    src = tmp_path / f"key-{key_id}"
    src.write_bytes(value)
    out = tool.run(
        "--write-object",
        str(src),
        "--type",
        "secrkey",
        "--key-type",
        f"{key_type}:{len(value)}",
        "--id",
        key_id,
        "--label",
        f"imported-{key_id}",
        "--private",
        "--sensitive",
        *usage,
    ).stdout
    assert "Created secret key" in out
    src.unlink()


def test_nist_cbc_known_answers_with_imported_keys(tool, tmp_path):
    pt = tmp_path / "pt"
    pt.write_bytes(CBC_PLAINTEXT)
    for n, v in enumerate(CBC_VECTORS):
        key_id = f"a{n}"
        import_secret(tool, tmp_path, v.key, "AES", key_id, "--usage-decrypt")
        tool.with_key(
            "--encrypt", key_id, "AES-CBC", pt, "--iv", CBC_IV.hex(), "-o", str(tmp_path / "ct")
        )
        assert (tmp_path / "ct").read_bytes() == v.ciphertext, v.name
        (tmp_path / "ct").write_bytes(v.ciphertext)
        tool.with_key(
            "--decrypt",
            key_id,
            "AES-CBC",
            tmp_path / "ct",
            "--iv",
            CBC_IV.hex(),
            "-o",
            str(tmp_path / "back"),
        )
        assert (tmp_path / "back").read_bytes() == CBC_PLAINTEXT, v.name
    out = tool.run("-O", "--type", "secrkey").stdout
    assert out.count("Access:     sensitive") == 3
    for n in range(3):
        tool.run("--delete-object", "--type", "secrkey", "--id", f"a{n}")
    assert "Secret Key Object" not in tool.run("-O").stdout


def import_generic(tool: Pkcs11Tool, value: bytes, key_id: str) -> None:
    """pkcs11-tool 0.23 cannot import a CKK_GENERIC_SECRET ("Unknown key type: 0x10"): the key
    is imported through the key service's API, then used by pkcs11-tool by its CKA_ID."""
    client = KeyServiceClient(load_config(str(tool.cfg)))
    try:
        token, _ = client.activate(tool.card_id, tool.pin.encode())
        client.create_object(
            tool.card_id,
            token,
            {
                "CKA_CLASS": C.CKO_SECRET_KEY,
                "CKA_KEY_TYPE": C.CKK_GENERIC_SECRET,
                "CKA_TOKEN": True,
                "CKA_PRIVATE": True,
                "CKA_SIGN": True,
                "CKA_VERIFY": True,
                "CKA_ID": bytes.fromhex(key_id),
                "CKA_LABEL": b"rfc4231",
                "CKA_VALUE": value,
            },
        )
        client.deactivate(tool.card_id, token)
    finally:
        client.close()


def test_rfc4231_hmac_with_imported_generic_keys(tool, tmp_path):
    for v in (HMAC_VECTORS[1], HMAC_VECTORS[5]):
        key_id = f"c{v.case}"
        import_generic(tool, v.key, key_id)
        msg = tmp_path / f"msg{v.case}"
        msg.write_bytes(v.data)
        for bits in (256, 384, 512):
            mac = tmp_path / f"mac{v.case}-{bits}"
            tool.with_key("--sign", key_id, f"SHA{bits}-HMAC", msg, "-o", str(mac))
            assert mac.read_bytes() == v.mac(bits), (v.case, bits)
            out = tool.with_key(
                "--verify", key_id, f"SHA{bits}-HMAC", msg, "--signature-file", str(mac)
            ).stdout
            assert "Signature is valid" in out
        mac.write_bytes(v.mac(512)[:-1] + bytes([v.mac(512)[-1] ^ 1]))
        r = tool.with_key(
            "--verify", key_id, "SHA512-HMAC", msg, "--signature-file", str(mac), ok=False
        )
        assert "Invalid signature" in r.stdout


def test_data_objects_with_application(tool, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01 data & <value> \xff")
    out = tool.run(
        "--write-object",
        str(blob),
        "--type",
        "data",
        "--label",
        "cfg",
        "--application-label",
        "my-app",
        "--application-id",
        "1.2.840.113549.1",
        "--private",
    ).stdout
    assert "Created Data Object" in out
    listing = tool.run("-O", "--type", "data").stdout
    assert "label:          'cfg'" in listing and "application:    'my-app'" in listing
    assert "app_id:         1.2.840.113549.1" in listing and "private" in listing
    tool.run(
        "--read-object",
        "--type",
        "data",
        "--application-label",
        "my-app",
        "-o",
        str(tmp_path / "back"),
    )
    assert (tmp_path / "back").read_bytes() == blob.read_bytes()
    tool.run("--delete-object", "--type", "data", "--application-label", "my-app")
    r = tool.run(
        "--read-object",
        "--type",
        "data",
        "--application-label",
        "my-app",
        "-o",
        str(tmp_path / "gone"),
        ok=False,
    )
    assert r.returncode != 0
    assert "cfg" not in tool.run("-O", "--type", "data").stdout
    # Without --private pkcs11-tool makes CKA_PRIVATE false: WSOP stores no public data object.
    r = tool.run("--write-object", str(blob), "--type", "data", "--label", "public", ok=False)
    assert r.returncode != 0 and "CKR_TEMPLATE_INCONSISTENT" in r.stderr
