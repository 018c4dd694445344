"""OpenSC's pkcs11-tool with key pairs through libpkcs11ws.so and the real key service:
--keypairgen (rsa:2048, EC:prime256v1), --sign (RSA-PKCS, SHA256-RSA-PKCS, ECDSA,
ECDSA-SHA256), every signature checked by openssl against the public key pkcs11-tool reads
from the module (--read-object --type pubkey for RSA, the -O listing for EC: see _ec_pubkey);
the public key is listed before login, the private key only after, and its value is never
readable.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.pkcs11tool import Pkcs11Tool

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is missing")


@pytest.fixture(scope="module")
def asym_tool(service: Any) -> Pkcs11Tool:
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name, pin = "k" + uuid.uuid4().hex[:12], uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    return Pkcs11Tool(service.client_cfg, name, pin, text=False)


def _openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(OPENSSL), *args], capture_output=True, timeout=60)


def _pubkey(asym_tool: Pkcs11Tool, key_id: str, tmp: Path, login: bool = False) -> Path:
    der = tmp / f"{key_id}.der"
    asym_tool.run("--read-object", "--type", "pubkey", "--id", key_id, "-o", str(der), login=login)
    pem = tmp / f"{key_id}.pem"
    r = _openssl("pkey", "-pubin", "-inform", "DER", "-in", str(der), "-out", str(pem))
    assert r.returncode == 0, r.stderr
    return pem


def _ec_pubkey(asym_tool: Pkcs11Tool, key_id: str, tmp: Path) -> Path:
    """The EC public key as pkcs11-tool lists it (-O: CKA_EC_PARAMS, CKA_EC_POINT), as PEM.

    Not --read-object: for an EC public key, OpenSC 0.23's pkcs11-tool frees the parameters
    EVP_PKEY_export gave it and then passes their strings to EVP_PKEY_fromdata (valgrind:
    invalid reads in OPENSSL_strcasecmp of a block freed by pkcs11-tool), so it fails with
    "cannot create EVP_PKEY" whenever that block has been reused: it depends on the heap's
    layout (how many softcards the shared service holds, whether it logged in), not on us."""
    listing = asym_tool.run("-O", "--type", "pubkey", login=False).stdout.decode()
    blocks = listing.split("Public Key Object;")[1:]
    mine = [b for b in blocks if re.search(rf"^\s*ID:\s*{key_id}\s*$", b, re.M)]
    assert len(mine) == 1 and mine[0].lstrip().startswith("EC"), listing
    params = re.search(r"EC_PARAMS:\s*([0-9a-f]+)", mine[0])
    point = re.search(r"EC_POINT:\s*([0-9a-f]+)", mine[0])
    assert params and point, mine[0]
    assert params.group(1) == "06082a8648ce3d030107"  # prime256v1
    der = bytes.fromhex(point.group(1))
    assert der[0] == 0x04 and der[1] == len(der) - 2  # CKA_EC_POINT: a DER OCTET STRING
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), der[2:])
    pem = tmp / f"{key_id}.pem"
    pem.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem


@pytest.fixture(scope="module")
def rsa_key(asym_tool: Pkcs11Tool) -> str:
    out = asym_tool.run(
        "--keypairgen", "--key-type", "rsa:2048", "--id", "a1", "--label", "rsa1", "--private"
    ).stdout
    assert b"Private Key Object; RSA" in out and b"Public Key Object; RSA 2048 bits" in out
    return "a1"


@pytest.fixture(scope="module")
def ec_key(asym_tool: Pkcs11Tool) -> str:
    out = asym_tool.run(
        "--keypairgen", "--key-type", "EC:prime256v1", "--id", "e1", "--label", "ec1", "--private"
    ).stdout
    assert b"Private Key Object; EC" in out and b"Public Key Object; EC" in out
    return "e1"


def test_objects_before_and_after_login(asym_tool: Pkcs11Tool, rsa_key: str, ec_key: str) -> None:
    before = asym_tool.run("-O", login=False).stdout
    assert b"Public Key Object; RSA 2048 bits" in before and b"Private Key Object" not in before
    after = asym_tool.run("-O").stdout
    assert after.count(b"Private Key Object") == 2 and after.count(b"Public Key Object") == 2
    mechs = asym_tool.run("-M", login=False).stdout
    for name in (
        b"RSA-PKCS-KEY-PAIR-GEN",
        b"RSA-PKCS,",
        b"SHA256-RSA-PKCS,",
        b"RSA-PKCS-PSS",
        b"RSA-PKCS-OAEP",
        b"ECDSA,",
        b"ECDSA-SHA256",
        b"ECDSA-KEY-PAIR-GEN",
    ):
        assert name in mechs, mechs


@pytest.mark.parametrize(
    "mech,digest",
    [("SHA256-RSA-PKCS", "sha256"), ("SHA384-RSA-PKCS", "sha384"), ("SHA512-RSA-PKCS", "sha512")],
)
def test_rsa_sign_checked_by_openssl(
    asym_tool: Pkcs11Tool, rsa_key: str, tmp_path: Path, mech: str, digest: str
) -> None:
    data = tmp_path / "data"
    data.write_bytes(os.urandom(5000))
    sig = tmp_path / "sig"
    asym_tool.with_key("--sign", rsa_key, mech, data, "-o", str(sig))
    assert len(sig.read_bytes()) == 256
    pem = _pubkey(asym_tool, rsa_key, tmp_path)
    r = _openssl("dgst", f"-{digest}", "-verify", str(pem), "-signature", str(sig), str(data))
    assert r.returncode == 0 and b"Verified OK" in r.stdout, r


def test_rsa_pkcs_of_a_digest_info(asym_tool: Pkcs11Tool, rsa_key: str, tmp_path: Path) -> None:
    msg = os.urandom(100)
    info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(msg).digest()
    (tmp_path / "info").write_bytes(info)
    (tmp_path / "msg").write_bytes(msg)
    sig = tmp_path / "sig"
    asym_tool.with_key("--sign", rsa_key, "RSA-PKCS", tmp_path / "info", "-o", str(sig))
    pem = _pubkey(asym_tool, rsa_key, tmp_path)
    r = _openssl(
        "dgst", "-sha256", "-verify", str(pem), "-signature", str(sig), str(tmp_path / "msg")
    )
    assert r.returncode == 0, r


@pytest.mark.parametrize("mech", ["ECDSA", "ECDSA-SHA256"])
def test_ecdsa_sign_checked_by_openssl(
    asym_tool: Pkcs11Tool, ec_key: str, tmp_path: Path, mech: str
) -> None:
    msg = os.urandom(700)
    data = tmp_path / "data"
    data.write_bytes(hashlib.sha256(msg).digest() if mech == "ECDSA" else msg)
    (tmp_path / "msg").write_bytes(msg)
    sig = tmp_path / "sig"
    asym_tool.with_key(
        "--sign", ec_key, mech, data, "--signature-format", "openssl", "-o", str(sig)
    )
    pem = _ec_pubkey(asym_tool, ec_key, tmp_path)
    r = _openssl(
        "dgst", "-sha256", "-verify", str(pem), "-signature", str(sig), str(tmp_path / "msg")
    )
    assert r.returncode == 0 and b"Verified OK" in r.stdout, r


def test_sign_and_verify_in_the_module(
    asym_tool: Pkcs11Tool, rsa_key: str, ec_key: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"verified by the public key in the module")
    for key, mech in ((rsa_key, "SHA256-RSA-PKCS"), (ec_key, "ECDSA-SHA256")):
        sig = tmp_path / f"{key}.sig"
        asym_tool.with_key("--sign", key, mech, data, "-o", str(sig))
        check = ("--verify", key, mech, data, "--signature-file", str(sig))
        out = asym_tool.with_key(*check).stdout
        assert b"Signature is valid" in out
        bad = bytearray(sig.read_bytes())
        bad[5] ^= 1
        sig.write_bytes(bytes(bad))
        r = asym_tool.with_key(*check, ok=False)
        assert b"Invalid signature" in r.stdout + r.stderr


@pytest.mark.parametrize(
    "mech,digest", [("SHA256-RSA-PKCS-PSS", "sha256"), ("SHA384-RSA-PKCS-PSS", "sha384")]
)
def test_rsa_pss_checked_by_openssl(
    asym_tool: Pkcs11Tool, rsa_key: str, tmp_path: Path, mech: str, digest: str
) -> None:
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3000))
    sig = tmp_path / "sig"
    salt = {"sha256": "32", "sha384": "48"}[digest]
    pss = ("--mgf", f"MGF1-{digest.upper()}", "--salt-len", salt)
    asym_tool.with_key("--sign", rsa_key, mech, data, *pss, "-o", str(sig))
    pem = _pubkey(asym_tool, rsa_key, tmp_path)
    r = _openssl(
        "dgst",
        f"-{digest}",
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        f"rsa_pss_saltlen:{salt}",
        "-verify",
        str(pem),
        "-signature",
        str(sig),
        str(data),
    )
    assert r.returncode == 0 and b"Verified OK" in r.stdout, r


def test_rsa_oaep_sha256_decrypt(asym_tool: Pkcs11Tool, rsa_key: str, tmp_path: Path) -> None:
    pem = _pubkey(asym_tool, rsa_key, tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(48))
    ct = tmp_path / "ct"
    r = _openssl(
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        str(pem),
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
        "-in",
        str(secret),
        "-out",
        str(ct),
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    oaep = ("--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256")
    asym_tool.with_key("--decrypt", rsa_key, "RSA-PKCS-OAEP", ct, *oaep, "-o", str(out))
    assert out.read_bytes() == secret.read_bytes()


@pytest.mark.parametrize("mech,key", [("SHA256-RSA-PKCS", "rsa"), ("ECDSA-SHA256", "ec")])
def test_verify_without_login(
    asym_tool: Pkcs11Tool, rsa_key: str, ec_key: str, tmp_path: Path, mech: str, key: str
) -> None:
    """--verify with no --login: the public key of a public session verifies in the module."""
    key_id = rsa_key if key == "rsa" else ec_key
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3000))
    sig = tmp_path / "sig"
    asym_tool.with_key("--sign", key_id, mech, data, "-o", str(sig))
    check = ("--verify", key_id, mech, data, "--signature-file", str(sig))
    r = asym_tool.with_key(*check, login=False)
    assert b"Signature is valid" in r.stdout, r
    data.write_bytes(data.read_bytes() + b"!")
    r = asym_tool.with_key(*check, login=False, ok=False)
    # pkcs11-tool exits 0 either way; it prints the CKR_SIGNATURE_INVALID answer.
    assert b"Invalid signature" in r.stdout and b"Signature is valid" not in r.stdout, r


@pytest.mark.parametrize("mech", ["SHA-1", "SHA224", "SHA256", "SHA384", "SHA512"])
def test_hash_in_the_module(asym_tool: Pkcs11Tool, tmp_path: Path, mech: str) -> None:
    """--hash (C_DigestInit/Update/Final, no login) equals hashlib on a multi-block file."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(200_000))
    out = tmp_path / "digest"
    asym_tool.run("--hash", "-m", mech, "-i", str(data), "-o", str(out), login=False)
    name = mech.replace("-", "").lower()
    assert out.read_bytes() == hashlib.new(name, data.read_bytes()).digest()
