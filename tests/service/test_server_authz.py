"""Client identities and authorization, tried as an attacker would, over real mutual TLS.

Two identities are issued with `pkcs11ws-server issue-client` (alice and bob, role app) on the
shared service. For EVERY endpoint of protocol.ENDPOINTS bob attacks alice's softcard, objects
and keys: with no token, with his own token, and with alice's stolen token. Each answer must be
exactly (status and body) what the same request gets for a softcard or key that does not exist,
alice's state must be unchanged, and alice's own identical request must succeed (so the probe
reached the code it claims to test). A new endpoint without a case fails
test_every_endpoint_has_an_authorization_case.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import protocol
from tests.support.service import Api, Resp, Service, b64, encode, issue_client, new_idem

PASS = b"alice passphrase"
HMAC_VALUE = bytes(range(32))
P256 = bytes.fromhex("06082a8648ce3d030107")  # CKA_EC_PARAMS of P-256
CARDS = "/km/v1/softcards"


@dataclass
class Who:
    name: str
    dir: Path
    api: Api


@pytest.fixture(scope="module")
def people(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Who]]:
    made: dict[str, Who] = {}
    for role in ("alice", "bob"):
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        d = issue_client(service, name, tmp_path_factory.mktemp(role))
        made[role] = Who(name, d, Api(service, d / "client.pem", d / "client.key"))
    made["admin"] = Who("admin", service.dir, Api(service))
    try:
        yield made
    finally:
        for w in made.values():
            w.api.close()


@dataclass
class Setup:
    """alice's softcard with a data object, an AES key and an HMAC key; bob's own card."""

    card: str
    name: str
    token: str
    data: str
    aes: str
    mac: str
    bob_card: str
    bob_token: str
    bob_aes: str
    bob_mac: str


def _card_with_keys(api: Api) -> tuple[str, str, str, str, str, str]:
    name = "c" + uuid.uuid4().hex[:16]
    card = api.ok(api.post(CARDS, {"name": name, "passphrase": b64(PASS)}, idem=new_idem()))["id"]
    token = api.activate(card, PASS)
    data = api.ok(api.create(card, token, {"CKA_CLASS": 0, "CKA_VALUE": b"secret data"}))
    aes = api.import_key(card, token, 0x1F, bytes(16))
    mac = api.import_key(card, token, 0x2B, HMAC_VALUE)
    return card, name, token, data["handle"], aes, mac


def make_setup(people: dict[str, Who]) -> Setup:
    card, name, token, data, aes, mac = _card_with_keys(people["alice"].api)
    bcard, _, btoken, _, baes, bmac = _card_with_keys(people["bob"].api)
    return Setup(card, name, token, data, aes, mac, bcard, btoken, baes, bmac)


# ----------------------------------------------------------------------------- the cases

# No softcard addressed (a batch item is checked as its own single request: test_server_batch).
GLOBAL_OPS = {"health", "random", "list_softcards", "create_softcard", "batch"}
KEYED_OPS = {ep.op for ep in protocol.ENDPOINTS if ep.auth and "{card}" not in ep.path}
CARD_OPS = {ep.op for ep in protocol.ENDPOINTS if "{card}" in ep.path}


def body_for(op: str, key: str, mac: str) -> Any:
    """A valid request body for op (so the probe reaches authorization, not a schema error)."""
    iv = b64(bytes(16))
    sig = b64(hmac.digest(HMAC_VALUE, b"data", hashlib.sha256))
    bodies: dict[str, Any] = {
        "activate": {"passphrase": b64(PASS)},
        "create_softcard": {"name": "b" + uuid.uuid4().hex[:12], "passphrase": b64(PASS)},
        "search_objects": {"attrs": {}},
        "search_public": {"attrs": {}},
        "create_object": {"attrs": encode({"CKA_CLASS": 0, "CKA_VALUE": b"new"})},
        "copy_object": {"attrs": {}},
        "update_object": {"attrs": encode({"CKA_LABEL": b"renamed"})},
        "generate_key": {"mechanism": "CKM_AES_KEY_GEN",
                         "attrs": encode({"CKA_VALUE_LEN": 16, "CKA_TOKEN": True})},
        "generate_key_pair": {"mechanism": "CKM_EC_KEY_PAIR_GEN",
                              "public_attrs": encode({"CKA_EC_PARAMS": P256}),
                              "private_attrs": {}},
        "encrypt": {"key": key, "mechanism": "CKM_AES_CBC_PAD", "iv": iv, "data": b64(b"x")},
        "decrypt": {"key": key, "mechanism": "CKM_AES_CBC", "iv": iv, "data": b64(bytes(16))},
        "sign": {"key": mac, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"data")},
        "verify": {"key": mac, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"data"),
                   "signature": sig},
        "random": {"length": 16},
        "batch": {"items": [{"op": "random", "request": {"length": 16}}]},
    }  # fmt: skip
    ep = protocol.ENDPOINT_BY_OP[op]
    if ep.request == "Empty":
        return None if ep.method in ("GET", "DELETE", "PUT") else {}
    return bodies[op]


def send(api: Api, op: str, token: str | None, body: Any, **params: str) -> Resp:
    ep = protocol.ENDPOINT_BY_OP[op]
    path = ep.path.format(**params)
    if ep.query:  # the strongest form (delete_softcard?force=true)
        path += "?" + "&".join(f"{q}=true" for q in ep.query)
    return api.request(
        ep.method,
        path,
        body,
        token=token if ep.auth else None,
        idem=new_idem() if ep.idempotent else None,
        headers={"X-Request-Id": f"probe-{op}"},
    )


def test_every_endpoint_has_an_authorization_case() -> None:
    for ep in protocol.ENDPOINTS:
        cases = [ep.op in GLOBAL_OPS, ep.op in KEYED_OPS, ep.op in CARD_OPS]
        assert cases.count(True) == 1, f"{ep.op}: no (or more than one) authorization case"
        assert ep.access in protocol.ACCESS, ep.op
        if ep.op not in GLOBAL_OPS:
            # Whatever addresses a softcard or a key is limited to its owner or token holder.
            assert ep.access != "any", ep.op
        if ep.request != "Empty":
            assert body_for(ep.op, "k", "m") is not None


def _alice_intact(people: dict[str, Who], s: Setup) -> None:
    a = people["alice"].api
    card = a.ok(a.get(f"{CARDS}/{s.card}"))
    assert (card["keys"], card["data"], card["owner"]) == (2, 1, people["alice"].name)
    obj = a.ok(a.get(f"{CARDS}/{s.card}/objects/{s.data}", token=s.token))
    assert "CKA_LABEL" not in obj["attrs"] or obj["attrs"]["CKA_LABEL"] != b64(b"renamed")
    grants = a.ok(a.get(f"{CARDS}/{s.card}/grants"))["grants"]
    assert grants == []


@pytest.mark.parametrize("op", sorted(CARD_OPS))
def test_bob_cannot_touch_alices_softcard(people: dict[str, Who], op: str) -> None:
    s = make_setup(people)
    bob, alice = people["bob"], people["alice"]
    handle = s.data
    missing = str(uuid.uuid4())
    body = body_for(op, s.aes, s.mac)
    # bob addresses alice's card (and object), and, for comparison, a card that does not exist.
    # With no token / his own token / alice's token (stolen: bound to alice, so useless).
    tokens = {"own": s.bob_token, "stolen": s.token}
    for label, token in tokens.items():
        target = send(bob.api, op, token, body, card=s.card, handle=handle, client=bob.name)
        nowhere = send(bob.api, op, token, body, card=missing, handle=handle, client=bob.name)
        assert target.status >= 400, (op, label, target.status, target.body)
        assert (target.status, target.body) == (nowhere.status, nowhere.body), (op, label)
    _alice_intact(people, s)
    # bob's list still shows none of alice's cards.
    listed = bob.api.ok(bob.api.get(CARDS))["softcards"]
    assert s.card not in {c["id"] for c in listed} and s.name not in {c["name"] for c in listed}
    # The same request by alice succeeds: the probe reached real code.
    own = send(alice.api, op, s.token, body, card=s.card, handle=handle, client=bob.name)
    assert own.status < 300, (op, own.status, own.body)


@pytest.mark.parametrize("op", sorted(KEYED_OPS))
def test_bob_cannot_use_alices_keys(people: dict[str, Who], op: str) -> None:
    s = make_setup(people)
    bob, alice = people["bob"], people["alice"]
    missing = str(uuid.uuid4())
    # bob's own token with alice's key handle: the same as a key that does not exist.
    target = send(bob.api, op, s.bob_token, body_for(op, s.aes, s.mac))
    nowhere = send(bob.api, op, s.bob_token, body_for(op, missing, missing))
    assert target.status == 404 and (target.status, target.body) == (nowhere.status, nowhere.body)
    # alice's token over bob's connection: refused as any invalid token.
    stolen = send(bob.api, op, s.token, body_for(op, s.aes, s.mac))
    forged = send(bob.api, op, "v1.AAAA" + s.token[7:], body_for(op, s.aes, s.mac))
    assert (stolen.status, stolen.code) == (401, "NOT_ACTIVATED")
    assert stolen.body == forged.body
    # His own keys work for him; alice's work for her.
    assert send(bob.api, op, s.bob_token, body_for(op, s.bob_aes, s.bob_mac)).status == 200
    assert send(alice.api, op, s.token, body_for(op, s.aes, s.mac)).status == 200


def test_global_endpoints_show_nothing_of_others(people: dict[str, Who]) -> None:
    s = make_setup(people)
    bob, alice = people["bob"].api, people["alice"].api
    for op in sorted(GLOBAL_OPS):
        r = send(bob, op, None, body_for(op, "", ""))
        assert r.status == 200, (op, r.body)
        assert s.card not in r.body.decode() and s.name not in r.body.decode()
    # What bob created is his: alice does not see it, bob does, with bob as owner.
    mine = {c["id"]: c for c in bob.ok(bob.get(CARDS))["softcards"]}
    assert s.bob_card in mine and mine[s.bob_card]["owner"] == people["bob"].name
    assert s.bob_card not in {c["id"] for c in alice.ok(alice.get(CARDS))["softcards"]}


def test_token_of_alice_refused_over_bob(people: dict[str, Who]) -> None:
    s = make_setup(people)
    bob = people["bob"].api
    r = bob.post(f"{CARDS}/{s.card}/objects/search", {"attrs": {}}, token=s.token)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    r = people["alice"].api.post(f"{CARDS}/{s.card}/objects/search", {"attrs": {}}, token=s.token)
    assert r.status == 200 and len(r.json["objects"]) == 3


def test_admin_manages_every_softcard(people: dict[str, Who]) -> None:
    s = make_setup(people)
    admin = people["admin"].api
    listed = {c["id"]: c for c in admin.ok(admin.get(CARDS))["softcards"]}
    assert {s.card, s.bob_card} <= set(listed)
    assert listed[s.card]["owner"] == people["alice"].name
    assert admin.ok(admin.get(f"{CARDS}/{s.card}"))["keys"] == 2
    token = admin.activate(s.card, PASS)  # with the passphrase, as anyone
    found = admin.ok(admin.post(f"{CARDS}/{s.card}/objects/search", {"attrs": {}}, token=token))
    assert len(found["objects"]) == 3
    assert admin.ok(admin.request("PUT", f"{CARDS}/{s.card}/grants/{people['bob'].name}")) == {}
    assert admin.ok(admin.get(f"{CARDS}/{s.card}/grants"))["grants"] == [
        {"client": people["bob"].name}
    ]
    r = admin.delete(f"{CARDS}/{s.card}?force=true", idem=new_idem())
    assert r.status == 200
    r = people["alice"].api.get(f"{CARDS}/{s.card}")
    assert (r.status, r.code) == (404, "SOFTCARD_NOT_FOUND")


def test_grant_lets_bob_use_and_revoking_ends_his_login(people: dict[str, Who]) -> None:
    s = make_setup(people)
    alice, bob = people["alice"].api, people["bob"].api
    path = f"{CARDS}/{s.card}/grants/{people['bob'].name}"
    assert alice.request("PUT", path).status == 200
    assert s.card in {c["id"] for c in bob.ok(bob.get(CARDS))["softcards"]}
    token = bob.activate(s.card, PASS)  # a grant is no passphrase: bob still needs it
    sign = {"key": s.mac, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"data")}
    assert bob.post("/crypto/v1/sign", sign, token=token).status == 200
    # A grantee may use, not manage: no delete, no grants of its own.
    r = bob.delete(f"{CARDS}/{s.card}?force=true", idem=new_idem())
    assert (r.status, r.code) == (403, "FORBIDDEN")
    r = bob.request("PUT", f"{CARDS}/{s.card}/grants/admin")
    assert (r.status, r.code) == (403, "FORBIDDEN")
    r = alice.request("PUT", f"{CARDS}/{s.card}/grants/nobody-{uuid.uuid4().hex[:6]}")
    assert (r.status, r.code) == (400, "UNKNOWN_CLIENT")
    assert alice.delete(path).status == 200
    r = bob.post("/crypto/v1/sign", sign, token=token)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    r = bob.get(f"{CARDS}/{s.card}")
    assert (r.status, r.code) == (404, "SOFTCARD_NOT_FOUND")
    assert alice.post("/crypto/v1/sign", sign, token=s.token).status == 200


def test_renew_gives_a_fresh_token_for_the_same_login(people: dict[str, Who]) -> None:
    s = make_setup(people)
    alice, bob = people["alice"].api, people["bob"].api
    r = bob.post(f"{CARDS}/{s.card}/renew", token=s.token)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    fresh = alice.ok(alice.post(f"{CARDS}/{s.card}/renew", token=s.token))
    assert fresh["token"] != s.token and fresh["expires_in"] > 0
    search = f"{CARDS}/{s.card}/objects/search"
    assert alice.post(search, {"attrs": {}}, token=fresh["token"]).status == 200
    # Logging out with either ends both: they are one session.
    assert alice.post(f"{CARDS}/{s.card}/deactivate", token=fresh["token"]).status == 200
    assert alice.post(search, {"attrs": {}}, token=s.token).code == "NOT_ACTIVATED"


def _audit(svc: Service) -> list[dict[str, Any]]:
    path = svc.dir / "log" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_refused_delete_is_audited_with_the_client(people: dict[str, Who], service: Service):
    s = make_setup(people)
    bob = people["bob"].api
    rid = "rid-" + uuid.uuid4().hex[:12]
    r = bob.delete(f"{CARDS}/{s.card}?force=true", idem=new_idem(), headers={"X-Request-Id": rid})
    assert r.code == "SOFTCARD_NOT_FOUND"
    lines = [x for x in _audit(service) if x["request"] == rid]
    assert len(lines) == 1
    line = lines[0]
    assert line["client"] == people["bob"].name and line["op"] == "delete_softcard"
    assert (line["card"], line["outcome"], line["code"]) == (
        s.card,
        "refused",
        "SOFTCARD_NOT_FOUND",
    )
    assert set(line) >= {"time", "request", "client", "op", "card", "handle", "outcome", "code"}
    # A failed login is a refused request: audited with the identity and the card.
    rid2 = "rid-" + uuid.uuid4().hex[:12]
    r = people["alice"].api.post(
        f"{CARDS}/{s.card}/activate",
        {"passphrase": b64(b"wrong!!!")},
        headers={"X-Request-Id": rid2},
    )
    assert r.code == "PASSPHRASE_INCORRECT"
    (line,) = [x for x in _audit(service) if x["request"] == rid2]
    assert (line["client"], line["op"], line["card"], line["code"]) == (
        people["alice"].name,
        "activate",
        s.card,
        "PASSPHRASE_INCORRECT",
    )
    # The changes alice made are there too, and no line holds a passphrase or a token.
    mine = [x for x in _audit(service) if x["client"] == people["alice"].name]
    assert {"create_softcard", "activate", "create_object"} <= {x["op"] for x in mine}
    text = (service.dir / "log" / "audit.log").read_text()
    assert s.token not in text and b64(PASS) not in text and "alice passphrase" not in text
    assert (service.dir / "log" / "audit.log").stat().st_mode & 0o077 == 0


def test_unlisted_certificate_is_refused_and_audited(service: Service, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from pkcs11ws.server import pki

    ca_key = serialization.load_pem_private_key((service.dir / "pki" / "ca.key").read_bytes(), None)
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(service.ca.read_bytes())
    key, cert = pki.sign_leaf(ca_key, ca, "stranger", ExtendedKeyUsageOID.CLIENT_AUTH, None)  # type: ignore[arg-type]
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.key").write_bytes(pki._key_pem(key))
    fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    api = Api(service, tmp_path / "c.pem", tmp_path / "c.key")
    try:
        for method, path in (("GET", "/health"), ("GET", CARDS), ("POST", "/crypto/v1/random")):
            r = api.request(method, path, {"length": 4} if method == "POST" else None)
            assert (r.status, r.code) == (403, "CLIENT_NOT_AUTHORIZED"), path
    finally:
        api.close()
    refused = [x for x in _audit(service) if x.get("fingerprint") == fp]
    assert len(refused) == 3 and all(x["code"] == "CLIENT_NOT_AUTHORIZED" for x in refused)
    assert all(x["client"] is None and x["outcome"] == "refused" for x in refused)


def test_refused_handshake_is_audited(service: Service) -> None:
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(service.ca))  # no client certificate
    before = len(_audit(service))
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(100)
        except (ssl.SSLError, OSError):
            pass
    lines = _waited(lambda: [x for x in _audit(service)[before:] if x["op"] == "tls_handshake"])
    assert lines and lines[-1]["outcome"] == "refused" and lines[-1]["client"] is None


def _waited(get: Callable[[], list[Any]], timeout: float = 10.0) -> list[Any]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)
