"""C_Finalize while C_Sign calls wait in group commit's queue (pkcs11ws/_native/group.pxi), against
the real key service: C_Finalize does not wait for them; once their turn comes, their request
is refused (the transport is closed) and each ends with its own CKR_CRYPTOKI_NOT_INITIALIZED,
none left waiting, and the module works again after C_Initialize. (A file of its own: it
finalizes the module, which the `mod` fixture of other files keeps initialised.)
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from typing import Any

from pkcs11ws import constants as C
from tests.support.cards import client_card
from tests.support.p11ctypes import CKError, Module
from tests.support.queued import hmac_key, hmac_sign, queue_signs, release_and_join

HMAC_KEY = b"z" * 32


def test_c_finalize_with_calls_queued_ends_each_with_its_ckr(
    bare_mod: Module, service: Any
) -> None:
    m = bare_mod
    assert m.initialize(str(service.client_cfg)) == C.CKR_OK
    name, text = client_card(service.client_cfg, "q")
    slot = m.slot_by_label(name)
    h = m.open(slot)
    assert m.login(h, text.encode()) == C.CKR_OK
    key = hmac_key(m, h, HMAC_KEY)
    group = sys.modules["pkcs11ws._native.core"].current_provider().client.group
    out, threads, held = queue_signs(m, slot, key, HMAC_KEY, group, 4)
    try:
        assert m.call("C_Finalize", None) == C.CKR_OK
    finally:
        release_and_join(group, held, threads)
    assert [type(e) for e in out] == [CKError] * 4, out
    assert {e.rv for e in out} == {C.CKR_CRYPTOKI_NOT_INITIALIZED}
    assert len({id(e) for e in out}) == 4
    assert group._busy == 0 and not group._queue
    assert m.initialize(str(service.client_cfg)) == C.CKR_OK
    slot = m.slot_by_label(name)
    h = m.open(slot)
    assert m.login(h, text.encode()) == C.CKR_OK
    key = hmac_key(m, h, HMAC_KEY)
    assert hmac_sign(m, h, key, b"again") == hmac.digest(HMAC_KEY, b"again", hashlib.sha256)
