"""Softcards: create, list, get, delete, activate, deactivate, lockout, idempotency, tokens."""

from __future__ import annotations

import time
import uuid

import pytest

from pkcs11ws import protocol
from tests.support.service import b64, new_idem

CARDS = "/km/v1/softcards"


def _create(api, name, passphrase=b"pw-at-least-8", idem=None):
    return api.post(CARDS, {"name": name, "passphrase": b64(passphrase)}, idem=idem or new_idem())


def test_create_list_get_delete(api):
    name = "Card" + uuid.uuid4().hex[:10]
    r = _create(api, name)
    assert r.status == 200
    card = r.json
    assert card["name"] == name
    assert (card["keys"], card["certificates"], card["data"]) == (0, 0, 0)
    assert uuid.UUID(card["id"]).version == 4
    assert card["created"].endswith("Z")
    listed = {c["id"]: c for c in api.ok(api.get(CARDS))["softcards"]}
    assert listed[card["id"]] == card
    assert api.ok(api.get(f"{CARDS}/{card['id']}")) == card
    assert api.delete(f"{CARDS}/{card['id']}", idem=new_idem()).status == 200
    r = api.get(f"{CARDS}/{card['id']}")
    assert (r.status, r.code) == (404, "SOFTCARD_NOT_FOUND")
    r = api.delete(f"{CARDS}/{card['id']}", idem=new_idem())
    assert (r.status, r.code) == (404, "SOFTCARD_NOT_FOUND")


def test_list_counts_objects(api):
    card, token = api.new_card()
    api.import_key(card, token, 0x1F, bytes(16))
    api.import_key(card, token, 0x2B, bytes(20))
    api.ok(api.create(card, token, {"CKA_CLASS": 0, "CKA_VALUE": b"d"}))
    got = api.ok(api.get(f"{CARDS}/{card}"))
    assert (got["keys"], got["certificates"], got["data"]) == (2, 0, 1)
    listed = {c["id"]: c for c in api.ok(api.get(CARDS))["softcards"]}
    assert listed[card]["keys"] == 2 and listed[card]["data"] == 1


@pytest.mark.parametrize(
    "name", ["", "a b", "bad-name", "under_score", "ünï", "x" * 65, "semi;colon", "dot.ted"]
)
def test_invalid_names(api, name):
    r = _create(api, name)
    assert r.status == 400
    assert r.code in ("INVALID_NAME", "BAD_REQUEST")
    if name and len(name) <= 64:
        assert r.code == "INVALID_NAME"


def test_name_limits_and_duplicates(api):
    name = "N" + uuid.uuid4().hex + "x" * 31
    assert len(name) == 64
    assert _create(api, name).status == 200
    r = _create(api, name, b"other passphrase")
    assert (r.status, r.code) == (409, "SOFTCARD_EXISTS")


def test_passphrase_length(api):
    r = _create(api, "p" + uuid.uuid4().hex, b"")
    assert (r.status, r.code) == (400, "PASSPHRASE_LEN_RANGE")
    r = _create(api, "p" + uuid.uuid4().hex, b"x" * 257)
    assert (r.status, r.code) == (400, "PASSPHRASE_LEN_RANGE")
    name = "p" + uuid.uuid4().hex
    assert _create(api, name, bytes(range(256))).status == 200
    card = next(c for c in api.ok(api.get(CARDS))["softcards"] if c["name"] == name)
    assert api.activate(card["id"], bytes(range(256)))
    r = api.post(f"{CARDS}/{card['id']}/activate", {"passphrase": b64(b"")})
    assert r.code == "PASSPHRASE_LEN_RANGE"


