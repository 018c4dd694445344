"""The token's CKF_USER_PIN_* flags follow the key service's count of wrong passphrases.

pkcs11test's ReadOnlySessionTest.UserLoginWrongPIN expects CKF_USER_PIN_COUNT_LOW after a wrong
PIN. The service counts wrong passphrases per softcard and says so in its softcard answer; the
module reads the count after a refused C_Login and on C_GetSlotList, never on C_GetTokenInfo.
"""

from __future__ import annotations

import time
import uuid

import pytest

from pkcs11ws import constants as C
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from pkcs11ws.errors import ServiceError
from tests.support.fault_util import write_cfg

PIN_FLAGS = C.CKF_USER_PIN_COUNT_LOW | C.CKF_USER_PIN_FINAL_TRY | C.CKF_USER_PIN_LOCKED


def test_wrong_passphrases_set_pin_flags(bare_mod, fresh_service, tmp_path):
    svc = fresh_service(overrides={"lockout": {"threshold": 3, "max_seconds": 2}})
    client = KeyServiceClient(load_config(str(svc.client_cfg)))
    name = "p" + uuid.uuid4().hex[:12]
    good = b"the right passphrase"
    client.create_softcard(name, good)
    client.close()
    assert bare_mod.initialize(str(write_cfg(svc, tmp_path / "p11.cfg"))) == C.CKR_OK
    slot = bare_mod.slot_by_label(name)
    h = bare_mod.open(slot, rw=False)

    def flags() -> int:
        return int(bare_mod.token_info(slot).flags) & PIN_FLAGS

    assert flags() == 0
    assert bare_mod.login(h, b"wrong 1") == C.CKR_PIN_INCORRECT
    assert flags() == C.CKF_USER_PIN_COUNT_LOW
    assert bare_mod.login(h, b"wrong 2") == C.CKR_PIN_INCORRECT  # the next wrong one locks
    assert flags() == C.CKF_USER_PIN_COUNT_LOW | C.CKF_USER_PIN_FINAL_TRY
    assert bare_mod.login(h, b"wrong 3") == C.CKR_PIN_INCORRECT
    assert flags() == C.CKF_USER_PIN_COUNT_LOW | C.CKF_USER_PIN_LOCKED
    assert bare_mod.login(h, good) == C.CKR_PIN_LOCKED
    assert flags() & C.CKF_USER_PIN_LOCKED
    # The lock is temporary (1 s here): a good passphrase then clears every flag.
    deadline = time.monotonic() + 30
    while (rv := bare_mod.login(h, good)) == C.CKR_PIN_LOCKED and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rv == C.CKR_OK and flags() == 0
    # Another process's wrong passphrase shows after the next C_GetSlotList.
    bare_mod.ok("C_Logout", h)
    other = KeyServiceClient(load_config(str(svc.client_cfg)))
    card = next(c for c in other.list_softcards() if c["name"] == name)
    with pytest.raises(ServiceError):
        other.activate(card["id"], b"wrong elsewhere")
    other.close()
    assert flags() == 0  # C_GetTokenInfo asks nobody
    bare_mod.slots()
    assert flags() == C.CKF_USER_PIN_COUNT_LOW
