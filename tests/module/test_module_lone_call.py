"""A lone C_Sign with group commit on (the default) sends exactly what group commit off
(PKCS11WS_BATCHINFLIGHT=0) sends, against the real key service over mutual TLS: the same
endpoint, header list and body bytes (the request id's form, the token's place, the field order),
one request per call on the same kept-alive connection, no batch and no new connection.

Issue 15's "nothing gets slower at one thread" compares these two settings; the key service's
direct path (server/direct.py) answers only a body that repeats the last one it decoded up to
its trailing values, so a lone call spelt in any other way, or sent on another connection,
would cost the service its full path. The module is initialised once per setting in this
process, so the test finalizes it (a file of its own: other files keep `mod` initialised).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from typing import Any

import pycurl

from pkcs11ws import constants as C
from tests.support.cards import client_card
from tests.support.p11ctypes import Module
from tests.support.queued import hmac_key, hmac_sign

HMAC_KEY = b"l" * 32
MESSAGES = (b"one", b"two", b"three")
# The values that differ per call or per login; everything else must be the same bytes.
_RID = re.compile(rb'^\{"request_id":"([0-9A-Za-z_-]+)-([0-9]+)",')
_TOKEN = re.compile(rb'"token":"[^"]+"')


def _provider() -> Any:
    return sys.modules["pkcs11ws._native.core"].current_provider()


def _lone_signs(m: Module, cfg: str, name: str, pin: bytes) -> dict[str, Any]:
    """Log in to card `name`, sign once to warm up (the provider's path makes the fast entry),
    then sign MESSAGES alone and record every request body the transport's handles are given."""
    assert m.initialize(cfg) == C.CKR_OK
    try:
        h = m.open(m.slot_by_label(name))
        assert m.login(h, pin) == C.CKR_OK
        keys = m.find(h, [(C.CKA_CLASS, C.CKO_SECRET_KEY)])
        key = keys[0] if keys else hmac_key(m, h, HMAC_KEY)
        assert hmac_sign(m, h, key, b"warm") == hmac.digest(HMAC_KEY, b"warm", hashlib.sha256)
        client = _provider().client
        transport = client.transport
        sent: list[tuple[Any, str, Any, bytes]] = []
        handles = list(transport.servers[0].idle)
        assert handles, "no kept-alive handle after the warm-up"
        own = [conn.setopt for conn in handles]
        for conn in handles:

            def setopt(opt: int, value: Any, conn: Any = conn, inner: Any = conn.setopt) -> None:
                if opt == pycurl.POSTFIELDS:
                    sent.append((conn, conn.path, conn.headers, bytes(value)))
                inner(opt, value)

            conn.setopt = setopt
        before = transport.stats()
        lane = client.group.lane.sent if client.group is not None else 0
        try:
            for d in MESSAGES:
                assert hmac_sign(m, h, key, d) == hmac.digest(HMAC_KEY, d, hashlib.sha256)
        finally:
            for conn, setopt_ in zip(handles, own, strict=True):
                conn.setopt = setopt_
        after = transport.stats()
        return {
            "sent": sent,
            "requests": after["requests"] - before["requests"],
            "connects": after["connects"] - before["connects"],
            "group": client.group,
            "lane": (client.group.lane.sent - lane) if client.group is not None else 0,
        }
    finally:
        assert m.call("C_Finalize", None) == C.CKR_OK


def _spelling(body: bytes) -> tuple[bytes, bytes]:
    """(the request id's prefix, the body without its request id number and token value)."""
    found = _RID.match(body)
    assert found is not None, body[:80]
    return found.group(1), _TOKEN.sub(b'"token":"T"', _RID.sub(b'{"request_id":"R-N",', body))


def test_a_lone_call_with_group_commit_on_sends_what_group_commit_off_sends(
    bare_mod: Module, service: Any, monkeypatch: Any
) -> None:
    cfg = str(service.client_cfg)
    name, text = client_card(service.client_cfg, "lone")
    off_pin = text.encode()
    monkeypatch.setenv("PKCS11WS_BATCHINFLIGHT", "0")
    off = _lone_signs(bare_mod, cfg, name, off_pin)
    monkeypatch.delenv("PKCS11WS_BATCHINFLIGHT")
    on = _lone_signs(bare_mod, cfg, name, off_pin)

    assert off["group"] is None and on["group"] is not None
    # Group commit on: every call took the lane (its own single request, no lock), none was
    # counted by the locked side, and nothing was ever batched.
    assert on["lane"] == len(MESSAGES)
    assert on["group"]._lone == 0 and set(on["group"].sizes) == {1}
    for run in (off, on):
        # One request per call, each on the same kept-alive handle, no new connection.
        assert run["requests"] == len(MESSAGES) and run["connects"] == 0
        assert len(run["sent"]) == len(MESSAGES)
        assert len({id(conn) for conn, *_ in run["sent"]}) == 1
        assert {path for _, path, _, _ in run["sent"]} == {"/crypto/v1/sign"}
    # The same header list, the same body bytes but for the request id's number and the
    # login's token, the request id in the same form (this process's prefix, then a count).
    assert {id(hs) for _, _, hs, _ in off["sent"] + on["sent"]} == {id(off["sent"][0][2])}
    off_spelt = [_spelling(b) for *_, b in off["sent"]]
    on_spelt = [_spelling(b) for *_, b in on["sent"]]
    assert on_spelt == off_spelt
    assert len({prefix for prefix, _ in off_spelt + on_spelt}) == 1