def test_activate_wrong_passphrase_and_deactivate(api):
    card, token = api.new_card(b"right one")
    r = api.post(f"{CARDS}/{card}/activate", {"passphrase": b64(b"wrong one")})
    assert (r.status, r.code) == (403, "PASSPHRASE_INCORRECT")
    search = f"{CARDS}/{card}/objects/search"
    assert api.post(search, {"attrs": {}}, token=token).status == 200
    act = api.ok(api.post(f"{CARDS}/{card}/activate", {"passphrase": b64(b"right one")}))
    assert act["expires_in"] == 8 * 3600
    token2 = act["token"]
    assert api.post(f"{CARDS}/{card}/deactivate", token=token).status == 200
    r = api.post(search, {"attrs": {}}, token=token)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    r = api.post(f"{CARDS}/{card}/deactivate", token=token)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    # The other activation of the same card is still good.
    assert api.post(search, {"attrs": {}}, token=token2).status == 200


def test_activate_unknown_card(api):
    r = api.post(f"{CARDS}/{uuid.uuid4()}/activate", {"passphrase": b64(b"x")})
    assert (r.status, r.code) == (404, "SOFTCARD_NOT_FOUND")


def test_tokens_are_bound_to_their_card(api):
    _, token_a = api.new_card()
    card_b, token_b = api.new_card()
    key_b = api.import_key(card_b, token_b, 0x2B, b"b" * 32)
    r = api.post(f"{CARDS}/{card_b}/objects/search", {"attrs": {}}, token=token_a)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    r = api.get(f"{CARDS}/{card_b}/objects/{key_b}", token=token_a)
    assert r.code == "NOT_ACTIVATED"
    # /crypto takes the card from the token: card A's token cannot reach card B's key.
    r = api.post(
        "/crypto/v1/sign",
        {"key": key_b, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"x")},
        token=token_a,
    )
    assert (r.status, r.code) == (404, "KEY_NOT_FOUND")


