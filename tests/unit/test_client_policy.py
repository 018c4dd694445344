"""KeyServiceClient's retry policy and error mapping for answers the real key service does not
give on demand (5xx, non-JSON bodies, a dead kept-alive connection): a scripted transport stands
in for the network here; tests/module/test_client.py covers the same client against the real
service.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pycurl
import pytest

from pkcs11ws import constants as C
from pkcs11ws import protocol
from pkcs11ws.client import CurlFailure, KeyServiceClient
from pkcs11ws.client.group import Call
from pkcs11ws.client.transport import BASE_HEADERS
from pkcs11ws.errors import ServiceError, TransportError
from pkcs11ws.log import Logger
from tests.support.configs import make_cfg

Step = tuple[int, bytes] | CurlFailure


class Scripted:
    """Answers each request with the next scripted step and records what was sent."""

    base_url = "https://localhost:18001"

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.sent: list[tuple[str, str, bytes | None, Sequence[str]]] = []

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Sequence[str],
        deadline: float = 0.0,
    ) -> tuple[int, bytes]:
        self.sent.append((method, path, body, headers))
        step = self.steps.pop(0)
        if isinstance(step, CurlFailure):
            raise step
        return step

    def pause(self, seconds: float) -> None:
        pass  # the retry delay (0 in these tests), never cut short here


def scripted_client(
    tmp_path: Path, steps: list[Step], **kw
) -> tuple[KeyServiceClient, Scripted, Path]:
    cfg = make_cfg(tmp_path, **{"host": "localhost", "loglevel": 6, "maxretries": 3, **kw})
    lg = Logger()
    lg.configure(cfg)
    t = Scripted(steps)
    return KeyServiceClient(cfg, lg, transport=t), t, tmp_path / "p11.log"  # type: ignore[arg-type]


def err(code: str, msg: str = "m") -> bytes:
    return json.dumps({"code": code, "message": msg}).encode()


RANDOM_OK = (200, b'{"data":"AAEC"}')
DOWN = CurlFailure(pycurl.E_COULDNT_CONNECT, "Connection refused", reused=False)


def test_5xx_retried_then_succeeds(tmp_path: Path) -> None:
    cl, t, logf = scripted_client(tmp_path, [(503, err("UNAVAILABLE")), (500, b"oops"), RANDOM_OK])
    assert cl.random(3) == b"\0\1\2"
    assert len(t.sent) == 3
    log = logf.read_text()
    assert log.count(" WARNING ") == 2 and "retry 1/3" in log and "retry 2/3" in log


def test_5xx_after_last_retry_raises_last_service_error(tmp_path: Path) -> None:
    steps: list[Step] = [*[(503, err("UNAVAILABLE"))] * 3, (500, err("INTERNAL", "last"))]
    cl, t, logf = scripted_client(tmp_path, steps)
    with pytest.raises(ServiceError) as ei:
        cl.random(3)
    assert (ei.value.code, ei.value.http, ei.value.ckr) == ("INTERNAL", 500, C.CKR_DEVICE_ERROR)
    assert ei.value.message == "last"
    assert len(t.sent) == 4
    assert logf.read_text().count(" ERROR ") == 1


def test_network_failure_exhausts_retries_with_transport_error(tmp_path: Path) -> None:
    cl, t, logf = scripted_client(tmp_path, [DOWN] * 4)
    with pytest.raises(TransportError) as ei:
        cl.health()
    assert ei.value.ckr == C.CKR_DEVICE_ERROR
    assert "after 3 retries" in ei.value.message
    assert len(t.sent) == 4
    text = logf.read_text()
    assert text.count(" WARNING ") == 3 and text.count(" ERROR ") == 1


def test_maxretries_zero_means_one_attempt(tmp_path: Path) -> None:
    cl, t, _ = scripted_client(tmp_path, [DOWN], maxretries=0)
    with pytest.raises(TransportError):
        cl.health()
    assert len(t.sent) == 1


def test_tls_verification_failure_is_not_retried(tmp_path: Path) -> None:
    bad = CurlFailure(pycurl.E_PEER_FAILED_VERIFICATION, "SSL certificate problem", False)
    cl, t, _ = scripted_client(tmp_path, [bad])
    with pytest.raises(TransportError, match="SSL certificate problem"):
        cl.health()
    assert len(t.sent) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 429])
def test_4xx_never_retried(tmp_path: Path, status: int) -> None:
    cl, t, logf = scripted_client(tmp_path, [(status, err("BAD_REQUEST"))])
    with pytest.raises(ServiceError):
        cl.random(3)
    assert len(t.sent) == 1
    assert " WARNING " not in logf.read_text()


@pytest.mark.parametrize(
    ("status", "ckr"),
    [
        (401, C.CKR_USER_NOT_LOGGED_IN),
        (403, C.CKR_USER_NOT_LOGGED_IN),
        (404, C.CKR_OBJECT_HANDLE_INVALID),
        (413, C.CKR_DATA_LEN_RANGE),
        (400, C.CKR_ARGUMENTS_BAD),
        (418, C.CKR_ARGUMENTS_BAD),
    ],
)
def test_non_json_error_maps_by_status(tmp_path: Path, status: int, ckr: int) -> None:
    cl, _, _ = scripted_client(tmp_path, [(status, b"<html>nope</html>")])
    with pytest.raises(ServiceError) as ei:
        cl.health()
    assert (ei.value.ckr, ei.value.http) == (ckr, status)


def test_malformed_success_body_is_device_error(tmp_path: Path) -> None:
    cl, _, _ = scripted_client(tmp_path, [(200, b'{"data":"not base64!"}')])
    with pytest.raises(ServiceError) as ei:
        cl.random(3)
    assert (ei.value.code, ei.value.ckr) == ("BAD_RESPONSE", C.CKR_DEVICE_ERROR)


def test_dead_kept_alive_connection_replaced_without_counting(tmp_path: Path) -> None:
    dead = CurlFailure(pycurl.E_GOT_NOTHING, "Empty reply from server", reused=True)
    cl, t, _ = scripted_client(tmp_path, [dead, RANDOM_OK], maxretries=0)
    assert cl.random(3) == b"\0\1\2"
    assert len(t.sent) == 2
    # Only once per call: a second dead connection is a real failure.
    cl, t, _ = scripted_client(tmp_path, [dead, dead], maxretries=0)
    with pytest.raises(TransportError):
        cl.random(3)
    # A failure on a fresh connection is not the "dead idle connection" case.
    fresh = CurlFailure(pycurl.E_GOT_NOTHING, "Empty reply from server", reused=False)
    cl, t, _ = scripted_client(tmp_path, [fresh], maxretries=0)
    with pytest.raises(TransportError):
        cl.random(3)
    assert len(t.sent) == 1


def test_idempotency_key_generated_once_and_reused_by_retries(tmp_path: Path) -> None:
    card = {"id": "u1", "name": "n", "keys": 0, "certificates": 0, "data": 0, "created": "t"}
    cl, t, _ = scripted_client(tmp_path, [DOWN, (503, b""), (200, json.dumps(card).encode())])
    assert cl.create_softcard("n", b"secret") == card
    keys = [[h for h in sent[3] if h.startswith("Idempotency-Key: ")] for sent in t.sent]
    assert all(len(k) == 1 for k in keys)
    assert keys[0] == keys[1] == keys[2]
    # A second logical call gets a new key.
    t.steps.append((200, json.dumps(card).encode()))
    cl.create_softcard("n", b"secret")
    assert [h for h in t.sent[3][3] if h.startswith("Idempotency-Key: ")] != keys[0]
    # Non-idempotent operations carry none.
    t.steps.append(RANDOM_OK)
    cl.random(3)
    assert not any(h.startswith("Idempotency-Key") for h in t.sent[4][3])


def test_request_shapes(tmp_path: Path) -> None:
    valid = (200, b'{"valid":true}')
    cl, t, _ = scripted_client(tmp_path, [(200, b"{}"), (204, b""), valid, valid])
    cl.deactivate("card-1", "tok")
    cl.delete_softcard("card-1", force=True)
    cl.verify("tok", "key-1", "CKM_SHA256_HMAC", b"d", b"s")
    cl.verify("tok", "key-1", "CKM_SHA256_HMAC", b"d", b"s")
    (m1, p1, b1, h1), (m2, p2, b2, _), (m3, p3, b3, h3), (_, _, _, h4) = t.sent
    assert (m1, p1, b1) == ("POST", "/km/v1/softcards/card-1/deactivate", b"{}")
    assert "Authorization: Bearer tok" in h1 and "Expect:" in h1
    assert (m2, p2, b2) == ("DELETE", "/km/v1/softcards/card-1?force=true", None)
    assert m3 == "POST" and p3 == "/crypto/v1/verify"
    sent3 = json.loads(b3 or b"")
    assert next(iter(sent3)) == "request_id"
    rid3 = sent3.pop("request_id")
    assert sent3 == {
        "token": "tok",
        "key": "key-1",
        "mechanism": "CKM_SHA256_HMAC",
        "data": "ZA==",
        "signature": "cw==",
    }
    # Every request carries its own request id: the X-Request-Id header (last), or a crypto
    # request's body field; a crypto request's token is in its body too, in no header.
    rid4 = json.loads(t.sent[3][2] or b"")["request_id"]
    rids = [h1[-1][len("X-Request-Id: ") :], rid3, rid4]
    assert h1[-1].startswith("X-Request-Id: ") and len(set(rids)) == 3
    assert all(r.split("-")[0] == rids[0].split("-")[0] for r in rids)  # the process prefix
    assert h3 == h4 and not any("tok" in h or "X-Request-Id" in h for h in h3)
    assert [h for h in h1[:-1] if not h.startswith("Authorization:")] == list(h3)


def test_verify_false_is_signature_invalid(tmp_path: Path) -> None:
    cl, _, _ = scripted_client(tmp_path, [(200, b'{"valid":false}')])
    with pytest.raises(ServiceError) as ei:
        cl.verify("tok", "k", "CKM_SHA256_HMAC", b"d", b"s")
    assert ei.value.ckr == C.CKR_SIGNATURE_INVALID


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a?b", "x" * 65, "a b"])
def test_bad_path_parameters_never_reach_the_wire(tmp_path: Path, bad: str) -> None:
    cl, t, _ = scripted_client(tmp_path, [])
    with pytest.raises(Exception) as ei:
        cl.get_object("card", "tok", bad)
    assert getattr(ei.value, "ckr", None) == C.CKR_ARGUMENTS_BAD
    assert t.sent == []


def test_logs_never_contain_bodies(tmp_path: Path) -> None:
    cl, _, logf = scripted_client(
        tmp_path, [(503, b""), (200, b'{"token":"SEKRET","expires_in":5}')]
    )
    assert cl.activate("card", b"hunter2-passphrase") == ("SEKRET", 5)
    text = logf.read_text()
    assert "activate" in text
    for secret in ("hunter2", "aHVudGVyMi1wYXNzcGhyYXNl", "SEKRET"):
        assert secret not in text


# The per-operation calls (sign, verify, encrypt, decrypt) take a fast path whose first attempt
# skips the retry loop unless debug tracing is on: both ways must behave alike.
SIG = (200, b'{"signature":"AAECAw=="}')


@pytest.mark.parametrize("loglevel", [3, 6])
def test_fast_path_bodies_and_answers(tmp_path: Path, loglevel: int) -> None:
    cipher = (200, b'{"data":"AAE=","last_block":"AgM="}')
    steps: list[Step] = [SIG, SIG, cipher, cipher, (200, b'{"valid":true}')]
    cl, t, _ = scripted_client(tmp_path, steps, loglevel=loglevel)
    assert cl.sign("tok", "k-1", "CKM_SHA256_HMAC", b"d") == b"\0\1\2\3"
    assert cl.sign("tok", "k-1", "CKM_SHA256_HMAC_GENERAL", b"\xff", 20) == b"\0\1\2\3"
    assert cl.encrypt("tok", "k-2", "CKM_AES_CBC", b"\1" * 16, b"x") == b"\0\1"
    assert cl.decrypt("tok", "k-2", "CKM_AES_CBC_PAD", b"\2" * 16, b"") == b"\0\1"
    cl.verify("tok", "k-1", "CKM_SHA256_HMAC_GENERAL", b"d", b"s", 16)
    bodies = [json.loads(sent[2] or b"") for sent in t.sent]
    for b in bodies:
        assert next(iter(b)) == "request_id"
        del b["request_id"]
    assert bodies == [
        {"token": "tok", "key": "k-1", "mechanism": "CKM_SHA256_HMAC", "data": "ZA=="},
        {
            "token": "tok",
            "key": "k-1",
            "mechanism": "CKM_SHA256_HMAC_GENERAL",
            "data": "/w==",
            "mac_length": 20,
        },
        {
            "token": "tok",
            "key": "k-2",
            "mechanism": "CKM_AES_CBC",
            "iv": "AQEBAQEBAQEBAQEBAQEBAQ==",
            "data": "eA==",
        },
        {
            "token": "tok",
            "key": "k-2",
            "mechanism": "CKM_AES_CBC_PAD",
            "iv": "AgICAgICAgICAgICAgICAg==",
            "data": "",
        },
        {
            "token": "tok",
            "key": "k-1",
            "mechanism": "CKM_SHA256_HMAC_GENERAL",
            "data": "ZA==",
            "signature": "cw==",
            "mac_length": 16,
        },
    ]
    assert [sent[1] for sent in t.sent] == [
        "/crypto/v1/sign",
        "/crypto/v1/sign",
        "/crypto/v1/encrypt",
        "/crypto/v1/decrypt",
        "/crypto/v1/verify",
    ]
    assert not any("Authorization" in h for sent in t.sent for h in sent[3])


@pytest.mark.parametrize("loglevel", [3, 6])
@pytest.mark.parametrize(
    "answer",
    [
        b'{"signature":"AAECAw="}',  # bad padding
        b'{"signature":"AAECAx=="}',  # non-canonical (trailing bits)
        b'{"signature":"AAECAw==","extra":1}',
        b'{"sig":"AAECAw=="}',
        b'{"signature":5}',
        b"[]",
        b"not json",
        b"",
    ],
)
def test_fast_path_answers_stay_strict(tmp_path: Path, loglevel: int, answer: bytes) -> None:
    cl, _, logf = scripted_client(tmp_path, [(200, answer)], loglevel=loglevel)
    with pytest.raises(ServiceError) as ei:
        cl.sign("tok", "k", "CKM_SHA256_HMAC", b"d")
    assert (ei.value.code, ei.value.ckr) == ("BAD_RESPONSE", C.CKR_DEVICE_ERROR)
    assert "sign: malformed answer" in logf.read_text()


@pytest.mark.parametrize("loglevel", [3, 6])
def test_fast_path_retry_policy(tmp_path: Path, loglevel: int) -> None:
    cl, t, logf = scripted_client(
        tmp_path, [DOWN, (503, err("UNAVAILABLE")), SIG], loglevel=loglevel
    )
    assert cl.sign("tok", "k", "CKM_SHA256_HMAC", b"d") == b"\0\1\2\3"
    assert len(t.sent) == 3
    assert logf.read_text().count(" WARNING ") == 2
    # 4xx: one attempt, the service's error; a dead kept-alive connection does not count.
    cl, t, _ = scripted_client(tmp_path, [(401, err("NOT_ACTIVATED"))], loglevel=loglevel)
    with pytest.raises(ServiceError) as ei:
        cl.encrypt("tok", "k", "CKM_AES_CBC", bytes(16), bytes(16))
    assert (ei.value.code, len(t.sent)) == ("NOT_ACTIVATED", 1)
    dead = CurlFailure(pycurl.E_GOT_NOTHING, "Empty reply from server", reused=True)
    cl, t, _ = scripted_client(
        tmp_path, [dead, (200, b'{"valid":false}')], maxretries=0, loglevel=loglevel
    )
    with pytest.raises(ServiceError) as ei:
        cl.verify("tok", "k", "CKM_SHA256_HMAC", b"d", b"s")
    assert (ei.value.ckr, len(t.sent)) == (C.CKR_SIGNATURE_INVALID, 2)
    cl, t, logf = scripted_client(tmp_path, [DOWN], maxretries=0, loglevel=loglevel)
    with pytest.raises(TransportError):
        cl.decrypt("tok", "k", "CKM_AES_CBC", bytes(16), bytes(16))
    assert len(t.sent) == 1 and logf.read_text().count(" ERROR ") == 1


def test_a_batch_carries_its_request_id_in_its_body(tmp_path: Path) -> None:
    # Each batch its own id as the body's first field, and no per-request header (pycurl would
    # rebuild its header list): its headers are those of every crypto request.
    answer = b'{"results":[{"status":200,"answer":{"signature":"cw=="}}]}'
    cl, t, _ = scripted_client(tmp_path, [(200, answer), (200, answer), RANDOM_OK])
    data = b'{"token":"tok","key":"k","mechanism":"CKM_SHA256_HMAC","data":"ZA=="}'
    rids = []
    for _ in range(2):
        call = Call("sign", None, data)
        cl._send_batch([call])
        assert (call.status, call.answer, call.error) == (200, {"signature": "cw=="}, None)
        method, path, body, headers = t.sent[-1]
        assert (method, path, headers) == ("POST", protocol.BATCH_PATH, BASE_HEADERS)
        sent = json.loads(body or b"")
        assert list(sent) == ["request_id", "items"]
        assert sent["items"] == [{"op": "sign", "request": json.loads(data)}]
        rids.append(sent["request_id"])
    cl.random(3)
    other = [h for h in t.sent[-1][3] if h.startswith("X-Request-Id: ")]
    assert len(set(rids)) == 2 and len(other) == 1
    assert {r.split("-")[0] for r in rids} == {other[0][len("X-Request-Id: ") :].split("-")[0]}
