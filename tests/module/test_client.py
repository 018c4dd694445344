"""KeyServiceClient against the real key service over real mutual TLS.

Uses the `service` (session) and `fresh_service` (per test) fixtures of tests/conftest.py:
objects with dir, port, url, client_cfg, ca, cert, key, server_yaml and pid.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from pkcs11ws._native import core
from pkcs11ws.client import KeyServiceClient
from pkcs11ws.config import load_config
from pkcs11ws.errors import Finalizing, ServiceError, TransportError
from pkcs11ws.log import Logger
from tests.support.certs import key_pem, self_signed_cert
from tests.support.fault_util import serve_again

PASS = b"correct horse 1"


def make_client(svc: Any, logger: Logger | None = None, **overrides: object) -> KeyServiceClient:
    env = {f"PKCS11WS_{k.upper()}": str(v) for k, v in overrides.items()}
    cfg = load_config(str(svc.client_cfg), environ=env)
    return KeyServiceClient(cfg, logger if logger is not None else Logger())


def unique_name() -> str:
    return "t" + uuid.uuid4().hex[:16]


@pytest.fixture(scope="module")
def cl(service) -> Iterator[KeyServiceClient]:
    c = make_client(service, maxretries=0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def cl_card(cl: KeyServiceClient) -> tuple[str, str]:
    """A softcard (id) with an activation token."""
    sc = cl.create_softcard(unique_name(), PASS)
    token, expires_in = cl.activate(sc["id"], PASS)
    assert expires_in > 0
    return sc["id"], token


AES_KEY = bytes(range(32))
HMAC_KEY = b"k" * 32


@pytest.fixture(scope="module")
def keys(cl: KeyServiceClient, cl_card: tuple[str, str]) -> dict[str, str]:
    cid, tok = cl_card
    aes = cl.create_object(
        cid,
        tok,
        {
            "CKA_CLASS": C.CKO_SECRET_KEY,
            "CKA_KEY_TYPE": C.CKK_AES,
            "CKA_VALUE": AES_KEY,
            "CKA_LABEL": b"aes",
        },
    )
    mac = cl.create_object(
        cid,
        tok,
        {
            "CKA_CLASS": C.CKO_SECRET_KEY,
            "CKA_KEY_TYPE": C.CKK_SHA256_HMAC,
            "CKA_VALUE": HMAC_KEY,
            "CKA_LABEL": b"mac",
        },
    )
    return {"aes": aes["handle"], "mac": mac["handle"]}


def ckr_of(fn, *args, **kw) -> tuple[int, str]:
    with pytest.raises(ServiceError) as ei:
        fn(*args, **kw)
    return ei.value.ckr, ei.value.code


# --------------------------------------------------------------------------------------------
# Typed wrappers: round trips.


def test_health(cl: KeyServiceClient) -> None:
    h = cl.health()
    assert h["status"] == "ok" and h["protocol"] == "1.0"


def test_softcard_lifecycle(cl: KeyServiceClient) -> None:
    name = unique_name()
    sc = cl.create_softcard(name, b"p-8bytes")
    assert sc["name"] == name and sc["keys"] == 0
    listed = {c["id"]: c for c in cl.list_softcards()}
    assert listed[sc["id"]]["name"] == name
    token, _ = cl.activate(sc["id"], b"p-8bytes")
    cl.generate_key(sc["id"], token, "CKM_AES_KEY_GEN", {"CKA_VALUE_LEN": 16})
    assert ckr_of(cl.delete_softcard, sc["id"]) == (C.CKR_FUNCTION_FAILED, "SOFTCARD_NOT_EMPTY")
    cl.delete_softcard(sc["id"], force=True)
    assert sc["id"] not in {c["id"] for c in cl.list_softcards()}


def test_objects_create_search_get_delete(cl: KeyServiceClient, cl_card: tuple[str, str]) -> None:
    cid, tok = cl_card
    label = unique_name().encode()
    obj = cl.create_object(
        cid,
        tok,
        {"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": label, "CKA_VALUE": b"\x00data\xff"},
    )
    assert obj["attrs"]["CKA_LABEL"] == label
    found = cl.search_objects(cid, tok, {"CKA_LABEL": label})
    assert [o["handle"] for o in found] == [obj["handle"]]
    got = cl.get_object(cid, tok, obj["handle"])
    assert got["attrs"]["CKA_VALUE"] == b"\x00data\xff"
    assert got["attrs"]["CKA_CLASS"] == C.CKO_DATA
    everything = cl.search_objects(cid, tok, {})
    assert obj["handle"] in {o["handle"] for o in everything}
    cl.delete_object(cid, tok, obj["handle"])
    assert cl.search_objects(cid, tok, {"CKA_LABEL": label}) == []


def test_certificate_object(cl: KeyServiceClient, cl_card: tuple[str, str], service) -> None:
    cid, tok = cl_card
    cert = x509.load_pem_x509_certificate(Path(service.cert).read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    subject = cert.subject.public_bytes()
    obj = cl.create_object(
        cid,
        tok,
        {
            "CKA_CLASS": C.CKO_CERTIFICATE,
            "CKA_CERTIFICATE_TYPE": C.CKC_X_509,
            "CKA_VALUE": der,
            "CKA_SUBJECT": subject,
            "CKA_PRIVATE": True,
        },
    )
    assert cl.get_object(cid, tok, obj["handle"])["attrs"]["CKA_VALUE"] == der
    cl.delete_object(cid, tok, obj["handle"])


def test_generate_keys(cl: KeyServiceClient, cl_card: tuple[str, str]) -> None:
    cid, tok = cl_card
    aes = cl.generate_key(cid, tok, "CKM_AES_KEY_GEN", {"CKA_VALUE_LEN": 32, "CKA_LABEL": b"g"})
    a = aes["attrs"]
    assert (a["CKA_KEY_TYPE"], a["CKA_VALUE_LEN"], a["CKA_LOCAL"]) == (C.CKK_AES, 32, True)
    assert "CKA_VALUE" not in a  # never returned for secret keys
    ct = cl.encrypt(tok, aes["handle"], "CKM_AES_CBC_PAD", bytes(16), b"x")
    assert cl.decrypt(tok, aes["handle"], "CKM_AES_CBC_PAD", bytes(16), ct) == b"x"
    mac = cl.generate_key(cid, tok, "CKM_SHA256_KEY_GEN", {"CKA_VALUE_LEN": 32})
    assert mac["attrs"]["CKA_KEY_TYPE"] == C.CKK_SHA256_HMAC
    sig = cl.sign(tok, mac["handle"], "CKM_SHA256_HMAC", b"data")
    cl.verify(tok, mac["handle"], "CKM_SHA256_HMAC", b"data", sig)


def test_encrypt_decrypt_match_local_aes(cl, cl_card, keys) -> None:
    _, tok = cl_card
    iv = os.urandom(16)
    data = os.urandom(64)
    ct = cl.encrypt(tok, keys["aes"], "CKM_AES_CBC", iv, data)
    enc = Cipher(algorithms.AES(AES_KEY), modes.CBC(iv)).encryptor()
    assert ct == enc.update(data) + enc.finalize()
    assert cl.decrypt(tok, keys["aes"], "CKM_AES_CBC", iv, ct) == data
    # Chaining: the last ciphertext block continues the CBC chain in a following call.
    ct1 = cl.encrypt(tok, keys["aes"], "CKM_AES_CBC", iv, data[:32])
    ct2 = cl.encrypt(tok, keys["aes"], "CKM_AES_CBC", ct1[-16:], data[32:])
    assert ct1 + ct2 == ct
    padded = cl.encrypt(tok, keys["aes"], "CKM_AES_CBC_PAD", iv, b"hello")
    assert len(padded) == 16
    assert cl.decrypt(tok, keys["aes"], "CKM_AES_CBC_PAD", iv, padded) == b"hello"


def test_large_body_goes_without_expect_delay(cl, cl_card, keys) -> None:
    _, tok = cl_card
    data = os.urandom(64 * 1024)
    t0 = time.monotonic()
    ct = cl.encrypt(tok, keys["aes"], "CKM_AES_CBC", bytes(16), data)
    assert cl.decrypt(tok, keys["aes"], "CKM_AES_CBC", bytes(16), ct) == data
    # With "Expect: 100-continue" libcurl would wait up to 1 s for the server's 100 answer.
    assert time.monotonic() - t0 < 0.9


def test_sign_verify_match_local_hmac(cl, cl_card, keys) -> None:
    _, tok = cl_card
    data = b"message to authenticate"
    expected = hmac.new(HMAC_KEY, data, hashlib.sha256).digest()
    assert cl.sign(tok, keys["mac"], "CKM_SHA256_HMAC", data) == expected
    cl.verify(tok, keys["mac"], "CKM_SHA256_HMAC", data, expected)
    short = cl.sign(tok, keys["mac"], "CKM_SHA256_HMAC_GENERAL", data, mac_length=20)
    assert short == expected[:20]
    cl.verify(tok, keys["mac"], "CKM_SHA256_HMAC_GENERAL", data, short, mac_length=20)


def test_random(cl: KeyServiceClient) -> None:
    a, b = cl.random(32), cl.random(32)
    assert len(a) == len(b) == 32 and a != b


def test_deactivate_ends_the_token(cl: KeyServiceClient) -> None:
    sc = cl.create_softcard(unique_name(), b"pw-8bytes")
    token, _ = cl.activate(sc["id"], b"pw-8bytes")
    assert cl.search_objects(sc["id"], token, {}) == []
    cl.deactivate(sc["id"], token)
    assert ckr_of(cl.search_objects, sc["id"], token, {})[0] == C.CKR_USER_NOT_LOGGED_IN
    cl.delete_softcard(sc["id"])


# --------------------------------------------------------------------------------------------
# Error mapping.


def test_error_mapping(cl: KeyServiceClient, cl_card, keys) -> None:
    cid, tok = cl_card
    missing = str(uuid.uuid4())
    iv = bytes(16)
    cases = [
        (cl.activate, (cid, b"wrong passphrase"), C.CKR_PIN_INCORRECT, "PASSPHRASE_INCORRECT"),
        (cl.activate, (missing, PASS), C.CKR_TOKEN_NOT_PRESENT, "SOFTCARD_NOT_FOUND"),
        (cl.encrypt, (tok, missing, "CKM_AES_CBC", iv, iv), C.CKR_KEY_HANDLE_INVALID,
         "KEY_NOT_FOUND"),
        (cl.get_object, (cid, tok, missing), C.CKR_OBJECT_HANDLE_INVALID, "OBJECT_NOT_FOUND"),
        (cl.delete_object, (cid, tok, missing), C.CKR_OBJECT_HANDLE_INVALID, "OBJECT_NOT_FOUND"),
        (cl.search_objects, (cid, "not-a-token", {}), C.CKR_USER_NOT_LOGGED_IN, "NOT_ACTIVATED"),
        (cl.sign, ("bogus", keys["mac"], "CKM_SHA256_HMAC", b"d"), C.CKR_USER_NOT_LOGGED_IN,
         "NOT_ACTIVATED"),
        (cl.create_softcard, ("bad name!", PASS), C.CKR_ARGUMENTS_BAD, "INVALID_NAME"),
        (cl.create_softcard, ("ok", b"x" * 257), C.CKR_PIN_LEN_RANGE, "PASSPHRASE_LEN_RANGE"),
        (cl.encrypt, (tok, keys["aes"], "CKM_AES_CBC", iv, b"12345"), C.CKR_DATA_LEN_RANGE,
         "DATA_LEN_RANGE"),
        (cl.decrypt, (tok, keys["aes"], "CKM_AES_CBC", iv, b"12345"),
         C.CKR_ENCRYPTED_DATA_LEN_RANGE, "ENCRYPTED_DATA_LEN_RANGE"),
        (cl.encrypt, (tok, keys["aes"], "CKM_AES_CBC", b"short", iv),
         C.CKR_MECHANISM_PARAM_INVALID, "MECHANISM_PARAM_INVALID"),
        (cl.encrypt, (tok, keys["aes"], "CKM_NOPE", iv, iv), C.CKR_MECHANISM_INVALID,
         "MECHANISM_INVALID"),
        (cl.verify, (tok, keys["mac"], "CKM_SHA256_HMAC", b"d", b"\0" * 32),
         C.CKR_SIGNATURE_INVALID, "SIGNATURE_INVALID"),
        (cl.verify, (tok, keys["mac"], "CKM_SHA256_HMAC", b"d", b"\0" * 5),
         C.CKR_SIGNATURE_LEN_RANGE, "SIGNATURE_LEN_RANGE"),
        (cl.generate_key, (cid, tok, "CKM_AES_KEY_GEN", {"CKA_VALUE_LEN": 7}),
         C.CKR_KEY_SIZE_RANGE, "KEY_SIZE_RANGE"),
        (cl.generate_key, (cid, tok, "CKM_AES_KEY_GEN", {}), C.CKR_TEMPLATE_INCOMPLETE,
         "TEMPLATE_INCOMPLETE"),
        (cl.random, (0,), C.CKR_ARGUMENTS_BAD, "BAD_REQUEST"),
    ]  # fmt: skip
    for fn, args, ckr, code in cases:
        got = ckr_of(fn, *args)
        assert got == (ckr, code), (fn.__name__, args, got)
    # A duplicate softcard name.
    name = unique_name()
    sc = cl.create_softcard(name, PASS)
    assert ckr_of(cl.create_softcard, name, PASS) == (C.CKR_FUNCTION_FAILED, "SOFTCARD_EXISTS")
    cl.delete_softcard(sc["id"])


def test_errors_are_not_retried(service) -> None:
    c = make_client(service, maxretries=5, retrydelay=10)
    c.health()
    before = c.stats()["requests"]
    t0 = time.monotonic()
    with pytest.raises(ServiceError):
        c.get_object("nocard", "notoken", str(uuid.uuid4()))
    with pytest.raises(ServiceError):
        c.activate(str(uuid.uuid4()), PASS)
    assert c.stats()["requests"] - before == 2
    assert time.monotonic() - t0 < 5
    c.close()


# --------------------------------------------------------------------------------------------
# Connections: keep-alive, threads, fork.


def test_statistics_exact_across_threads_and_close(service) -> None:
    """Each handle counts its own requests (no lock per request): the sum is exact with
    threads sharing the pool, and survives the handles being closed."""
    c = make_client(service)

    def work() -> None:
        for _ in range(25):
            c.health()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    got = c.stats()
    assert got["requests"] == 200 and got["failures"] == 0
    assert 1 <= got["connects"] <= 8
    c.close()
    assert c.stats() == got


def test_keep_alive_one_connect_for_100_requests(service) -> None:
    c = make_client(service)
    for _ in range(100):
        c.health()
    assert c.stats() == {"requests": 100, "connects": 1, "failures": 0}
    c.close()


def test_threads_share_the_pooled_handles(service) -> None:
    c = make_client(service, batchinflight=0)  # one request per call: counted below
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(25):
                assert len(c.random(8)) == 8
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # At most one handle (and connection) per request in flight: handles are pooled per server
    # and taken by whichever thread needs one (issue 16), not bound to a thread.
    stats = c.stats()
    assert stats["requests"] == 100 and stats["failures"] == 0
    assert 1 <= stats["connects"] == c.transport.handles() <= 4
    c.close()


def test_close_then_calls_fail(service) -> None:
    c = make_client(service)
    c.health()
    c.close()
    # What a call racing C_Finalize gets: CKR_CRYPTOKI_NOT_INITIALIZED, not a device error.
    with pytest.raises(Finalizing, match="C_Finalize") as e:
        c.health()
    assert e.value.ckr == C.CKR_CRYPTOKI_NOT_INITIALIZED


def test_close_cancels_calls_waiting_in_retries(service) -> None:
    """C_Finalize during an outage: calls sleeping between retries (RETRYDELAY 30) and calls
    spinning through connection-refused retries (RETRYDELAY 0) end at once with Finalizing."""
    slow = make_client(service, port=_free_port(), maxretries=256, retrydelay=30)
    fast = make_client(service, port=_free_port(), maxretries=256, retrydelay=0)
    outcome: list[BaseException | None] = []

    def call(c: KeyServiceClient) -> None:
        try:
            while True:  # 256 refused connects can all happen before close(): call again
                try:
                    c.health()
                except TransportError:
                    continue
                outcome.append(None)
                return
        except BaseException as e:
            outcome.append(e)

    threads = [threading.Thread(target=call, args=(c,)) for c in (slow, slow, fast, fast)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all four are in their retries now
    started = time.monotonic()
    slow.close()
    fast.close()
    for t in threads:
        t.join(60)
    # Generous bound (loaded CI); without the cancel the slow ones would sleep 30 s.
    assert time.monotonic() - started < 20
    assert len(outcome) == 4 and all(isinstance(e, Finalizing) for e in outcome), outcome


def _in_forked_child(check: Callable[[], str]) -> None:
    """Runs check in a forked child (which never returns into pytest) and asserts it said ""
    (all well); anything else it returned or raised is the failure's message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            said = check()
            os.write(w, said.encode()[:500] if said else b"ok")
            code = 0
        except BaseException as e:
            os.write(w, repr(e).encode()[:500])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child_said = f.read()
    _, status = os.waitpid(pid, 0)
    assert child_said == b"ok" and os.WEXITSTATUS(status) == 0


