"""A create whose answer was lost and whose retries ran out is not made twice by a retry (and a
retried destroy is answered as the first one was).

The service commits C_CreateObject (C_GenerateKey, C_CopyObject) but the answer never reaches the
module (a real TCP relay between module and service drops it, then resets connections), so the
call returns CKR_DEVICE_ERROR once MAXRETRIES is spent. The application then calls again with
the same template: the module reuses the first request's Idempotency-Key, the service replays
its answer, and the call returns the first object: one object on the service, not two. A
different template, or the same template after a success, still makes a new object.
"""

from __future__ import annotations

import os
import uuid
from ctypes import byref

from pkcs11ws import constants as C
from tests.support.fault_util import Relay, object_count, setup_card, write_cfg
from tests.support.p11ctypes import CK_MECHANISM, CK_ULONG, Module, Template

KEY_BASE = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]


def data_template(label: str) -> list[tuple[int, object]]:
    return [
        *KEY_BASE,
        (C.CKA_CLASS, C.CKO_DATA),
        (C.CKA_LABEL, label.encode()),
        (C.CKA_VALUE, os.urandom(64)),
    ]


def aes_template(label: str) -> list[tuple[int, object]]:
    return [
        *KEY_BASE,
        (C.CKA_CLASS, C.CKO_SECRET_KEY),
        (C.CKA_KEY_TYPE, C.CKK_AES),
        (C.CKA_VALUE_LEN, 16),
        (C.CKA_LABEL, label.encode()),
        (C.CKA_ENCRYPT, True),
        (C.CKA_DECRYPT, True),
    ]


def lose(bare_mod: Module, relay: Relay, fn: str, *args: object) -> int:
    """Call fn with the next answer lost and the network down for every retry: its CKR."""
    relay.drop_next_answer()
    try:
        rv = bare_mod.call(fn, *args)
    finally:
        relay.accept()
    assert relay.dropped.is_set()
    relay.dropped.clear()
    return rv


def labelled(bare_mod: Module, h: int, label: str) -> list[int]:
    return bare_mod.find(h, [(C.CKA_LABEL, label.encode())])


def test_retried_create_after_lost_answer_returns_the_first_object(
    bare_mod, fresh_service, tmp_path
):
    svc = fresh_service()
    relay = Relay(svc.port)
    try:
        log = tmp_path / "module.log"
        cfg = write_cfg(
            svc,
            tmp_path / "relay.cfg",
            port=str(relay.port),
            maxretries="1",
            retrydelay="0",
            loglevel="4",
            logfilepath=str(log),
        )
        h, card = setup_card(svc, bare_mod, cfg)
        base = object_count(svc, card)

        # C_CreateObject: the service commits, the answer is lost, the retries fail.
        label = "lost-" + uuid.uuid4().hex[:8]
        items = data_template(label)
        t = Template(items)
        out = CK_ULONG()
        assert lose(bare_mod, relay, "C_CreateObject", h, t.array, t.count, byref(out)) == (
            C.CKR_DEVICE_ERROR
        )
        assert object_count(svc, card) == base + 1  # it was made
        # The application retries with the same template: the first object, not a second.
        first = bare_mod.create(h, items)
        assert object_count(svc, card) == base + 1
        assert labelled(bare_mod, h, label) == [first]
        assert "reusing the Idempotency-Key of an unanswered request" in log.read_text()
        # Once answered, the same template again is a new object (the application asked twice).
        again = bare_mod.create(h, items)
        assert again != first and object_count(svc, card) == base + 2

        # C_GenerateKey: same story.
        label = "gen-" + uuid.uuid4().hex[:8]
        mech = C.CKM_AES_KEY_GEN
        m = CK_MECHANISM(mech, None, 0)
        t = Template(aes_template(label))
        assert lose(
            bare_mod, relay, "C_GenerateKey", h, byref(m), t.array, t.count, byref(out)
        ) == (C.CKR_DEVICE_ERROR)
        assert object_count(svc, card) == base + 3
        key = bare_mod.generate(h, mech, aes_template(label))
        assert object_count(svc, card) == base + 3 and labelled(bare_mod, h, label) == [key]

        # C_CopyObject of that key.
        t = Template([(C.CKA_LABEL, b"copy-" + label.encode())])
        assert lose(bare_mod, relay, "C_CopyObject", h, key, t.array, t.count, byref(out)) == (
            C.CKR_DEVICE_ERROR
        )
        assert object_count(svc, card) == base + 4
        copy = CK_ULONG()
        t = Template([(C.CKA_LABEL, b"copy-" + label.encode())])
        bare_mod.ok("C_CopyObject", h, key, t.array, t.count, byref(copy))
        assert object_count(svc, card) == base + 4
        assert labelled(bare_mod, h, "copy-" + label) == [copy.value]

        # A different template after a lost answer is a different object.
        label = "other-" + uuid.uuid4().hex[:8]
        t = Template(data_template(label))
        assert lose(bare_mod, relay, "C_CreateObject", h, t.array, t.count, byref(out)) == (
            C.CKR_DEVICE_ERROR
        )
        bare_mod.create(h, data_template(label))  # a new random CKA_VALUE: other bytes
        assert object_count(svc, card) == base + 6

        # C_DestroyObject: the service destroyed it, the answer was lost; the retry is answered
        # as the first request was (CKR_OK), not CKR_OBJECT_HANDLE_INVALID.
        assert lose(bare_mod, relay, "C_DestroyObject", h, again) == C.CKR_DEVICE_ERROR
        assert object_count(svc, card) == base + 5
        assert bare_mod.call("C_DestroyObject", h, again) == C.CKR_OK
        assert bare_mod.call("C_DestroyObject", h, again) == C.CKR_OBJECT_HANDLE_INVALID
    finally:
        relay.close()


def test_lost_answer_key_survives_finalize(bare_mod, fresh_service, tmp_path):
    """The key is kept across C_Finalize/C_Initialize (an application that restarts its
    PKCS#11 session after an error) and a new login."""
    svc = fresh_service()
    relay = Relay(svc.port)
    try:
        cfg = write_cfg(
            svc, tmp_path / "relay.cfg", port=str(relay.port), maxretries="0", retrydelay="0"
        )
        pin = uuid.uuid4().hex.encode()
        h, card = setup_card(svc, bare_mod, cfg, pin)
        label = "fin-" + uuid.uuid4().hex[:8]
        items = data_template(label)
        t = Template(items)
        out = CK_ULONG()
        assert lose(bare_mod, relay, "C_CreateObject", h, t.array, t.count, byref(out)) == (
            C.CKR_DEVICE_ERROR
        )
        bare_mod.ok("C_Finalize", None)
        assert bare_mod.initialize(str(cfg)) == C.CKR_OK
        slot = bare_mod.slots()[0]
        h = bare_mod.open(slot)
        assert bare_mod.login(h, pin) == C.CKR_OK
        first = bare_mod.create(h, items)
        assert labelled(bare_mod, h, label) == [first] and object_count(svc, card) == 1
    finally:
        relay.close()
