"""OpenSSL 3 with pkcs11-provider (Debian bookworm-backports) as a consumer of libpkcs11ws.so.

pkcs11-provider 1.0 has no symmetric ciphers or MACs, so through OpenSSL our module serves
certificates: `openssl storeutl -certs 'pkcs11:...'` must find a public certificate written
through the module, before any login. Then an openssl.cnf that activates pkcs11-provider for the
whole process (OPENSSL_CONF): libcurl inside our module uses that same OpenSSL, so our own TLS
to the key service must still work and must not recurse into the provider, including with
`pkcs11-module-load-behavior = early`, where OpenSSL calls our module from inside libcurl's
start-up, from inside the module's own start-up on the same thread, or from another thread
that loads OpenSSL's configuration while the module starts (a C host, c/openssl_threads.c).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws.config import load_config
from tests.support.cards import client_card
from tests.support.certs import store_certificate
from tests.support.dropin_util import (
    MODULE_PLACEHOLDER,
    PIN_ENV,
    consumer_env,
    require,
    snippet,
)
from tests.support.p11ctypes import Module
from tests.support.stacks import run_or_dump

DOC_PROVIDER = "/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so"  # as the docs spell it
HERE = Path(__file__).resolve().parent


def modules_dir() -> Path:
    out = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True, check=True)
    m = re.search(r'MODULESDIR: "([^"]+)"', out.stdout)
    assert m is not None, out.stdout
    return Path(m.group(1))


@pytest.fixture(scope="module")
def provider_so() -> str:
    require(shutil.which("openssl"), "openssl", "openssl")
    return require(
        str(modules_dir() / "pkcs11.so"),
        "OpenSSL pkcs11-provider",
        "pkcs11-provider from bookworm-backports",
    )


@pytest.fixture(scope="module")
def cert_card(own_service):
    """A softcard holding a public certificate (written through the module) and a private
    one: (name, passphrase, public DER, private DER)."""
    name, pin = client_card(own_service.client_cfg, "s")
    m = Module(module_path())
    rv = m.initialize(str(own_service.client_cfg))
    assert rv in (C.CKR_OK, C.CKR_CRYPTOKI_ALREADY_INITIALIZED)
    h = m.open(m.slot_by_label(name))
    assert m.login(h, pin.encode()) == C.CKR_OK
    ders = [
        store_certificate(m, h, private, label, bytes([0x41 + private]))[1]
        for label, private in ((b"tls-cert", False), (b"hidden-cert", True))
    ]
    m.call("C_CloseSession", h)
    if rv == C.CKR_OK:
        m.call("C_Finalize", None)
    return name, pin, ders[0], ders[1]


def pem_certs(text: str) -> list[bytes]:
    found = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    return [x509.load_pem_x509_certificate(p.encode()).public_bytes(Encoding.DER) for p in found]


def hang_report(svc, *logs: Path) -> dict[str, Any]:
    """run_or_dump's arguments that make a hang say where it was: the stacks of the key
    service, the module's log (LOGFILEPATH of the client configuration), the service's, and
    `logs`."""
    module_log = Path(load_config(str(svc.client_cfg)).logfilepath)
    return {"also": [("key service", svc.pid)], "logs": [module_log, svc.log, *logs]}


def storeutl(svc, env: dict[str, str], uri: str, *provider_args: str):
    cmd = ["openssl", "storeutl", *provider_args, "-certs", uri]
    return run_or_dump(cmd, env=env, timeout=90, **hang_report(svc))


def openssl_cnf(path: Path, provider_so: str, early: bool, module: str | None = None) -> Path:
    """The openssl.cnf of README.md (optionally with early loading) for our module (or the copy
    at `module`)."""
    module = module or module_path()
    path_line = f"pkcs11-module-path = {module}\n"
    text = snippet("openssl-cnf", {MODULE_PLACEHOLDER: module, DOC_PROVIDER: provider_so})
    if early:
        assert path_line in text
        text = text.replace(path_line, path_line + "pkcs11-module-load-behavior = early\n")
    path.write_text(text)
    return path


def test_storeutl_reads_public_certificate(own_service, cert_card, provider_so):
    name, _, public, _ = cert_card
    env = consumer_env(own_service.client_cfg, PKCS11_PROVIDER_MODULE=module_path())
    args = ("-provider", "pkcs11", "-provider", "default")
    token = urllib.parse.quote(name)
    for uri in (
        f"pkcs11:token={token};object=tls-cert",
        f"pkcs11:token={token};id=%41",
        f"pkcs11:token={token};type=cert",
    ):
        r = storeutl(own_service, env, uri, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        # Not logged in: only the public certificate exists for OpenSSL.
        assert pem_certs(r.stdout) == [public], uri
        assert "Total found: 1" in r.stdout
    r = storeutl(own_service, env, f"pkcs11:token={token};object=no-such-cert", *args)
    assert pem_certs(r.stdout) == [] and "Total found: 0" in r.stdout


@pytest.mark.parametrize("early", [False, True], ids=["default-load", "early-load"])
def test_global_openssl_conf_keeps_our_tls_working(
    own_service, cert_card, provider_so, tmp_path, early
):
    name, pin, public, _ = cert_card
    cnf = openssl_cnf(tmp_path / "openssl.cnf", provider_so, early)
    log = tmp_path / "p11prov.log"
    env = consumer_env(
        own_service.client_cfg,
        pin,
        OPENSSL_CONF=str(cnf),
        PKCS11_PROVIDER_DEBUG=f"file:{log},level:1",
    )
    # The provider comes from the configuration alone (no -provider option).
    r = storeutl(own_service, env, f"pkcs11:token={urllib.parse.quote(name)};object=tls-cert")
    assert r.returncode == 0, r.stdout + r.stderr
    assert pem_certs(r.stdout) == [public]
    assert "OSSL_provider_init" in log.read_text()
    # A consumer that loads our module itself while OpenSSL loads the provider for the
    # process: login, key generation and a MAC all go over our TLS, without recursing.
    tool = require(shutil.which("pkcs11-tool"), "OpenSC pkcs11-tool", "opensc")
    base = [
        tool,
        "--module",
        module_path(),
        "--token-label",
        name,
        "--login",
        "--pin",
        f"env:{PIN_ENV}",
    ]
    label = f"conf-{'early' if early else 'late'}"
    for extra in (
        [
            "--keygen",
            "--key-type",
            "GENERIC:32",
            "--label",
            label,
            "--id",
            "77",
            "--private",
            "--sensitive",
            "--usage-sign",
        ],
        ["-O"],
    ):
        # A hang here was seen twice in full suite runs (never alone): it fails with stacks.
        r = run_or_dump([*base, *extra], env=env, timeout=60, **hang_report(own_service, log))
        assert r.returncode == 0, r.stdout + r.stderr
    assert label in r.stdout and "tls-cert" in r.stdout and "hidden-cert" in r.stdout


def package_copy(src: Path, file: str, code: str, first: bool = False) -> str:
    """A copy of the package under src in a source-tree layout (it boots on the project's
    interpreter: the in-place build's pkcs11ws/_native/dev-interpreter, which has the
    dependencies), with code added to one of its files: at its end, or (first) before its own
    imports: after its `from __future__` line, if any. Returns the copy's module."""
    shutil.copytree(
        Path(module_path()).parents[1],
        src / "pkcs11ws",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    py = src / "pkcs11ws" / file
    text = py.read_text()
    future = "from __future__ import annotations\n"
    if first and future in text:
        text = text.replace(future, future + code, 1)
    elif first:
        text = code + text
    else:
        text += code
    py.write_text(text)
    return str(src / "pkcs11ws" / "_native" / "libpkcs11ws.so")


# Where OpenSSL's configuration would get loaded first inside the module (the file of a copy of
# the package that imports hashlib): the boot (under the loader's boot lock; the core imported
# hashlib there for a while), or C_Initialize (under the core's state lock: it imports the
# provider and the client). The loader now loads OpenSSL's configuration itself first, before
# it takes its lock (loader.c, p11ws_load_openssl_config), so in both the call back meets the
# boot; the core's own same-thread guard (_state_lock) stays for an OpenSSL it does not find.
INSIDE = {"boot": "__init__.py", "C_Initialize": "provider.py"}
CALLED_INSIDE = "libpkcs11ws: called from inside its own start-up"


@pytest.mark.parametrize("where", list(INSIDE))
def test_openssl_configured_inside_our_own_start_up(
    own_service, cert_card, provider_so, tmp_path, where
):
    """OpenSSL's configuration loaded for the first time while the module starts (an import of
    hashlib; a venv's sitecustomize can do the same): pkcs11-provider, loaded early, calls this
    module from inside that start-up, on the same thread. That inner call fails at once (so the
    provider gives up) and the start-up goes on; it used to wait for a lock its own thread held,
    for ever (pkcs11-tool hung, with no output)."""
    name = cert_card[0]
    hashlib = "\nimport hashlib  # loads OpenSSL's configuration\n"
    module = package_copy(tmp_path / "src", INSIDE[where], hashlib)
    cnf = openssl_cnf(tmp_path / "openssl.cnf", provider_so, True, module)
    log = tmp_path / "p11prov.log"
    env = consumer_env(
        own_service.client_cfg, OPENSSL_CONF=str(cnf), PKCS11_PROVIDER_DEBUG=f"file:{log},level:1"
    )
    tool = require(shutil.which("pkcs11-tool"), "OpenSC pkcs11-tool", "opensc")
    r = run_or_dump(
        [tool, "--module", module, "-L"], env=env, timeout=60, **hang_report(own_service, log)
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"token label        : {name}" in r.stdout
    # The provider did call in from inside (the case this test is about) and was refused.
    assert CALLED_INSIDE in r.stderr, r.stderr


# The rendezvous of tests/consumers/c/openssl_threads.c, added to the copy's file before its own
# imports, then OpenSSL's configuration loaded there.
RENDEZVOUS = """import ctypes as _host_ctypes  # the host's rendezvous (test_dropin_openssl.py)
_host_ctypes.CDLL(None).host_in_startup()
import hashlib  # loads OpenSSL's configuration
"""


def compile_c(tmp_path: Path, source: str, out: str, *flags: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / out
    include = str(HERE.parents[1] / "include")
    cmd = [cc, "-O1", "-Wall", "-Wextra", "-Werror", "-I", include, "-o", str(exe)]
    subprocess.run([*cmd, str(HERE / "c" / source), *flags], check=True)
    return exe


# (the file of the copy that meets the host, pkcs11-provider's early loading)
ANOTHER_THREAD = {
    "boot-early": ("__init__.py", True),
    "C_Initialize-early": ("provider.py", True),
    "C_Initialize-late": ("provider.py", False),
}


@pytest.mark.parametrize("case", list(ANOTHER_THREAD))
def test_openssl_on_another_thread_during_our_start_up(own_service, provider_so, tmp_path, case):
    """Thread A starts the module; inside that start-up (the boot, or C_Initialize), while the
    module holds its lock, thread B loads OpenSSL's configuration, whose pkcs11-provider (early)
    calls the module and so waits for that lock; then A's start-up needs OpenSSL's
    configuration, which B is loading. That hung for ever (openssl_threads.c; the rendezvous
    makes the order certain). The loader now loads the configuration before it takes any lock:
    here A loads it (pkcs11-provider's call back on A fails at once), B finds it loaded, and
    both threads finish. With late loading, B's first use of pkcs11-provider (a store) calls
    the module during A's C_Initialize and waits for it: A needs nothing B holds, and both end."""
    file, early = ANOTHER_THREAD[case]
    host = compile_c(tmp_path, "openssl_threads.c", "host", "-rdynamic", "-lcrypto", "-lpthread")
    shim = compile_c(tmp_path, "shim_module.c", "shim.so", "-shared", "-fPIC")
    module = package_copy(tmp_path / "src", file, RENDEZVOUS, first=True)
    cnf = openssl_cnf(tmp_path / "openssl.cnf", provider_so, early, str(shim))
    env = consumer_env(own_service.client_cfg, OPENSSL_CONF=str(cnf), P11WS_SHIM_TARGET=module)
    if not early:
        env["HOST_B_STORE"] = "pkcs11:"
    r = run_or_dump([str(host), module], env=env, timeout=120, **hang_report(own_service))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "A: C_Initialize 0x0" in lines, r.stdout + r.stderr
    assert "A: inside the module's start-up: starting B" in lines, r.stdout
    assert "B: OpenSSL configured" in lines and lines[-1] == "done", r.stdout
    if early:
        # The configuration was loaded by A, before the start-up took its lock.
        assert "shim called by A 1, by B 0" in lines, r.stdout
        assert CALLED_INSIDE in r.stderr, r.stderr
    else:
        assert "A: B is calling the module" in lines
        assert "shim called by A 0, by B 1" in lines and "B: store read" in lines, r.stdout