def test_fork_child_gets_fresh_connection_parent_keeps_its_own(service) -> None:
    c = make_client(service)
    c.health()
    assert c.stats()["connects"] == 1

    def child() -> str:
        ok = c.health()["status"] == "ok" and c.stats() == {
            "requests": 1,
            "connects": 1,
            "failures": 0,
        }
        return "" if ok else repr(c.stats())

    _in_forked_child(child)
    # The parent's kept-alive connection survived the child (no TLS close_notify was sent on
    # it): the next request needs no new connection.
    time.sleep(0.1)
    c.health()
    assert c.stats() == {"requests": 2, "connects": 1, "failures": 0}
    c.close()


def test_fork_of_a_forked_child_and_fork_from_a_thread(service) -> None:
    # The per-request fork check compares with a pid that an at-fork hook renews (no getpid()
    # per request): every generation must see its own fork, a fork from a thread other than the
    # main one included, and each process keeps its own kept-alive connection.
    c = make_client(service)
    c.health()
    parent = os.getpid()
    assert core.process() == parent
    outcome: list[int] = []  # the grandchild's exit status, in the child

    def grandchild() -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ok = c.health()["status"] == "ok" and c.stats()["connects"] == 1
                code = 0 if ok and core.process() == os.getpid() else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        outcome.append(os.WEXITSTATUS(status))

    def child() -> str:
        c.health()
        fresh = c.stats() == {"requests": 1, "connects": 1, "failures": 0}
        # The core's copy of the pid (its lone request's fork check) follows too.
        fresh = fresh and core.process() == os.getpid() != parent
        t = threading.Thread(target=grandchild)
        t.start()
        t.join(60)
        c.health()  # the child's connection survived its own child
        ok = fresh and outcome == [0] and c.stats() == {"requests": 2, "connects": 1, "failures": 0}
        return "" if ok else f"{fresh} {outcome} {c.stats()}"

    _in_forked_child(child)
    c.health()
    assert c.stats() == {"requests": 2, "connects": 1, "failures": 0}
    c.close()


