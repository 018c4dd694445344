"""Calls that queue behind group commit's slots, then leave in one batch: the test holds every
slot of the module's group, starts one C_Sign per message on its own session and thread (ctypes
lets go of the GIL, so each enters the core as a C host's call does), waits until all have
queued, then ends the held "requests" so the queue leaves as one batch. Daemon threads: a call
never woken fails its test instead of hanging the run. Also the HMAC key those tests sign with."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from ctypes import byref
from typing import Any

from pkcs11ws import constants as C
from tests.support.p11ctypes import CKError, Module, mechanism


def hmac_key(mod: Module, h: int, value: bytes) -> int:
    """A private token HMAC-SHA256 key (sign and verify) with VALUE, made in session h."""
    return mod.create(
        h,
        [
            (C.CKA_TOKEN, True),
            (C.CKA_PRIVATE, True),
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_SHA256_HMAC),
            (C.CKA_SIGN, True),
            (C.CKA_VERIFY, True),
            (C.CKA_VALUE, value),
        ],
    )


def hold_slots(group: Any) -> int:
    """Every free slot of group now carries a "request" of the test's own (the lane's token
    parked while anything is in flight, as run() does): how many; group._release(0) once per
    held slot ends them."""
    with group._lock:
        held: int = group.limit - group._busy
        group._busy = group.limit
        group._lane_busy()
    return held


def wait_queued(group: Any, n: int) -> None:
    """Until n calls wait in group's queue (at most a minute)."""
    deadline = time.monotonic() + 60
    while len(group._queue) < n:
        assert time.monotonic() < deadline, "the calls did not queue"
        time.sleep(0.01)


def release_and_join(group: Any, held: int, threads: list[threading.Thread]) -> None:
    """End the test's held slots (hold_slots), so the queued calls leave, and wait (a minute at
    most each) until every call's thread has ended."""
    for _ in range(held):
        group._release(0)
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a queued call was never woken"


def _signers(
    mod: Module, slot: int, key: int, datas: list[bytes]
) -> tuple[list[int], list[Any], list[threading.Thread]]:
    """One session per message, each with its HMAC-SHA256 C_SignInit done, and one daemon
    thread per message (not started) whose C_Sign of 32 bytes puts the signature, or the
    CKError raised, at the message's place in the outcomes list."""
    sessions = [mod.open(slot) for _ in datas]
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    for s in sessions:
        mod.ok("C_SignInit", s, byref(m), key)
    out: list[Any] = [None] * len(datas)

    def sign(i: int) -> None:
        try:
            out[i] = mod.single("C_Sign", sessions[i], datas[i], 32)
        except CKError as e:
            out[i] = e

    threads = [threading.Thread(target=sign, args=(i,), daemon=True) for i in range(len(datas))]
    return sessions, out, threads


def queued_hmac_signs(
    mod: Module, slot: int, key: int, group: Any, datas: list[bytes]
) -> list[Any]:
    """Each message's C_Sign (HMAC-SHA256, 32 bytes) queued behind the held slots; the
    signatures, or the CKError a call raised, in the messages' order."""
    n = len(datas)
    sessions, out, threads = _signers(mod, slot, key, datas)
    held = hold_slots(group)
    try:
        for t in threads:
            t.start()
        wait_queued(group, n)
    finally:
        release_and_join(group, held, threads)  # the queue leaves as one batch
    for s in sessions:
        mod.call("C_CloseSession", s)
    return out


def queue_signs(
    mod: Module, slot: int, key: int, key_value: bytes, group: Any, n: int
) -> tuple[list[Any], list[threading.Thread], int]:
    """n HMAC C_Sign calls with key (its value key_value; the key's fast path warmed first)
    queued behind every slot of group,
    held by the test: (their outcomes, filled in as they end; their threads, started; the
    number of held slots, each to end with group._release(0))."""
    h = mod.open(slot)
    assert hmac_sign(mod, h, key, b"warm") == hmac.digest(key_value, b"warm", hashlib.sha256)
    _, out, threads = _signers(mod, slot, key, [b"queued %d" % i for i in range(n)])
    held = hold_slots(group)
    for t in threads:
        t.start()
    try:
        wait_queued(group, n)
    except BaseException:
        for _ in range(held):
            group._release(0)
        raise
    return out, threads, held


def hmac_sign(mod: Module, h: int, key: int, data: bytes) -> bytes:
    """data's HMAC-SHA256 with key, signed in session h."""
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    mod.ok("C_SignInit", h, byref(m), key)
    out: bytes = mod.single("C_Sign", h, data, 32)
    return out
