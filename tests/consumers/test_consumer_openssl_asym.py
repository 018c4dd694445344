"""OpenSSL 3 with pkcs11-provider using private keys held by the key service through
libpkcs11ws.so: `openssl req -new -x509 -key pkcs11:...;type=private`, `openssl dgst -sign`
checked against the exported public key, and a TLS 1.3 handshake where `openssl s_server` holds
its RSA (PSS) or EC key in the module and `openssl s_client` verifies it.

pkcs11-provider finds the public half (CKO_PUBLIC_KEY, same label and id) before login to learn
the key's type; the PIN reaches it as `pkcs11-module-token-pin` in a 0600 openssl.cnf, never argv
(pkcs11-provider 1.0's `file:PATH` form sent a wrong PIN here, with or without a newline).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse
from typing import Any

import pytest

from pkcs11ws.__main__ import module_path
from tests.consumers.test_dropin_openssl import modules_dir
from tests.support.cards import client_card
from tests.support.dropin_util import consumer_env, require
from tests.support.service import free_port


@pytest.fixture(scope="module")
def setup(service: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require(shutil.which("openssl"), "openssl", "openssl")
    provider = require(
        str(modules_dir() / "pkcs11.so"),
        "OpenSSL pkcs11-provider",
        "pkcs11-provider from bookworm-backports",
    )
    tool = require(shutil.which("pkcs11-tool"), "OpenSC pkcs11-tool", "opensc")
    name, pin = client_card(service.client_cfg, "o")
    tmp = tmp_path_factory.mktemp("ossl")
    cnf = tmp / "openssl.cnf"
    cnf.touch(0o600)
    cnf.write_text(
        "openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n"
        "[provider_sect]\ndefault = default_sect\npkcs11 = pkcs11_sect\n"
        "[default_sect]\nactivate = 1\n[pkcs11_sect]\n"
        f"module = {provider}\npkcs11-module-path = {module_path()}\n"
        f"pkcs11-module-token-pin = {pin}\nactivate = 1\n"
    )
    env = consumer_env(service.client_cfg, pin, OPENSSL_CONF=str(cnf))
    for key_type, label, key_id in (
        ("rsa:2048", "ossl-rsa", "51"),
        ("EC:prime256v1", "ossl-ec", "52"),
    ):
        r = subprocess.run(
            [
                tool,
                "--module",
                module_path(),
                "--token-label",
                name,
                "--login",
                "--pin",
                "env:PKCS11WS_TEST_PIN",
                "--keypairgen",
                "--key-type",
                key_type,
                "--label",
                label,
                "--id",
                key_id,
            ],
            env={**env, "PKCS11WS_TEST_PIN": pin},
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
    return {"env": env, "token": urllib.parse.quote(name), "tmp": tmp}


def _openssl(env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    return subprocess.run(["openssl", *args], env=env, capture_output=True, timeout=timeout)


def _uri(setup: dict[str, Any], label: str, kind: str) -> str:
    return f"pkcs11:token={setup['token']};object={label};type={kind}"


@pytest.mark.parametrize("label", ["ossl-ec", "ossl-rsa"])
def test_req_x509_and_dgst_sign(setup: dict[str, Any], label: str) -> None:
    env, tmp = setup["env"], setup["tmp"]
    cert = tmp / f"{label}.pem"
    r = _openssl(
        env,
        "req",
        "-new",
        "-x509",
        "-key",
        _uri(setup, label, "private"),
        "-subj",
        f"/CN={label}",
        "-days",
        "2",
        "-out",
        str(cert),
    )
    assert r.returncode == 0, r.stderr
    # The self-signed certificate's signature checks out with its own (module-held) key.
    r = _openssl(env, "verify", "-CAfile", str(cert), str(cert))
    assert r.returncode == 0 and b"OK" in r.stdout, r
    pub = tmp / f"{label}.pub"
    r = _openssl(env, "pkey", "-pubin", "-in", _uri(setup, label, "public"), "-out", str(pub))
    assert r.returncode == 0, r.stderr
    data = tmp / "data"
    data.write_bytes(b"signed by a key that never left the key service\n" * 50)
    sig = tmp / f"{label}.sig"
    r = _openssl(
        env, "dgst", "-sha256", "-sign", _uri(setup, label, "private"), "-out", str(sig), str(data)
    )
    assert r.returncode == 0, r.stderr
    plain = {k: v for k, v in env.items() if k != "OPENSSL_CONF"}
    r = _openssl(plain, "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(data))
    assert r.returncode == 0 and b"Verified OK" in r.stdout, r


@pytest.mark.parametrize("label,sigtype", [("ossl-ec", "ECDSA"), ("ossl-rsa", "RSA-PSS")])
def test_tls13_handshake_with_the_key_in_the_module(
    setup: dict[str, Any], label: str, sigtype: str
) -> None:
    env, tmp = setup["env"], setup["tmp"]
    cert = tmp / f"tls-{label}.pem"
    r = _openssl(
        env,
        "req",
        "-new",
        "-x509",
        "-key",
        _uri(setup, label, "private"),
        "-subj",
        "/CN=localhost",
        "-days",
        "2",
        "-out",
        str(cert),
    )
    assert r.returncode == 0, r.stderr
    port = free_port()
    server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-tls1_3",
            "-cert",
            str(cert),
            "-key",
            _uri(setup, label, "private"),
            "-www",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        plain = {k: v for k, v in env.items() if k != "OPENSSL_CONF"}
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-tls1_3",
                    "-CAfile",
                    str(cert),
                    "-verify_return_error",
                    "-servername",
                    "localhost",
                ],
                env=plain,
                input=b"GET / HTTP/1.0\r\n\r\n",
                capture_output=True,
                timeout=60,
            )
            if r.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.5)
        out = r.stdout.decode(errors="replace")
        assert r.returncode == 0, out + r.stderr.decode(errors="replace")
        assert "Verification: OK" in out and "TLSv1.3" in out
        assert f"Peer signature type: {sigtype}" in out, out
    finally:
        server.terminate()
        server.wait(timeout=15)