def test_explicit_reset_after_fork_in_child(service) -> None:
    # What the provider's fork hook does: reset_after_fork() abandons the inherited handle.
    c = make_client(service)
    c.health()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            c.reset_after_fork()
            fresh = c.stats() == {"requests": 0, "connects": 0, "failures": 0}
            c.health()
            code = 0 if fresh and c.stats()["connects"] == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    time.sleep(0.1)
    c.health()
    assert c.stats() == {"requests": 2, "connects": 1, "failures": 0}
    c.close()


# --------------------------------------------------------------------------------------------
# TLS: only the configured CA, the right host name.


def _other_ca(d: Path) -> Path:
    cert, _ = self_signed_cert("someone else's CA", ca=True)
    p = d / "other_ca.pem"
    p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return p


def test_untrusted_server_refused_without_retries(service, tmp_path: Path) -> None:
    c = make_client(service, auth=_other_ca(tmp_path), maxretries=5, retrydelay=10)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as ei:
        c.health()
    assert "certificate" in ei.value.message.lower()
    assert c.stats()["requests"] == 1
    assert time.monotonic() - t0 < 5
    c.close()


def test_host_name_is_checked(service) -> None:
    name = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(name, service.port, socket.AF_INET)}
    except OSError:
        addrs = set()
    if name == "localhost" or addrs != {"127.0.0.1"}:
        pytest.skip("needs a host name other than localhost that resolves to 127.0.0.1")
    c = make_client(service, host=name, maxretries=0)
    with pytest.raises(TransportError, match=r"(?i)certificate|subject|name"):
        c.health()
    c.close()


