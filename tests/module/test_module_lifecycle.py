"""libpkcs11ws.so's life cycle in a C host: C_Initialize arguments, C_Finalize under load.

The host (tests/module/c/lifecycle.c) is compiled by the test against include/pkcs11ws_ck.h and
dlopen()s the module RTLD_LOCAL, like pkcs11-tool or a JVM does.

- pReserved: pointers a host gets wrong (unmapped, unterminated, too long) answer
  CKR_ARGUMENTS_BAD instead of crashing the host (google pkcs11test's Init.InitArgsBadReserved
  passes such a pointer); `config=PATH` and free-form strings keep working; mutex callbacks
  all or none.
- C_Finalize while 6 threads are inside C_GetSlotList: with the key service unreachable
  (a closed port, MAXRETRIES 256, RETRYDELAY 0: the threads sit in retries), 100 rounds of
  C_Finalize/C_Initialize, three runs; and the same against the live service. The host must
  neither crash nor hang, and calls between C_Finalize and C_Initialize answer
  CKR_CRYPTOKI_NOT_INITIALIZED.
- Thread churn (issue 16): short-lived host threads, one at a time, each C_OpenSession + C_Sign
  (HMAC, 64 bytes, checked) + C_CloseSession. Every ended thread's Python thread state is freed
  (a pthread key destructor in the loader), so RSS stays flat after the first 1,000 threads:
  under 8 MB of growth (it was ~79 KB per thread, 79 MB per 1,000, before). 20,000 threads as
  issue 16 asks (about 45 s on a loaded 2-core machine; PKCS11WS_TEST_CHURN_THREADS overrides).
  Threads that end after C_Finalize, and threads of a forked child, are freed too. The same with
  a Python host: python-pkcs11 driven from short-lived `threading` threads (Python owns those
  thread states; the module must leave them to Python and must not grow either), 5,000 in CI
  since Python threads cost more to start (PKCS11WS_TEST_PY_CHURN_THREADS=20000 for the issue's
  count). In both, the service (its /metrics counter) accepts at most a handful of new TLS
  connections: the module's curl handles are pooled per server and outlive their threads.
- The same C host built with AddressSanitizer (use after free, overflows, double frees in the
  loader, the Cython core, libcurl, CPython's raw allocations such as thread states) and
  LeakSanitizer at exit, over reserved, both races and a churn. Why the C host and not a Python
  one: in a C host ASan sees every malloc of the process without LD_PRELOAD tricks, and only
  CPython's object allocator needs suppressing (tests/module/c/lsan-cpython.supp says why); a
  CPython host under ASan would need libasan preloaded and leak checks off for the interpreter.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pkcs11ws.__main__ import module_path
from pkcs11ws.server import settings
from tests.support.service import Api, b64, free_port, new_idem

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "c" / "lifecycle.c"
# Generous: CI runs on a loaded 2-core machine. A hang is what this catches, not slowness.
RACE_TIMEOUT = 300
CHURN_THREADS = int(os.environ.get("PKCS11WS_TEST_CHURN_THREADS", "20000"))
CHURN_GROWTH_KB = 8 * 1024
# New TLS connections the service may accept during a churn run (its own metric, server-side):
# handles are pooled per server and outlive their threads, so a handful, not one per thread.
MAX_CHURN_CONNECTIONS = 8
MESSAGE = bytes((j * 3 + 1) & 0xFF for j in range(64))  # as in lifecycle.c


def compile_host(out: Path, *flags: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    subprocess.run(
        [
            cc,
            "-O1",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            *flags,
            "-I",
            str(ROOT / "include"),
            "-o",
            str(out),
            str(SOURCE),
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def lifecycle_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_host(tmp_path_factory.mktemp("lifecycle") / "lifecycle")


def run_host(
    lifecycle_host: Path,
    env: dict[str, str],
    *args: str,
    stdin: str = "",
    timeout: float = RACE_TIMEOUT,
    prefix: tuple[str, ...] = (),
):
    full = {**os.environ, **env}
    full.pop("PYTHONPATH", None)
    return subprocess.run(
        [*prefix, str(lifecycle_host), module_path(), *args],
        input=stdin,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def outage_env(service) -> dict[str, str]:
    """The service's client configuration, pointed at a port nothing listens on."""
    return {
        "PKCS11WS_CONFIG": str(service.client_cfg),
        "PKCS11WS_PORT": str(free_port()),
        "PKCS11WS_MAXRETRIES": "256",
        "PKCS11WS_RETRYDELAY": "0",
        "PKCS11WS_LOGLEVEL": "1",
    }


