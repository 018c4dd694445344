"""Java's SunPKCS11 provider (JDK 17) with key pairs through libpkcs11ws.so: tests/consumers/java/
P11AsymTest.java generates RSA and EC key pairs on the token, signs with SHA256withRSA and
SHA256withECDSA (verified by the JDK's SunRsaSign and SunEC), decrypts RSA/ECB/PKCS1Padding,
stores a PrivateKeyEntry with its certificate chain (the key imported by C_CreateObject) and
(level "all") RSASSA-PSS with SHA-256/MGF1/32 (SunPKCS11 takes these parameters only when the
token lists CKM_SHA256 as a digest; verified by SunRsaSign) and AES/GCM/NoPadding against
SunJCE. JDK 17's SunPKCS11 has no OAEP cipher at all (checked). The provider configuration is
README.md's, which makes generated and imported keys token, private, sensitive objects.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.certs import self_signed_cert
from tests.support.dropin_util import MODULE_PLACEHOLDER, consumer_env, require, snippet

JAVA_SRC = Path(__file__).resolve().parent / "java" / "P11AsymTest.java"
CHECKS = {"basic": 5, "all": 7}  # PASS lines P11AsymTest prints
LEVEL = "all"


def _p12(path: Path) -> None:
    cert, key = self_signed_cert("java entry", rsa.generate_private_key(65537, 2048), days=2)
    assert isinstance(key, rsa.RSAPrivateKey)
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"entry", key, cert, None, BestAvailableEncryption(b"p12")
        )
    )


def test_sunpkcs11_key_pairs(fresh_service: Any, tmp_path: Path) -> None:
    javac = require(shutil.which("javac"), "JDK 17 (javac)", "openjdk-17-jdk-headless")
    java = require(shutil.which("java"), "JDK 17 (java)", "openjdk-17-jdk-headless")
    r = subprocess.run(
        [javac, "-d", str(tmp_path), str(JAVA_SRC)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    svc = fresh_service()
    _, pin = client_card(svc.client_cfg, "ja")
    cfg = tmp_path / "pkcs11ws-java.cfg"
    cfg.write_text(snippet("java-provider-config", {MODULE_PLACEHOLDER: module_path()}))
    p12 = tmp_path / "entry.p12"
    _p12(p12)
    env = consumer_env(svc.client_cfg, pin)
    r = subprocess.run(
        [java, "-cp", str(tmp_path), "P11AsymTest", str(cfg), str(p12), LEVEL],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ALL PASSED" in r.stdout, out
    assert r.stdout.count("PASS ") == CHECKS[LEVEL], out
    assert pin not in out