def test_service_rejects_client_without_its_certificate(service, tmp_path: Path) -> None:
    cert, key = self_signed_cert("stranger")
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.key").write_bytes(key_pem(key))
    c = make_client(
        service, cert=tmp_path / "c.pem", key=tmp_path / "c.key", maxretries=0, retrydelay=0
    )
    with pytest.raises(TransportError):
        c.health()
    c.close()


# --------------------------------------------------------------------------------------------
# Retries against a service that goes away and comes back.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_service_down_fails_fast_with_transport_error(service) -> None:
    c = make_client(service, port=_free_port(), maxretries=1, retrydelay=0)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as ei:
        c.health()
    assert time.monotonic() - t0 < 2
    assert ei.value.ckr == C.CKR_DEVICE_ERROR
    assert c.stats() == {"requests": 2, "connects": 0, "failures": 2}
    c.close()


def test_call_survives_service_restart_within_retry_window(fresh_service, tmp_path: Path) -> None:
    svc = fresh_service()
    logger = Logger()
    c = make_client(
        svc, logger=logger, maxretries=20, retrydelay=1, loglevel=3, logfilepath=tmp_path / "l"
    )
    logger.configure(c.cfg)
    name = unique_name()
    os.kill(svc.pid, signal.SIGTERM)  # the service goes away ...
    svc.proc.wait(20)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["card"] = c.create_softcard(name, PASS)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.5)  # the call has failed at least once by now
    assert t.is_alive()
    proc = serve_again(svc, tmp_path / "restart.log")  # ... and comes back within the retry window
    try:
        t.join(30)
        assert not t.is_alive()
        assert "error" not in result, result
        assert result["card"]["name"] == name
        assert c.stats()["failures"] >= 1
        assert [x["name"] for x in c.list_softcards()].count(name) == 1
        log = (tmp_path / "l").read_text()
        assert " WARNING " in log and "retry 1/20" in log
    finally:
        c.close()
        _kill(proc)