def test_initialize_rejects_bad_reserved_pointers_and_keeps_strings(lifecycle_host, service):
    r = run_host(
        lifecycle_host,
        {"PKCS11WS_CONFIG": str(service.client_cfg)},
        "reserved",
        str(service.client_cfg),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "ok reserved", r.stdout


def check_race(r: subprocess.CompletedProcess[str], rounds: int) -> re.Match[str]:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    m = re.search(r"race rounds (\d+) calls (\d+) ok (\d+)", r.stdout)
    assert m is not None and int(m.group(1)) == rounds, r.stdout
    assert r.stdout.splitlines()[-1] == "ok race", r.stdout
    return m


@pytest.mark.parametrize("run", [1, 2, 3])
def test_finalize_while_threads_retry_during_an_outage(lifecycle_host, service, run):
    r = run_host(lifecycle_host, outage_env(service), "race", "100")
    m = check_race(r, 100)
    # Nothing answers on that port: no call can have succeeded... except none was made at all.
    assert int(m.group(2)) > 0 and int(m.group(3)) == 0, r.stdout


def test_finalize_while_threads_call_the_live_service(lifecycle_host, service, api):
    churn_input(api)  # at least one softcard for the session threads
    env = {"PKCS11WS_CONFIG": str(service.client_cfg), "PKCS11WS_LOGLEVEL": "1"}
    r = run_host(lifecycle_host, env, "race", "100", "sessions")
    m = check_race(r, 100)
    assert int(m.group(3)) > 0, r.stdout


def churn_input(api: Api) -> tuple[str, str]:
    """A softcard with an HMAC key; returns (host stdin, passphrase)."""
    name = "ch" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    card = api.ok(
        api.post(
            "/km/v1/softcards", {"name": name, "passphrase": b64(pin.encode())}, idem=new_idem()
        )
    )["id"]
    token = api.activate(card, pin.encode())
    value = os.urandom(32)
    api.import_key(
        card,
        token,
        0x2B,
        value,
        CKA_SIGN=True,
        CKA_TOKEN=True,
        CKA_PRIVATE=True,
        CKA_LABEL=b"churn-hmac",
    )
    mac = hmac.new(value, MESSAGE, hashlib.sha256).hexdigest()
    return f"TOKEN {name}\nPIN {pin}\nKEY churn-hmac\nMAC {mac}\n", pin


def rss_points(stdout: str) -> dict[int, int]:
    return {
        int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^rss (\d+) (\d+)$", stdout, re.M)
    }


def tls_connections(service) -> float:
    """The service's count of TLS connections accepted (/metrics on its admin listener)."""
    port = settings.load(service.server_yaml).admin_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pkcs11ws_tls_connections_total":
                return float(sample.value)
    raise AssertionError("pkcs11ws_tls_connections_total not in /metrics")


def connections_since(service, before: float) -> float:
    # Worker processes publish their counts every 0.5 s (pkcs11ws.server.metrics).
    time.sleep(1.5)
    return tls_connections(service) - before


def test_thread_churn_does_not_grow(lifecycle_host, service, api):
    stdin, pin = churn_input(api)
    env = {"PKCS11WS_CONFIG": str(service.client_cfg), "PKCS11WS_LOGLEVEL": "1"}
    before = tls_connections(service)
    r = run_host(lifecycle_host, env, "churn", str(CHURN_THREADS), stdin=stdin, timeout=600)
    connections = connections_since(service, before)
    assert pin not in r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == "ok churn", r.stdout
    rss = rss_points(r.stdout)
    assert 1000 in rss and CHURN_THREADS in rss, r.stdout
    growth = rss[CHURN_THREADS] - rss[1000]
    assert growth < CHURN_GROWTH_KB, (
        f"RSS grew {growth} kB after the first 1,000 threads\n{r.stdout}"
    )
    # The host also failed unless every ended thread's thread state was freed: shown here.
    assert re.search(r"^thread states before (\d+) after \1$", r.stdout, re.M), r.stdout
    print(r.stdout, f"new TLS connections: {connections:.0f}")
    assert 1 <= connections <= MAX_CHURN_CONNECTIONS, connections


PY_CHURN = r"""
import hashlib, hmac, os, sys, threading
import pkcs11
from pkcs11 import Mechanism, ObjectClass

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

name, count = sys.argv[2], int(sys.argv[3])
pin, mac_hex = sys.stdin.readline().strip(), sys.stdin.readline().strip()
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=name)
login = token.open(user_pin=pin)  # the login belongs to the token: every session is logged in
msg = bytes((j * 3 + 1) & 0xFF for j in range(64))
failed = []

def work():
    try:
        with token.open() as s:
            key = s.get_key(object_class=ObjectClass.SECRET_KEY, label="churn-hmac")
            if key.sign(msg, mechanism=Mechanism.SHA256_HMAC).hex() != mac_hex:
                failed.append("wrong MAC")
    except Exception as e:
        failed.append(repr(e))

print("rss 0", rss_kb(), flush=True)
for i in range(1, count + 1):
    t = threading.Thread(target=work)
    t.start()
    t.join()
    if failed:
        print("FAIL", failed[0], flush=True)
        sys.exit(1)
    if i % 500 == 0 or i == count:
        print("rss", i, rss_kb(), flush=True)
login.close()
print("ok pychurn")
"""
PY_CHURN_THREADS = int(os.environ.get("PKCS11WS_TEST_PY_CHURN_THREADS", "5000"))


def test_thread_churn_in_a_python_host_does_not_grow(service, api):
    stdin, pin = churn_input(api)
    name = stdin.split("\n")[0].split()[1]
    mac = stdin.split("MAC ")[1].strip()
    env = {**os.environ, "PKCS11WS_CONFIG": str(service.client_cfg), "PKCS11WS_LOGLEVEL": "1"}
    before = tls_connections(service)
    r = subprocess.run(
        [sys.executable, "-c", PY_CHURN, module_path(), name, str(PY_CHURN_THREADS)],
        input=f"{pin}\n{mac}\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pin not in r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == "ok pychurn", r.stdout
    rss = rss_points(r.stdout)
    growth = rss[PY_CHURN_THREADS] - rss[500]
    assert growth < CHURN_GROWTH_KB, f"RSS grew {growth} kB after the first 500 threads\n{r.stdout}"
    connections = connections_since(service, before)
    print(r.stdout, f"new TLS connections: {connections:.0f}")
    assert 1 <= connections <= MAX_CHURN_CONNECTIONS, connections


def test_thread_states_freed_after_finalize_and_in_a_forked_child(lifecycle_host, service, api):
    stdin, pin = churn_input(api)
    env = {"PKCS11WS_CONFIG": str(service.client_cfg), "PKCS11WS_LOGLEVEL": "1"}
    r = run_host(lifecycle_host, env, "exits", "100", stdin=stdin, timeout=300)
    assert pin not in r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "ok exits", r.stdout
    assert any(line.startswith("child: 100 threads, thread states") for line in lines), r.stdout


ASAN_CHURN_THREADS = 300


@pytest.fixture(scope="module")
def asan_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_host(
        tmp_path_factory.mktemp("lifecycle_asan") / "lifecycle_asan",
        "-fsanitize=address",
        "-fno-omit-frame-pointer",
    )


def test_c_host_under_address_sanitizer(asan_host, own_service, make_api):
    # Its own service: a softcard name over 32 characters left on the shared service by another
    # test makes slot listing hash it for the label, and hashlib's OpenSSL objects then live
    # (unscanned by LeakSanitizer) as long as the never-finalised interpreter.
    service = own_service
    api = make_api(service)
    supp = Path(__file__).resolve().parent / "c" / "lsan-cpython.supp"
    # malloc_context_size=2: the suppressions judge a leak by the function that called malloc.
    asan = {
        "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=0"
        ":malloc_context_size=2",
        "LSAN_OPTIONS": f"suppressions={supp}:print_suppressions=0",
    }
    live = {"PKCS11WS_CONFIG": str(service.client_cfg), "PKCS11WS_LOGLEVEL": "1", **asan}
    no_leaks = asan["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
    stdin, _ = churn_input(api)
    runs = [
        (live, ("reserved", str(service.client_cfg)), ""),
        ({**outage_env(service), **asan}, ("race", "20"), ""),
        (live, ("race", "20", "sessions"), ""),
        (live, ("churn", str(ASAN_CHURN_THREADS)), stdin),
        # It exits with module threads still alive: LeakSanitizer's exit-time tracer crashes
        # suspending them here ("Tracer caught signal 11"), so this run checks memory only.
        ({**live, "ASAN_OPTIONS": no_leaks}, ("exits", "50"), stdin),
    ]
    for env, args, text in runs:
        r = run_host(asan_host, env, *args, stdin=text)
        assert "Sanitizer" not in r.stderr, f"{args}: {r.stderr[-6000:]}"
        assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        assert r.stdout.splitlines()[-1] == f"ok {args[0]}", r.stdout
