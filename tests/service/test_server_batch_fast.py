"""The batch's fast path (batch_items._keyed_item: keyed crypto items fastjson decoded, run as plain
calls, a token the previous item opened admitted again instead of reopened), attacked over real
mutual TLS.

Every batch here is sent in the module's compact spelling (each item's token in its request,
client/api.py), which the fast path takes (checked with fastjson.batch itself), and again
spaced out, which the generic path decodes: both must give the same answers byte for byte, the
same as each single request, and one audit line per refused item. The items mix what a shortcut
could wrongly carry from one item to the next: the same token before and after a refused item,
another softcard's token and key, an ended session, another identity's token, a forged token,
an expired one; and between two batches a key destroyed and a session ended. Items that
differ only in their data come as one run (fastjson.BatchRun: the verdict decided once, by
batch_items._keyed_run): runs are attacked the same way between batches (a grant revoked, a
key destroyed and another put in its place), and with a refused item inside a run.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pkcs11ws import protocol
from pkcs11ws.server import fastjson
from tests.support.service import Api, Service, b64, issue_client, new_idem

BATCH = protocol.BATCH_PATH
SIGN = protocol.ENDPOINT_BY_OP["sign"].path
CARDS = "/km/v1/softcards"
PASS = b"fast batch passphrase"
HMAC_KEY = 0x2B
AES_KEY = 0x1F


class Card:
    def __init__(self, api: Api) -> None:
        self.id, self.token = api.new_card(PASS)
        self.value = uuid.uuid4().bytes * 2
        self.mac = api.import_key(self.id, self.token, HMAC_KEY, self.value)
        self.aes = api.import_key(self.id, self.token, AES_KEY, bytes(16))


@pytest.fixture(scope="module")
def people(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Api]]:
    made: dict[str, Api] = {}
    try:
        for role in ("alice", "bob"):
            d = issue_client(
                service, f"{role}-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp(role)
            )
            made[role] = Api(service, d / "client.pem", d / "client.key")
        yield made
    finally:
        for a in made.values():
            a.close()


def request(token: str | None, key: str, data: bytes = b"fast", rid: str | None = None) -> Any:
    """A sign request in the module's field order (request_id, token, key, mechanism, data)."""
    out: dict[str, Any] = {} if rid is None else {"request_id": rid}
    if token is not None:
        out["token"] = token
    return {**out, "key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(data)}


def item(req: Any, token: str | None = None) -> dict[str, Any]:
    return {"op": "sign", **({} if token is None else {"token": token}), "request": req}


def send(api: Api, items: list[dict[str, Any]], rid: str, fast: bool) -> list[tuple[int, bytes]]:
    """The batch's (status, answer bytes) per item; fast: the compact spelling."""
    body = {"items": items}
    raw = json.dumps(body, separators=(",", ":") if fast else (", ", ": ")).encode()
    assert (fastjson.batch(raw) is not None) is fast  # the path the service takes
    r = api.post(BATCH, raw, headers={"X-Request-Id": rid})
    assert r.status == 200, (r.status, r.body)
    answers = r.json["results"]
    assert len(answers) == len(items)
    return [(x["status"], json.dumps(x["answer"], separators=(",", ":")).encode()) for x in answers]


def audited(svc: Service, rid: str) -> list[dict[str, Any]]:
    lines = (svc.dir / "log" / "audit.log").read_text().splitlines()
    found = [x for x in map(json.loads, lines) if x.get("request") == rid]
    for x in found:
        del x["time"], x["request"]
    return found


def both_ways(svc: Service, api: Api, items: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    """The fast and the generic answers (equal), each item's audit lines (equal, one per
    refused item, in item order), and each in-request-token item as its single request."""
    fast_rid, slow_rid = (f"fast-{uuid.uuid4().hex[:12]}" for _ in range(2))
    fast = send(api, items, fast_rid, True)
    assert send(api, items, slow_rid, False) == fast
    refused = [status >= 300 for status, _ in fast]
    lines = audited(svc, fast_rid)
    assert len(lines) == sum(refused) and lines == audited(svc, slow_rid)
    codes = [json.loads(answer)["code"] for status, answer in fast if status >= 300]
    assert [x["code"] for x in lines] == codes
    assert [x["op"] for x in lines] == [it["op"] for it, r in zip(items, refused, strict=True) if r]
    assert all(x["outcome"] == "refused" for x in lines)
    for it, got in zip(items, fast, strict=True):
        if "token" not in it:
            raw = json.dumps(it["request"], separators=(",", ":")).encode()
            one = api.post(protocol.ENDPOINT_BY_OP[it["op"]].path, raw)
            assert (one.status, one.body) == got, it
    return fast


def compact(items: list[dict[str, Any]]) -> bytes:
    return json.dumps({"items": items}, separators=(",", ":")).encode()


def run_lengths(items: list[dict[str, Any]]) -> list[int]:
    """How fastjson.batch groups the compact batch of items into runs (items per run)."""
    found = fastjson.batch(compact(items))
    assert found is not None
    return [len(r[4] or ()) for r in found[1]]


def macs(value: bytes, datas: list[bytes]) -> list[tuple[int, bytes]]:
    """The answers of HMAC-SHA256 signs of datas with value, as the service words them."""
    sigs = (base64.b64encode(hmac.digest(value, d, "sha256")) for d in datas)
    return [(200, b'{"signature":"' + s + b'"}') for s in sigs]


def codes_of(got: list[tuple[int, bytes]]) -> list[object]:
    return [json.loads(a).get("code") if s >= 300 else s for s, a in got]


def test_mixed_tokens_and_keys_each_item_on_its_own(
    service: Service, people: dict[str, Api]
) -> None:
    alice, bob = people["alice"], people["bob"]
    one, two, ended, bobs = Card(alice), Card(alice), Card(alice), Card(bob)
    assert alice.post(f"{CARDS}/{ended.id}/deactivate", token=ended.token).status == 200
    t = one.token
    items = [
        item(request(t, one.mac)),
        item(request(t, two.mac)),  # the same identity's other softcard's key
        item(request(t, one.mac, b"again")),  # the token the first item opened
        item(request(ended.token, ended.mac)),  # an ended session
        item(request(t, one.mac, b"after ended")),
        item(request(bobs.token, bobs.mac)),  # another identity's token and key
        item(request(t, bobs.mac)),  # another identity's key
        item(request(two.token, two.mac)),
        item(request(t, one.mac, b"after two")),
        item(request(None, one.mac)),  # no token
        item(request("v1.AAAA" + t[7:], one.mac)),  # forged
        item(request(t, one.aes)),  # an AES key cannot HMAC
        item(request(t, one.mac, rid="item-own-id")),
        item(request(None, one.mac), t),  # the item's token field
        item(request(t, one.mac), t),  # a token in both places
        item(request(None, one.mac), bobs.token),
    ]
    got = both_ways(service, alice, items)
    assert codes_of(got) == [
        200,
        "KEY_NOT_FOUND",
        200,
        "NOT_ACTIVATED",
        200,
        "NOT_ACTIVATED",
        "KEY_NOT_FOUND",
        200,
        200,
        "NOT_ACTIVATED",
        "NOT_ACTIVATED",
        "KEY_TYPE_INCONSISTENT",
        200,
        200,
        "BAD_REQUEST",
        "NOT_ACTIVATED",
    ]
    # The same request gives the same MAC whichever item and path carried it.
    assert got[0] == got[13] and got[0] != got[2]
    # Another's key answers as a missing one, and no token reaches the audit trail.
    missing = item(request(t, str(uuid.uuid4())))
    assert send(alice, [missing], "fast-missing", True)[0] == got[6]
    assert t not in (service.dir / "log" / "audit.log").read_text()


def test_key_destroyed_and_session_ended_between_batches(
    service: Service, people: dict[str, Api]
) -> None:
    alice = people["alice"]
    card = Card(alice)
    spare = alice.import_key(card.id, card.token, HMAC_KEY, b"s" * 32)
    items = [item(request(card.token, k, bytes([i]))) for i, k in enumerate([card.mac, spare] * 2)]
    assert codes_of(both_ways(service, alice, items)) == [200] * 4
    r = alice.delete(f"{CARDS}/{card.id}/objects/{card.mac}", token=card.token, idem=new_idem())
    assert r.status == 200
    got = both_ways(service, alice, items)
    assert codes_of(got) == ["KEY_NOT_FOUND", 200] * 2
    rid = f"fast-{uuid.uuid4().hex[:12]}"
    send(alice, items, rid, True)
    assert [x["handle"] for x in audited(service, rid)] == [card.mac] * 2
    assert alice.post(f"{CARDS}/{card.id}/deactivate", token=card.token).status == 200
    assert codes_of(both_ways(service, alice, items)) == ["NOT_ACTIVATED"] * 4


def test_expired_token_between_live_ones(fresh_service: Any) -> None:
    ttl = 6
    svc: Service = fresh_service(overrides={"activation_ttl": ttl})
    api = Api(svc)
    try:
        old = Card(api)
        started = time.monotonic()
        time.sleep(ttl - 2)
        new = Card(api)
        time.sleep(max(0.0, started + ttl + 0.5 - time.monotonic()))  # old has expired
        items = [
            item(request(new.token, new.mac)),
            item(request(old.token, old.mac)),
            item(request(new.token, new.mac, b"2")),
            item(request(old.token, old.mac, b"2")),
        ]
        got = both_ways(svc, api, items)
        assert codes_of(got) == [200, "NOT_ACTIVATED"] * 2
        assert b"expired" in got[1][1] and got[1] == got[3]
    finally:
        api.close()


def test_a_run_answers_each_item_as_its_single_request(
    service: Service, people: dict[str, Api]
) -> None:
    alice = people["alice"]
    card = Card(alice)
    datas = [b"", b"a", bytes(range(64)), b"x" * 1000, b"a", b"\x00" * 64]
    items = [item(request(card.token, card.mac, d)) for d in datas]
    assert run_lengths(items) == [len(datas)]  # one run
    assert both_ways(service, alice, items) == macs(card.value, datas)
    # Runs broken by other keys, tokens and refusals, each item in its place.
    other = Card(alice)
    mixed = [
        *items[:3],
        item(request(other.token, other.mac, b"o1")),
        item(request(other.token, other.mac, b"o2")),
        item(request(card.token, other.mac, b"o3")),  # card's token, other's key: refused
        item(request(card.token, other.mac, b"o4")),
        *items[3:],
    ]
    assert run_lengths(mixed) == [3, 2, 2, 3]
    got = both_ways(service, alice, mixed)
    assert got[:3] + got[7:] == macs(card.value, datas)
    assert got[3:5] == macs(other.value, [b"o1", b"o2"])
    assert codes_of(got[5:7]) == ["KEY_NOT_FOUND"] * 2


def test_a_verify_run_refuses_a_bad_mac_alone(service: Service, people: dict[str, Api]) -> None:
    alice = people["alice"]
    card = Card(alice)
    good = hmac.digest(card.value, b"checked", "sha256")
    bad = bytes([good[0] ^ 1]) + good[1:]
    sigs = [good, bad, good, good[:16], good, bad]

    def verify(sig: bytes) -> dict[str, Any]:
        req = {"token": card.token, "key": card.mac, "mechanism": "CKM_SHA256_HMAC"}
        return {"op": "verify", "request": {**req, "data": b64(b"checked"), "signature": b64(sig)}}

    items = [verify(sig) for sig in sigs]
    assert run_lengths(items) == [len(sigs)]
    rid, slow = f"fast-{uuid.uuid4().hex[:12]}", f"slow-{uuid.uuid4().hex[:12]}"
    got = send(alice, items, rid, True)
    assert send(alice, items, slow, False) == got
    assert codes_of(got) == [
        200,
        "SIGNATURE_INVALID",
        200,
        "SIGNATURE_LEN_RANGE",
        200,
        "SIGNATURE_INVALID",
    ]
    assert got[0] == (200, b'{"valid":true}')
    lines = audited(service, rid)
    assert [x["code"] for x in lines] == [c for c in codes_of(got) if c != 200]
    assert lines == audited(service, slow) and all(x["op"] == "verify" for x in lines)


def verify(token: str, key: str, data: bytes, mac: bytes) -> dict[str, Any]:
    """A verify item in the module's spelling (its token in its request)."""
    req = {"token": token, "key": key, "mechanism": "CKM_SHA256_HMAC"}
    return {"op": "verify", "request": {**req, "data": b64(data), "signature": b64(mac)}}


VALID = (200, b'{"valid":true}')


def test_a_verify_run_of_many_macs_refuses_each_wrong_one_alone(
    service: Service, people: dict[str, Api]
) -> None:
    # Items that differ in data AND MAC (separate callers' C_Verify) form one run: its
    # verdict is decided once, each MAC compared on its own; a wrong one is refused alone, with
    # its audit line, exactly as its single request is (both_ways), and the run goes on.
    alice = people["alice"]
    card, other = Card(alice), Card(alice)
    datas = [bytes([i]) * (i * 9) for i in range(9)]
    macs = [hmac.digest(card.value, d, "sha256") for d in datas]
    macs[2] = bytes([macs[2][0] ^ 1]) + macs[2][1:]  # one bit off
    macs[4] = macs[4][:16]  # truncated
    macs[5] = hmac.digest(other.value, datas[5], "sha256")  # another key's MAC
    macs[6] = macs[7]  # another data's MAC
    macs[8] = macs[8] + b"\x00"  # too long
    items = [verify(card.token, card.mac, d, m) for d, m in zip(datas, macs, strict=True)]
    assert run_lengths(items) == [len(items)]
    got = both_ways(service, alice, items)
    assert codes_of(got) == [
        200,
        200,
        "SIGNATURE_INVALID",
        200,
        "SIGNATURE_LEN_RANGE",
        "SIGNATURE_INVALID",
        "SIGNATURE_INVALID",
        200,
        "SIGNATURE_LEN_RANGE",
    ]
    assert got[0] == VALID
    # A run that starts with a wrong MAC, and the same items with an item token (no run in the
    # module's spelling then, each item on its own): the same answers.
    flipped = [items[2], *items[:2], items[5], items[3]]
    want = ["SIGNATURE_INVALID", 200, 200, "SIGNATURE_INVALID", 200]
    assert codes_of(both_ways(service, alice, flipped)) == want
    tokened: list[dict[str, Any]] = []
    for x in items:
        request = {k: v for k, v in x["request"].items() if k != "token"}
        tokened.append({"op": "verify", "token": card.token, "request": request})
    assert both_ways(service, alice, tokened) == got


def test_verify_runs_after_a_grant_revoked_a_key_destroyed_and_replaced(
    service: Service, people: dict[str, Api], tmp_path: Any
) -> None:
    alice = people["alice"]
    name = f"dave-{uuid.uuid4().hex[:8]}"
    d = issue_client(service, name, tmp_path)
    dave = Api(service, d / "client.pem", d / "client.key")
    try:
        assert dave.get(CARDS).status == 200
        card = Card(alice)
        grant = f"{CARDS}/{card.id}/grants/{name}"
        assert alice.request("PUT", grant).status == 200
        token = dave.activate(card.id, PASS)
        datas = [bytes([i]) * 8 for i in range(5)]
        macs = [hmac.digest(card.value, x, "sha256") for x in datas]
        daves = [verify(token, card.mac, x, m) for x, m in zip(datas, macs, strict=True)]
        assert both_ways(service, dave, daves) == [VALID] * 5
        # Dave's token on alice's connection, alice's on dave's: refused item by item.
        assert codes_of(both_ways(service, alice, daves)) == ["NOT_ACTIVATED"] * 5
        alices = [verify(card.token, card.mac, x, m) for x, m in zip(datas, macs, strict=True)]
        assert codes_of(both_ways(service, dave, alices)) == ["NOT_ACTIVATED"] * 5
        assert alice.delete(grant).status == 200  # revoking the grant ends dave's login
        assert codes_of(both_ways(service, dave, daves)) == ["NOT_ACTIVATED"] * 5
        assert both_ways(service, alice, alices) == [VALID] * 5
        path = f"{CARDS}/{card.id}/objects/{card.mac}"
        assert alice.delete(path, token=card.token, idem=new_idem()).status == 200
        assert codes_of(both_ways(service, alice, alices)) == ["KEY_NOT_FOUND"] * 5
        # Another value in its place: the old MACs no longer verify, the new ones do.
        value = bytes(reversed(card.value))
        new = alice.import_key(card.id, card.token, HMAC_KEY, value)
        old = [verify(card.token, new, x, m) for x, m in zip(datas, macs, strict=True)]
        assert codes_of(both_ways(service, alice, old)) == ["SIGNATURE_INVALID"] * 5
        renewed = [verify(card.token, new, x, hmac.digest(value, x, "sha256")) for x in datas]
        assert both_ways(service, alice, renewed) == [VALID] * 5
    finally:
        dave.close()


def test_runs_after_a_grant_revoked_a_key_destroyed_and_replaced(
    service: Service, people: dict[str, Api], tmp_path: Any
) -> None:
    alice = people["alice"]
    name = f"carol-{uuid.uuid4().hex[:8]}"
    d = issue_client(service, name, tmp_path)
    carol = Api(service, d / "client.pem", d / "client.key")
    try:
        assert carol.get(CARDS).status == 200  # (the service learns a new identity on use)
        card = Card(alice)
        grant = f"{CARDS}/{card.id}/grants/{name}"
        assert alice.request("PUT", grant).status == 200
        token = carol.activate(card.id, PASS)
        datas = [bytes([i]) * 8 for i in range(6)]
        carols = [item(request(token, card.mac, x)) for x in datas]
        assert both_ways(service, carol, carols) == macs(card.value, datas)
        # Carol's token on alice's connection, alice's on carol's: refused item by item.
        assert codes_of(both_ways(service, alice, carols)) == ["NOT_ACTIVATED"] * 6
        alices = [item(request(card.token, card.mac, x)) for x in datas]
        assert codes_of(both_ways(service, carol, alices)) == ["NOT_ACTIVATED"] * 6
        assert alice.delete(grant).status == 200  # revoking the grant ends carol's login
        assert codes_of(both_ways(service, carol, carols)) == ["NOT_ACTIVATED"] * 6
        assert both_ways(service, alice, alices) == macs(card.value, datas)
        path = f"{CARDS}/{card.id}/objects/{card.mac}"
        assert alice.delete(path, token=card.token, idem=new_idem()).status == 200
        assert codes_of(both_ways(service, alice, alices)) == ["KEY_NOT_FOUND"] * 6
        # Another value in its place: a new key, never the old one's prepared state.
        value = bytes(reversed(card.value))
        new = alice.import_key(card.id, card.token, HMAC_KEY, value)
        renewed = [item(request(card.token, new, x)) for x in datas]
        assert both_ways(service, alice, renewed) == macs(value, datas)
    finally:
        carol.close()


def test_a_batchs_request_id_in_its_body_wins_over_the_header(
    service: Service, people: dict[str, Api]
) -> None:
    alice = people["alice"]
    card = Card(alice)
    items = [item(request(card.token, str(uuid.uuid4()))), item(request(card.token, card.mac))]
    for spacing in ((",", ":"), (", ", ": ")):
        rid, header = (f"{x}-{uuid.uuid4().hex[:12]}" for x in ("body", "head"))
        raw = json.dumps({"request_id": rid, "items": items}, separators=spacing).encode()
        found = fastjson.batch(raw)
        assert (found is not None and found[0] == rid) is (spacing == (",", ":"))
        r = alice.post(BATCH, raw, headers={"X-Request-Id": header})
        assert r.status == 200, r.body
        assert [x["status"] for x in r.json["results"]] == [404, 200]
        lines = audited(service, rid)
        assert [(x["code"], x["op"]) for x in lines] == [("KEY_NOT_FOUND", "sign")]
        assert audited(service, header) == []
    for bad in ("a b", "x" * 65, ""):
        raw = json.dumps({"request_id": bad, "items": items}, separators=(",", ":")).encode()
        r = alice.post(BATCH, raw)
        assert (r.status, r.code) == (400, "BAD_REQUEST"), bad


def test_a_run_on_a_locked_out_card_answers_as_its_single_requests(
    service: Service, people: dict[str, Api]
) -> None:
    # Wrong passphrases until the card locks: new logins are refused, and a batch run with the
    # token from before answers each item exactly as its single request (both_ways).
    alice = people["alice"]
    card = Card(alice)
    wrong = {"passphrase": b64(b"not the passphrase")}
    for _ in range(50):
        r = alice.post(f"{CARDS}/{card.id}/activate", wrong)
        if r.code == "PASSPHRASE_LOCKED":
            break
        assert r.code == "PASSPHRASE_INCORRECT", r.body
    r = alice.post(f"{CARDS}/{card.id}/activate", {"passphrase": b64(PASS)})
    assert (r.status, r.code) == (429, "PASSPHRASE_LOCKED")
    datas = [b"locked", b"out", b"card"]
    got = both_ways(service, alice, [item(request(card.token, card.mac, x)) for x in datas])
    assert got == macs(card.value, datas)  # the login from before stays (a lockout stops logins)
