"""Java's SunPKCS11 provider (JDK 17) as a consumer of libpkcs11ws.so:
tests/consumers/java/P11Test.java, compiled here into a temporary folder, runs against its own key
service (one softcard, so the provider configuration can say `slotListIndex = 0`).

The provider configuration is the snippet in README.md: it forces what WSOP requires
of every generated or imported secret key (token, private, sensitive, never extractable). The
program checks KeyStore login, KeyGenerator AES-128/192/256 and HmacSHA256/384/512, Cipher
AES/CBC/PKCS5Padding and AES/CBC/NoPadding equal to SunJCE for imported keys (Java drives them
through C_EncryptUpdate/C_DecryptUpdate only), Mac (C_SignUpdate/C_SignFinal), and KeyStore
setKeyEntry (C_CopyObject), setEntry of a SecretKeySpec, getKey and deleteEntry.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.dropin_util import MODULE_PLACEHOLDER, consumer_env, require, snippet

JAVA_SRC = Path(__file__).resolve().parent / "java" / "P11Test.java"
CHECKS = 16  # PASS lines P11Test prints


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    javac = require(shutil.which("javac"), "JDK 17 (javac)", "openjdk-17-jdk-headless")
    out = tmp_path_factory.mktemp("java")
    r = subprocess.run(
        [javac, "-d", str(out), str(JAVA_SRC)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_sunpkcs11(fresh_service, compiled, tmp_path):
    java = require(shutil.which("java"), "JDK 17 (java)", "openjdk-17-jdk-headless")
    svc = fresh_service()
    _, pin = client_card(svc.client_cfg, "j")
    cfg = tmp_path / "pkcs11ws-java.cfg"
    # The configuration README.md shows (one softcard: slotListIndex = 0).
    cfg.write_text(snippet("java-provider-config", {MODULE_PLACEHOLDER: module_path()}))
    env = consumer_env(svc.client_cfg, pin)
    r = subprocess.run(
        [java, "-cp", str(compiled), "P11Test", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ALL PASSED" in r.stdout, out
    assert r.stdout.count("PASS ") == CHECKS, out
    assert pin not in out