def test_connection_closed_by_service_is_replaced(service) -> None:
    # The service closes idle keep-alive connections after 5 s (uvicorn's default).
    c = make_client(service, maxretries=0)
    c.health()
    time.sleep(6)
    # MAXRETRIES 0: this only succeeds because the closed connection is replaced.
    assert c.health()["status"] == "ok"
    assert c.stats() == {"requests": 2, "connects": 2, "failures": 0}
    c.close()


# --------------------------------------------------------------------------------------------
# Idempotency: a retried create or destroy never acts twice.


def test_same_idempotency_key_makes_one_softcard(cl: KeyServiceClient) -> None:
    name = unique_name()
    key = "retry-" + uuid.uuid4().hex
    body = {"name": name, "passphrase": PASS}
    first = cl.call("create_softcard", body=body, idempotency_key=key)
    again = cl.call("create_softcard", body=body, idempotency_key=key)
    assert again["id"] == first["id"]
    assert [c["name"] for c in cl.list_softcards()].count(name) == 1
    # A new key is a new request: now the name is taken.
    with pytest.raises(ServiceError) as ei:
        cl.call("create_softcard", body=body)
    assert ei.value.code == "SOFTCARD_EXISTS"
    cl.delete_softcard(first["id"])


def test_same_idempotency_key_makes_one_key_and_destroys_once(cl, cl_card) -> None:
    cid, tok = cl_card
    label = unique_name().encode()
    key = "gen-" + uuid.uuid4().hex
    body = {"mechanism": "CKM_AES_KEY_GEN", "attrs": {"CKA_VALUE_LEN": 16, "CKA_LABEL": label}}
    a = cl.call(
        "generate_key", path_params={"card": cid}, token=tok, body=body, idempotency_key=key
    )
    b = cl.call(
        "generate_key", path_params={"card": cid}, token=tok, body=body, idempotency_key=key
    )
    assert a["handle"] == b["handle"]
    assert len(cl.search_objects(cid, tok, {"CKA_LABEL": label})) == 1
    dkey = "del-" + uuid.uuid4().hex
    params = {"card": cid, "handle": a["handle"]}
    cl.call("delete_object", path_params=params, token=tok, idempotency_key=dkey)
    # The retry of the same destroy is answered like the first, not with OBJECT_NOT_FOUND.
    cl.call("delete_object", path_params=params, token=tok, idempotency_key=dkey)
    assert cl.search_objects(cid, tok, {"CKA_LABEL": label}) == []
