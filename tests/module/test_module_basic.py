"""libpkcs11ws.so through its CK_FUNCTION_LIST (ctypes, in this process: the module attaches to
the running interpreter) against the real key service over mutual TLS.

Covers the general functions, slots and tokens, sessions and login, and the error codes of the
argument and state checks. Objects and cryptography: test_module_objects.py.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import uuid
from ctypes import byref

import pytest

from pkcs11ws import constants as C
from pkcs11ws import mechanisms
from pkcs11ws.__main__ import module_path
from pkcs11ws._native import core
from pkcs11ws.errors import ServiceError
from tests.support.p11ctypes import (
    CK_C_INITIALIZE_ARGS,
    CK_INFO,
    CK_INTERFACE,
    CK_MECHANISM_INFO,
    CK_SESSION_INFO,
    CK_SLOT_INFO,
    CK_TOKEN_INFO,
    CK_ULONG,
    GEN,
    FunctionList30,
    text,
)


def new_card_with_info(client) -> tuple[str, bytes, dict]:
    name = "m" + uuid.uuid4().hex[:12]
    pin = b"pin-" + uuid.uuid4().hex.encode()
    return name, pin, client.create_softcard(name, pin)


def requests() -> int:
    prov = core.current_provider()
    return int(prov.client.stats()["requests"])  # type: ignore[attr-defined]


def _dynamic(path: str) -> tuple[list[str], str]:
    nm = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True)
    names = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
    return names, subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout


def test_exports_only_c_functions_and_holds_no_path():
    # libpkcs11ws.so: only C_*, no libpython and no RPATH (it finds the runtime at run time).
    path = module_path()
    names, dyn = _dynamic(path)
    assert sorted(names) == sorted(f.name for f in GEN.ALL)
    assert "libpython" not in dyn
    assert "RUNPATH" not in dyn and "RPATH" not in dyn
    assert "NODELETE" in dyn
    # libpkcs11ws-python.so: libpython by soname only, one entry point for the bootstrap.
    names, dyn = _dynamic(os.path.join(os.path.dirname(path), "libpkcs11ws-python.so"))
    assert names == ["p11ws_loader_boot"]
    assert "[libpython3.11.so.1.0]" in dyn
    assert "RUNPATH" not in dyn and "RPATH" not in dyn
    assert "NODELETE" in dyn


def test_module_path_command():
    out = subprocess.run(
        [sys.executable, "-m", "pkcs11ws", "module-path"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == module_path() and out.endswith("/pkcs11ws/_native/libpkcs11ws.so")


def test_get_info(mod):
    info = CK_INFO()
    mod.ok("C_GetInfo", byref(info))
    assert (info.cryptokiVersion.major, info.cryptokiVersion.minor) == (2, 40)
    assert text(info.manufacturerID) == "pkcs11ws"
    assert text(info.libraryDescription) == "pkcs11ws WSOP-compatible"
    assert bytes(info.manufacturerID).endswith(b" ")  # blank padded, no NUL
    assert mod.call("C_GetInfo", None) == C.CKR_ARGUMENTS_BAD


def test_initialize_rules(mod, service):
    assert mod.initialize(str(service.client_cfg)) == C.CKR_CRYPTOKI_ALREADY_INITIALIZED
    assert mod.call("C_Finalize", ctypes.c_void_p(1)) == C.CKR_ARGUMENTS_BAD
    mod.ok("C_Finalize", None)
    info = CK_INFO()
    n = CK_ULONG()
    assert mod.call("C_GetInfo", byref(info)) == C.CKR_CRYPTOKI_NOT_INITIALIZED
    assert mod.call("C_GetSlotList", 0, None, byref(n)) == C.CKR_CRYPTOKI_NOT_INITIALIZED
    assert mod.call("C_DigestInit", 1, None) == C.CKR_CRYPTOKI_NOT_INITIALIZED
    assert mod.call("C_Finalize", None) == C.CKR_CRYPTOKI_NOT_INITIALIZED

    fn = ctypes.cast(
        ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(lambda p: 0), ctypes.c_void_p
    )
    # Mutex callbacks without CKF_OS_LOCKING_OK: the module can only use OS locking.
    args = CK_C_INITIALIZE_ARGS(fn, fn, fn, fn, 0, None)
    assert mod.call("C_Initialize", byref(args)) == C.CKR_CANT_LOCK
    args = CK_C_INITIALIZE_ARGS(fn, None, fn, fn, C.CKF_OS_LOCKING_OK, None)
    assert mod.call("C_Initialize", byref(args)) == C.CKR_ARGUMENTS_BAD
    # NULL args, mutex callbacks with CKF_OS_LOCKING_OK, and CKF_LIBRARY_CANT_CREATE_OS_THREADS
    # (GnuTLS through p11-kit: the module then starts no thread) are all fine.
    args = CK_C_INITIALIZE_ARGS(fn, fn, fn, fn, C.CKF_OS_LOCKING_OK, None)
    no_threads = CK_C_INITIALIZE_ARGS(
        None, None, None, None, C.CKF_LIBRARY_CANT_CREATE_OS_THREADS, None
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        mod.ok("C_Initialize", byref(args))
        mod.ok("C_Finalize", None)
        mod.ok("C_Initialize", byref(no_threads))
        assert mod.slots() is not None
        mod.ok("C_Finalize", None)
        mod.ok("C_Initialize", None)
        mod.ok("C_Finalize", None)
    assert mod.initialize(str(service.client_cfg)) == C.CKR_OK


def test_invalid_config_is_general_error_with_message(mod, service, tmp_path, capfd):
    bad = tmp_path / "bad.cfg"
    bad.write_text(service.client_cfg.read_text() + "PORT seventy\n")
    mod.ok("C_Finalize", None)
    try:
        assert mod.initialize(str(bad)) == C.CKR_GENERAL_ERROR
        err = capfd.readouterr().err
        assert "libpkcs11ws: C_Initialize:" in err and f"{bad}:" in err and "PORT" in err
        assert mod.initialize(str(tmp_path / "missing.cfg")) == C.CKR_GENERAL_ERROR
        assert "not found" in capfd.readouterr().err
    finally:
        assert mod.initialize(str(service.client_cfg)) == C.CKR_OK


def test_slot_per_softcard_and_token_info(mod, client):
    name, _, card = new_card_with_info(client)
    slot = mod.slot_by_label(name)
    before = mod.slots()
    assert slot in before and all(isinstance(s, int) and 0 < s < 1 << 20 for s in before)
    info = mod.token_info(slot)
    assert text(info.label) == name
    assert text(info.manufacturerID) == "pkcs11ws"
    assert text(info.model) == "WSOP softcard"
    assert text(info.serialNumber) == card["id"].replace("-", "")[:16]
    assert info.flags == (
        C.CKF_LOGIN_REQUIRED | C.CKF_USER_PIN_INITIALIZED | C.CKF_TOKEN_INITIALIZED | C.CKF_RNG
    )
    assert (info.ulMinPinLen, info.ulMaxPinLen) == (1, 256)
    sinfo = CK_SLOT_INFO()
    mod.ok("C_GetSlotInfo", slot, byref(sinfo))
    assert sinfo.flags & C.CKF_TOKEN_PRESENT
    assert name in text(sinfo.slotDescription) and text(sinfo.manufacturerID) == "pkcs11ws"
    # A softcard made later appears on the next C_GetSlotList; earlier IDs do not move.
    name2, _, _ = new_card_with_info(client)
    after = mod.slots()
    assert set(before) < set(after)
    assert mod.slot_by_label(name) == slot and mod.slot_by_label(name2) not in before
    assert mod.call("C_GetTokenInfo", 999999, byref(info)) == C.CKR_SLOT_ID_INVALID
    assert mod.call("C_GetSlotInfo", 999999, byref(sinfo)) == C.CKR_SLOT_ID_INVALID


def test_slot_list_length_query_rules(mod, client):
    new_card_with_info(client)
    n = CK_ULONG()
    mod.ok("C_GetSlotList", 1, None, byref(n))
    assert n.value >= 1
    small = CK_ULONG(n.value - 1)
    arr = (CK_ULONG * n.value)()
    assert mod.call("C_GetSlotList", 1, arr, byref(small)) == C.CKR_BUFFER_TOO_SMALL
    assert small.value == n.value
    assert mod.call("C_GetSlotList", 1, arr, None) == C.CKR_ARGUMENTS_BAD
    # The buffer call right after the length query answers from it: one round trip for both.
    r0 = requests()
    mod.ok("C_GetSlotList", 1, None, byref(n))
    mod.ok("C_GetSlotList", 1, arr, byref(n))
    assert requests() - r0 == 1


def test_deleted_softcard_token_not_present(mod, client):
    name, _, card = new_card_with_info(client)
    slot = mod.slot_by_label(name)
    client.delete_softcard(card["id"], force=True)
    assert slot not in mod.slots(present=True)
    assert slot in mod.slots(present=False)
    info = CK_SLOT_INFO()
    mod.ok("C_GetSlotInfo", slot, byref(info))
    assert not info.flags & C.CKF_TOKEN_PRESENT
    assert mod.call("C_GetTokenInfo", slot, byref(CK_TOKEN_INFO())) == C.CKR_TOKEN_NOT_PRESENT
    h = CK_ULONG()
    assert (
        mod.call("C_OpenSession", slot, C.CKF_SERIAL_SESSION, None, None, byref(h))
        == C.CKR_TOKEN_NOT_PRESENT
    )


def test_mechanism_list_and_info(mod, client):
    name, _, _ = new_card_with_info(client)
    slot = mod.slot_by_label(name)
    n = CK_ULONG()
    mod.ok("C_GetMechanismList", slot, None, byref(n))
    assert n.value == len(mechanisms.MECHANISMS)
    arr = (CK_ULONG * n.value)()
    short = CK_ULONG(1)
    assert mod.call("C_GetMechanismList", slot, arr, byref(short)) == C.CKR_BUFFER_TOO_SMALL
    assert short.value == n.value
    mod.ok("C_GetMechanismList", slot, arr, byref(n))
    assert list(arr) == [m.code for m in mechanisms.MECHANISMS]
    # Each row's C_GetMechanismInfo: tests/module/test_module_tables.py, one test per row.
    info = CK_MECHANISM_INFO()
    assert mod.call("C_GetMechanismInfo", slot, 0x1081, byref(info)) == C.CKR_MECHANISM_INVALID
    assert mod.call("C_GetMechanismList", 999999, None, byref(n)) == C.CKR_SLOT_ID_INVALID


def session_state(mod, h: int) -> int:
    info = CK_SESSION_INFO()
    mod.ok("C_GetSessionInfo", h, byref(info))
    return int(info.state)


def test_sessions_and_login_state(mod, client):
    name, pin, _ = new_card_with_info(client)
    slot = mod.slot_by_label(name)
    h = CK_ULONG()
    assert (
        mod.call("C_OpenSession", slot, C.CKF_RW_SESSION, None, None, byref(h))
        == C.CKR_SESSION_PARALLEL_NOT_SUPPORTED
    )
    assert (
        mod.call("C_OpenSession", slot, C.CKF_SERIAL_SESSION, None, None, None)
        == C.CKR_ARGUMENTS_BAD
    )
    ro = mod.open(slot, rw=False)
    rw = mod.open(slot)
    assert ro != rw
    assert session_state(mod, ro) == C.CKS_RO_PUBLIC_SESSION
    assert session_state(mod, rw) == C.CKS_RW_PUBLIC_SESSION
    info = mod.token_info(slot)
    assert (info.ulSessionCount, info.ulRwSessionCount) == (2, 1)

    assert mod.login(rw, b"wrong") == C.CKR_PIN_INCORRECT
    assert mod.login(rw, b"") == C.CKR_PIN_LEN_RANGE
    assert mod.login(rw, b"x" * 257) == C.CKR_PIN_LEN_RANGE
    assert mod.call("C_Login", rw, C.CKU_USER, None, 4) == C.CKR_ARGUMENTS_BAD
    buf = ctypes.create_string_buffer(pin)
    assert mod.call("C_Login", rw, C.CKU_SO, buf, len(pin)) == C.CKR_USER_TYPE_INVALID
    assert mod.call("C_Login", rw, 7, buf, len(pin)) == C.CKR_USER_TYPE_INVALID
    assert mod.call("C_Logout", rw) == C.CKR_USER_NOT_LOGGED_IN

    assert mod.login(rw, pin) == C.CKR_OK
    # The login belongs to the token: every session of the process sees it.
    assert session_state(mod, ro) == C.CKS_RO_USER_FUNCTIONS
    assert session_state(mod, rw) == C.CKS_RW_USER_FUNCTIONS
    assert mod.login(ro, pin) == C.CKR_USER_ALREADY_LOGGED_IN
    mod.ok("C_Logout", ro)
    assert session_state(mod, rw) == C.CKS_RW_PUBLIC_SESSION
    assert mod.call("C_Logout", rw) == C.CKR_USER_NOT_LOGGED_IN

    # Closing the last session of a token logs out.
    assert mod.login(rw, pin) == C.CKR_OK
    mod.ok("C_CloseSession", ro)
    assert session_state(mod, rw) == C.CKS_RW_USER_FUNCTIONS
    mod.ok("C_CloseSession", rw)
    assert mod.call("C_CloseSession", rw) == C.CKR_SESSION_HANDLE_INVALID
    s = mod.open(slot)
    assert session_state(mod, s) == C.CKS_RW_PUBLIC_SESSION
    mod.open(slot)
    mod.ok("C_CloseAllSessions", slot)
    assert mod.call("C_GetSessionInfo", s, byref(CK_SESSION_INFO())) == (
        C.CKR_SESSION_HANDLE_INVALID
    )
    assert mod.token_info(slot).ulSessionCount == 0
    assert mod.call("C_CloseAllSessions", 999999) == C.CKR_SLOT_ID_INVALID


def test_close_all_reaches_the_newest_session(mod, client):
    # The scans of every session stop above the highest index ever used (C_Finalize of a
    # process that opened none touches no page of the table): the newest session, at that
    # index, is still found and closed.
    name, _, _ = new_card_with_info(client)
    slot = mod.slot_by_label(name)
    opened = [mod.open(slot, rw=False) for _ in range(5)]
    for h in opened[:-1]:
        mod.ok("C_CloseSession", h)
    newest = mod.open(slot, rw=False)
    assert (newest & 0xFFFF) > (opened[-1] & 0xFFFF) > (opened[0] & 0xFFFF)
    assert mod.token_info(slot).ulSessionCount == 2
    mod.ok("C_CloseAllSessions", slot)
    for h in (opened[-1], newest):
        assert mod.call("C_GetSessionInfo", h, byref(CK_SESSION_INFO())) == (
            C.CKR_SESSION_HANDLE_INVALID
        )
    assert mod.token_info(slot).ulSessionCount == 0


def test_logout_reuses_the_connection(mod, client):
    # Logging out (no retries) goes over the thread's kept-alive connection: no new handshake.
    name, pin, card = new_card_with_info(client)
    slot = mod.slot_by_label(name)
    s = mod.open(slot)
    assert mod.login(s, pin) == C.CKR_OK
    prov = core.current_provider()
    token = prov.tokens[slot]  # type: ignore[attr-defined]
    before = prov.client.stats()  # type: ignore[attr-defined]
    mod.ok("C_Logout", s)
    after = prov.client.stats()  # type: ignore[attr-defined]
    assert after["requests"] == before["requests"] + 1
    assert after["connects"] == before["connects"]
    with pytest.raises(ServiceError) as ei:
        client.search_objects(card["id"], token, {})
    assert ei.value.code == "NOT_ACTIVATED"
    mod.ok("C_CloseSession", s)


def test_session_handle_checks(mod):
    info = CK_SESSION_INFO()
    for bad in (0, 1, 0xFFFF, 0x7FFF0001, 2**64 - 1):
        assert mod.call("C_GetSessionInfo", bad, byref(info)) == C.CKR_SESSION_HANDLE_INVALID
        assert mod.call("C_Logout", bad) == C.CKR_SESSION_HANDLE_INVALID
        assert mod.call("C_FindObjectsInit", bad, None, 0) == C.CKR_SESSION_HANDLE_INVALID
        assert mod.call("C_EncryptInit", bad, None, 1) == C.CKR_SESSION_HANDLE_INVALID


def test_unsupported_functions(mod, client):
    name, _, _ = new_card_with_info(client)
    h = mod.open(mod.slot_by_label(name))
    n = CK_ULONG()
    assert mod.call("C_DigestEncryptUpdate", h, None, 0, None, byref(n)) == (
        C.CKR_FUNCTION_NOT_SUPPORTED
    )
    assert mod.call("C_SeedRandom", h, None, 0) == C.CKR_RANDOM_SEED_NOT_SUPPORTED
    assert mod.call("C_GetFunctionStatus", h) == C.CKR_FUNCTION_NOT_PARALLEL
    assert mod.call("C_CancelFunction", h) == C.CKR_FUNCTION_NOT_PARALLEL
    assert mod.call("C_WaitForSlotEvent", 0, byref(n), None) == C.CKR_FUNCTION_NOT_SUPPORTED
    assert mod.call("C_InitToken", 1, None, 0, None) == C.CKR_FUNCTION_NOT_SUPPORTED
    assert mod.call("C_WrapKey", h, None, 0, 0, None, byref(n)) == C.CKR_FUNCTION_NOT_SUPPORTED
    mod.ok("C_CloseSession", h)


def test_interfaces():
    lib = ctypes.CDLL(module_path())
    n = CK_ULONG()
    assert lib.C_GetInterfaceList(None, byref(n)) == C.CKR_OK and n.value == 2
    arr = (CK_INTERFACE * 2)()
    assert lib.C_GetInterfaceList(arr, byref(n)) == C.CKR_OK
    versions = []
    for iface in arr:
        assert iface.pInterfaceName == b"PKCS 11" and iface.flags == 0
        fl = ctypes.cast(iface.pFunctionList, ctypes.POINTER(FunctionList30)).contents
        versions.append((fl.version.major, fl.version.minor))
    assert versions == [(3, 0), (2, 40)]
    p = ctypes.POINTER(CK_INTERFACE)()
    assert lib.C_GetInterface(None, None, byref(p), 0) == C.CKR_OK
    assert p.contents.pInterfaceName == b"PKCS 11"
    v = (ctypes.c_ubyte * 2)(2, 40)
    assert lib.C_GetInterface(b"PKCS 11", v, byref(p), 0) == C.CKR_OK
    fl = ctypes.cast(p.contents.pFunctionList, ctypes.POINTER(FunctionList30)).contents
    assert (fl.version.major, fl.version.minor) == (2, 40)
    assert lib.C_GetInterface(b"Vendor X", None, byref(p), 0) == C.CKR_ARGUMENTS_BAD
    assert lib.C_GetInterface(None, (ctypes.c_ubyte * 2)(3, 1), byref(p), 0) == (
        C.CKR_ARGUMENTS_BAD
    )
    assert lib.C_GetInterface(None, None, byref(p), C.CKF_INTERFACE_FORK_SAFE) == (
        C.CKR_ARGUMENTS_BAD
    )