@pytest.mark.parametrize(
    "auth",
    [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer v1.AAAA", "Bearer v1.!!!!", "Bearer x"],
)
def test_bad_tokens(api, auth):
    card, _ = api.new_card()
    headers = {} if auth is None else {"Authorization": auth}
    r = api.post(f"{CARDS}/{card}/objects/search", {"attrs": {}}, headers=headers)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")


def test_tampered_token(api):
    card, token = api.new_card()
    i = len(token) // 2
    bad = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    r = api.post(f"{CARDS}/{card}/objects/search", {"attrs": {}}, token=bad)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")


def test_deleting_a_card_revokes_its_tokens(api):
    card, token = api.new_card()
    assert api.delete(f"{CARDS}/{card}", idem=new_idem()).status == 200
    r = api.post(f"{CARDS}/{card}/objects/search", {"attrs": {}}, token=token)
    assert r.code == "NOT_ACTIVATED"


def test_delete_refused_while_keys_remain(api):
    card, token = api.new_card()
    key = api.import_key(card, token, 0x1F, bytes(32))
    api.ok(api.create(card, token, {"CKA_CLASS": 0, "CKA_VALUE": b"data"}))
    r = api.delete(f"{CARDS}/{card}", idem=new_idem())
    assert (r.status, r.code) == (409, "SOFTCARD_NOT_EMPTY")
    assert api.delete(f"{CARDS}/{card}/objects/{key}", token=token, idem=new_idem()).status == 200
    # Only keys hold a card back; the data object goes with it.
    assert api.delete(f"{CARDS}/{card}", idem=new_idem()).status == 200


def test_force_delete(api):
    card, token = api.new_card()
    api.import_key(card, token, 0x1F, bytes(32))
    r = api.delete(f"{CARDS}/{card}?force=false", idem=new_idem())
    assert r.code == "SOFTCARD_NOT_EMPTY"
    r = api.delete(f"{CARDS}/{card}?force=maybe", idem=new_idem())
    assert (r.status, r.code) == (400, "BAD_REQUEST")
    r = api.delete(f"{CARDS}/{card}?other=true", idem=new_idem())
    assert (r.status, r.code) == (400, "BAD_REQUEST")
    assert api.delete(f"{CARDS}/{card}?force=true", idem=new_idem()).status == 200
    assert api.get(f"{CARDS}/{card}").status == 404


def test_rate_limit_on_wrong_passphrases(api):
    card, _ = api.new_card(b"good passphrase")
    act = f"{CARDS}/{card}/activate"

    def attempt(p):
        return api.post(act, {"passphrase": b64(p)})

    for _ in range(5):
        r = attempt(b"bad")
        assert (r.status, r.code) == (403, "PASSPHRASE_INCORRECT")
    t_lock = time.monotonic()
    r = attempt(b"bad")
    assert (r.status, r.code) == (429, "PASSPHRASE_LOCKED")
    assert "1 more s" in r.json["message"]
    assert (
        attempt(b"good passphrase").code == "PASSPHRASE_LOCKED"
    )  # even the right one, while locked
    time.sleep(max(0.0, 1.1 - (time.monotonic() - t_lock)))
    r = attempt(b"bad")  # the 6th failure: locked for 2 s now
    assert r.code == "PASSPHRASE_INCORRECT"
    r = attempt(b"good passphrase")
    assert r.code == "PASSPHRASE_LOCKED" and "2 more s" in r.json["message"]
    time.sleep(2.1)
    assert attempt(b"good passphrase").status == 200
    # Success reset the count: one more failure does not lock.
    assert attempt(b"bad").code == "PASSPHRASE_INCORRECT"
    assert attempt(b"good passphrase").status == 200


def test_idempotent_create_softcard(api):
    name = "Idem" + uuid.uuid4().hex[:8]
    key = new_idem()
    first = _create(api, name, b"pw-at-least-8", idem=key)
    second = _create(api, name, b"pw-at-least-8", idem=key)
    assert first.status == second.status == 200
    assert first.body == second.body
    assert [c["name"] for c in api.ok(api.get(CARDS))["softcards"]].count(name) == 1
    r = _create(api, name, b"pw2", idem=key)
    assert (r.status, r.code) == (422, "IDEMPOTENCY_CONFLICT")
    r = _create(api, name + "x", b"pw-at-least-8", idem=key)
    assert (r.status, r.code) == (422, "IDEMPOTENCY_CONFLICT")
    # A new key for the same name: the name is taken.
    assert _create(api, name, b"pw-at-least-8").code == "SOFTCARD_EXISTS"


@pytest.mark.parametrize("key", [None, "", "short", "x" * 129, "bad key!", "ok-but-é-no"])
def test_idempotency_key_required(api, key):
    body = {"name": "Need" + uuid.uuid4().hex[:8], "passphrase": b64(b"x")}
    headers = {} if key is None else {"Idempotency-Key": key.encode().decode("latin-1")}
    r = api.post(CARDS, body, headers=headers)
    assert (r.status, r.code) == (400, "IDEMPOTENCY_KEY_REQUIRED")
    r = api.delete(f"{CARDS}/{uuid.uuid4()}", headers=headers)
    assert r.code == "IDEMPOTENCY_KEY_REQUIRED"


def test_idempotent_delete_softcard(api):
    card, _ = api.new_card()
    key = new_idem()
    first = api.delete(f"{CARDS}/{card}", idem=key)
    second = api.delete(f"{CARDS}/{card}", idem=key)
    assert first.status == second.status == 200 and first.body == second.body
    assert api.delete(f"{CARDS}/{card}", idem=new_idem()).code == "SOFTCARD_NOT_FOUND"
    r = api.delete(f"{CARDS}/{card}?force=true", idem=key)
    assert r.code == "IDEMPOTENCY_CONFLICT"


def test_routing_errors(api):
    r = api.get("/nowhere")
    assert (r.status, r.code) == (404, "NOT_FOUND")
    assert set(r.json) == {"code", "message"}
    r = api.request("PUT", CARDS)
    assert (r.status, r.code) == (405, "METHOD_NOT_ALLOWED")
    r = api.request("PATCH", "/health")
    assert (r.status, r.code) == (405, "METHOD_NOT_ALLOWED")
    assert r.status == protocol.ERRORS["METHOD_NOT_ALLOWED"].http
