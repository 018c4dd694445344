"""The key service's per-process caches never outlive what they cache.

Opened tokens, unwrapped key values and decoded attributes are cached in each worker; the store
stays the authority: a deleted key, an ended activation or an expired token is refused by every
worker on the very next request, and the deferred session check (made in the same query as the
key) still outranks every other error.
"""

from __future__ import annotations

import re
import time

from tests.support.service import Api, b64, encode

SIGN = "/crypto/v1/sign"
HMAC_KEY = 0x2B  # CKK_SHA256_HMAC


def _sign(
    api: Api, key: str, token: str, data: bytes = b"x", fresh: bool = True
) -> tuple[int, str | None]:
    if fresh:
        api.close()  # a new connection, which the kernel hands to either worker
    r = api.post(SIGN, {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(data)}, token=token)
    return r.status, r.code


def _pids(log: str, status: int) -> set[str]:
    return set(re.findall(rf" (\d+) INFO pkcs11ws\.server\.access: POST {SIGN} {status} ", log))


def _until_both_workers(svc, api: Api, key: str, token: str, status: int, code: str | None) -> None:
    """Sign on fresh connections until both workers have answered with `status`."""
    for i in range(60):
        assert _sign(api, key, token, b"%d" % i) == (status, code)
        if i >= 4 and len(_pids(svc.log_text(), status)) >= 2:
            return
    time.sleep(0.5)  # the log lines of the last requests may still be on their way
    assert len(_pids(svc.log_text(), status)) == 2, "requests did not reach both workers"


def test_deleted_key_refused_by_every_worker(fresh_service, make_api):
    svc = fresh_service(workers=2)
    api: Api = make_api(svc)
    card, token = api.new_card(b"cache key")
    key = api.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True)
    other = api.import_key(card, token, HMAC_KEY, b"o" * 32, CKA_SIGN=True)
    # Both workers now hold the key's unwrapped value and the token's claims.
    _until_both_workers(svc, api, key, token, 200, None)
    api.close()
    assert (
        api.delete(
            f"/km/v1/softcards/{card}/objects/{key}",
            token=token,
            idem="t-del-" + key.replace("-", ""),
        ).status
        == 200
    )
    # Every worker refuses it at once, and still serves the card's other key.
    _until_both_workers(svc, api, key, token, 404, "KEY_NOT_FOUND")
    for _ in range(6):
        assert _sign(api, other, token) == (200, None)


def test_ended_activation_outranks_every_other_error(fresh_service, make_api):
    svc = fresh_service(workers=2)
    api: Api = make_api(svc)
    card, token = api.new_card(b"cache session")
    key = api.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True)
    _until_both_workers(svc, api, key, token, 200, None)
    api.close()
    assert api.post(f"/km/v1/softcards/{card}/deactivate", token=token).status == 200
    for _ in range(8):
        api.close()
        # An unknown key, an unknown mechanism and a malformed body: the ended session comes
        # first, as when the session is checked before anything else.
        for body in (
            {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": b64(b"x")},
            {"key": "no-such-key", "mechanism": "CKM_SHA256_HMAC", "data": b64(b"x")},
            {"key": key, "mechanism": "CKM_NOPE", "data": b64(b"x")},
            {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": "not base64!"},
            {"key": key, "unknown": 1},
        ):
            r = api.post(SIGN, body, token=token)
            assert (r.status, r.code) == (401, "NOT_ACTIVATED"), body
        body = {"key": key, "mechanism": "CKM_AES_CBC", "iv": b64(bytes(16)), "data": "x"}
        r = api.post("/crypto/v1/encrypt", body, token=token)
        assert (r.status, r.code) == (401, "NOT_ACTIVATED")
    # With a live session, the same bodies get their own errors.
    fresh = api.activate(card, b"cache session")
    assert _sign(api, "no-such-key", fresh) == (404, "KEY_NOT_FOUND")
    r = api.post(SIGN, {"key": key, "mechanism": "CKM_SHA256_HMAC", "data": "x"}, token=fresh)
    assert r.code == "BAD_BASE64"
    r = api.post(SIGN, {"key": key, "mechanism": "CKM_NOPE", "data": b64(b"x")}, token=fresh)
    assert r.code == "MECHANISM_INVALID"


def test_cached_token_still_expires(fresh_service, make_api):
    svc = fresh_service(overrides={"activation_ttl": 2})
    api: Api = make_api(svc)
    card, token = api.new_card(b"cache expiry")
    t0 = time.monotonic()
    key = api.import_key(card, token, HMAC_KEY, b"k" * 32, CKA_SIGN=True)
    assert _sign(api, key, token, fresh=False) == (200, None)  # claims now cached
    time.sleep(max(0.0, t0 + 3.1 - time.monotonic()))
    assert _sign(api, key, token, fresh=False) == (401, "NOT_ACTIVATED")
    r = api.post(f"/km/v1/softcards/{card}/objects/search", {"attrs": {}}, token=token)
    assert (r.status, r.code) == (401, "NOT_ACTIVATED")


def test_search_matches_clear_attributes_and_values(service, api):
    card, token = api.new_card(b"cache search")

    def search(**want):
        r = api.post(
            f"/km/v1/softcards/{card}/objects/search", {"attrs": encode(want)}, token=token
        )
        return sorted(o["handle"] for o in api.ok(r)["objects"])

    data = {}
    for i in range(6):
        r = api.create(
            card, token, {"CKA_CLASS": 0, "CKA_LABEL": b"d%d" % (i % 2), "CKA_VALUE": b"v%d" % i}
        )
        data[i] = api.ok(r)["handle"]
    key = api.import_key(card, token, HMAC_KEY, b"v1" + b"\0" * 30, CKA_LABEL=b"d1")
    assert search(CKA_VALUE=b"v3") == [data[3]]
    assert search(CKA_LABEL=b"d1", CKA_VALUE=b"v3") == [data[3]]
    assert search(CKA_LABEL=b"d0", CKA_VALUE=b"v3") == []
    assert search(CKA_LABEL=b"d1") == sorted([data[1], data[3], data[5], key])
    # A secret key never matches on its value, and never shows it.
    assert search(CKA_VALUE=b"v1" + b"\0" * 30) == []
    r = api.post(
        f"/km/v1/softcards/{card}/objects/search",
        {"attrs": encode({"CKA_LABEL": b"d1"})},
        token=token,
    )
    shown = {o["handle"]: o["attrs"] for o in api.ok(r)["objects"]}
    assert "CKA_VALUE" not in shown[key]
    assert shown[data[5]]["CKA_VALUE"] == b64(b"v5")
    # The same objects read one by one carry the same attributes as the search shows.
    for handle, attrs in shown.items():
        one = api.ok(api.get(f"/km/v1/softcards/{card}/objects/{handle}", token=token))
        assert one["attrs"] == attrs
