"""GnuTLS with key pairs through libpkcs11ws.so: `p11tool --generate-privkey` (RSA and EC) on
a softcard, then `certtool --generate-self-signed` with the pkcs11: private key; the
certificate's signature is checked by certtool --verify and openssl. The PIN reaches GnuTLS
through $GNUTLS_PIN, never argv.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.dropin_util import consumer_env, require


@pytest.fixture(scope="module")
def gnutls_card(own_service: Any) -> tuple[str, dict[str, str]]:
    require(shutil.which("p11tool"), "GnuTLS p11tool", "gnutls-bin")
    name, pin = client_card(own_service.client_cfg, "g")
    return urllib.parse.quote(name), consumer_env(own_service.client_cfg, pin, GNUTLS_PIN=pin)


KINDS = [
    ("rsa", ["--bits", "2048"], "gnutls-rsa"),
    ("ecdsa", ["--curve", "secp256r1"], "gnutls-ec"),
]


@pytest.mark.parametrize("algo,extra,label", KINDS)
def test_generate_privkey_and_self_signed(
    gnutls_card: tuple[str, dict[str, str]], tmp_path: Path, algo: str, extra: list[str], label: str
) -> None:
    token, env = gnutls_card
    provider = ["--provider", module_path()]
    r = subprocess.run(
        [
            "p11tool",
            *provider,
            "--login",
            f"--generate-privkey={algo}",
            *extra,
            "--label",
            label,
            f"pkcs11:token={token}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BEGIN PUBLIC KEY" in r.stdout
    # The public key is listed before login; the private key only after.
    r = subprocess.run(
        ["p11tool", *provider, "--list-all", f"pkcs11:token={token}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"object={label};type=public" in r.stdout and "type=private" not in r.stdout, r.stdout
    tmpl = tmp_path / "cert.tmpl"
    tmpl.write_text('cn = "gnutls test"\nexpiration_days = 2\nsigning_key\n')
    cert = tmp_path / "cert.pem"
    key = f"pkcs11:token={token};object={label};type=private"
    r = subprocess.run(
        [
            "certtool",
            *provider,
            "--generate-self-signed",
            "--load-privkey",
            key,
            "--template",
            str(tmpl),
            "--outfile",
            str(cert),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cert), str(cert)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
