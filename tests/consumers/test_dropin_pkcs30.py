"""PKCS#11 3.0 as newer consumers use it (Java 17+, OpenSSL's pkcs11-provider), each run in a
fresh process so that the module is initialised through the interface under test:
C_GetInterface("PKCS 11", 3.0) and its function list (C_LoginUser, C_SessionCancel, the
message functions that return CKR_FUNCTION_NOT_SUPPORTED), and the configuration path a host
passes in CK_C_INITIALIZE_ARGS.pReserved ("config=PATH"), which wins over $PKCS11WS_CONFIG.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.dropin_util import consumer_env

ROOT = Path(__file__).resolve().parents[2]  # the host imports tests.support.p11ctypes from here

# Runs in the child: a C host's view, through the 3.0 interface only.
SCRIPT = textwrap.dedent(
    """
    import ctypes, os, sys
    from ctypes import byref
    from tests.support.p11ctypes import (CK_C_INITIALIZE_ARGS, CK_INTERFACE, CK_MECHANISM, CK_ULONG,
                           FunctionList30, Template)
    from pkcs11ws import constants as C

    lib = ctypes.CDLL(sys.argv[1])
    card = sys.argv[2]
    iface = ctypes.POINTER(CK_INTERFACE)()
    version = (ctypes.c_ubyte * 2)(3, 0)
    assert lib.C_GetInterface(b"PKCS 11", version, byref(iface), 0) == 0
    fl = ctypes.cast(iface.contents.pFunctionList, ctypes.POINTER(FunctionList30)).contents
    assert (fl.version.major, fl.version.minor) == (3, 0)
    reserved = ctypes.create_string_buffer(os.environ["RESERVED"].encode())
    args = CK_C_INITIALIZE_ARGS(None, None, None, None, C.CKF_OS_LOCKING_OK,
                                ctypes.addressof(reserved))
    rv = fl.C_Initialize(byref(args))
    print("initialize", C.ckr_name(rv))
    if rv != 0:
        sys.exit(0)
    n = CK_ULONG()
    assert fl.C_GetSlotList(1, None, byref(n)) == 0
    slots = (CK_ULONG * n.value)()
    assert fl.C_GetSlotList(1, slots, byref(n)) == 0
    from tests.support.p11ctypes import CK_TOKEN_INFO, text
    slot = None
    for s in slots:
        ti = CK_TOKEN_INFO()
        assert fl.C_GetTokenInfo(s, byref(ti)) == 0
        if text(ti.label) == card:
            slot = s
    h = CK_ULONG()
    assert fl.C_OpenSession(slot, C.CKF_SERIAL_SESSION | C.CKF_RW_SESSION, None, None,
                            byref(h)) == 0
    pin = os.environ["PKCS11WS_TEST_PIN"].encode()
    user = b"ignored"
    rv = fl.C_LoginUser(h, C.CKU_USER, b"wrong", 5, user, len(user))
    print("loginuser-wrong", C.ckr_name(rv))
    rv = fl.C_LoginUser(h, C.CKU_USER, pin, len(pin), user, len(user))
    print("loginuser", C.ckr_name(rv))
    t = Template([(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True), (C.CKA_CLASS, C.CKO_SECRET_KEY),
                  (C.CKA_KEY_TYPE, C.CKK_AES), (C.CKA_VALUE_LEN, 16)])
    key = CK_ULONG()
    gen = CK_MECHANISM(C.CKM_AES_KEY_GEN, None, 0)
    assert fl.C_GenerateKey(h, byref(gen), t.array, t.count, byref(key)) == 0
    iv = ctypes.create_string_buffer(16)
    cbc = CK_MECHANISM(C.CKM_AES_CBC_PAD, ctypes.addressof(iv), 16)
    out = ctypes.create_string_buffer(64)
    for flags, init, update in (
        (C.CKF_ENCRYPT, fl.C_EncryptInit, fl.C_EncryptUpdate),
        (C.CKF_DECRYPT, fl.C_DecryptInit, fl.C_DecryptUpdate),
    ):
        assert init(h, byref(cbc), key) == 0
        assert init(h, byref(cbc), key) == C.CKR_OPERATION_ACTIVE
        n.value = 64
        assert update(h, b"x" * 32, 32, out, byref(n)) == 0
        print("cancel", C.ckr_name(fl.C_SessionCancel(h, flags)))
        print("after-cancel", C.ckr_name(update(h, b"x" * 16, 16, out, byref(n))))
        assert init(h, byref(cbc), key) == 0  # a new operation can start
        assert fl.C_SessionCancel(h, flags) == 0
    mac = CK_MECHANISM(C.CKM_SHA256_HMAC, None, 0)
    t2 = Template([(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True), (C.CKA_CLASS, C.CKO_SECRET_KEY),
                   (C.CKA_VALUE_LEN, 32)])
    mkey = CK_ULONG()
    gen2 = CK_MECHANISM(C.CKM_SHA256_KEY_GEN, None, 0)
    assert fl.C_GenerateKey(h, byref(gen2), t2.array, t2.count, byref(mkey)) == 0
    assert fl.C_SignInit(h, byref(mac), mkey) == 0
    assert fl.C_SignUpdate(h, b"abc", 3) == 0
    print("cancel-sign", C.ckr_name(fl.C_SessionCancel(h, C.CKF_SIGN)))
    print("after-cancel-sign", C.ckr_name(fl.C_SignUpdate(h, b"abc", 3)))
    assert fl.C_FindObjectsInit(h, None, 0) == 0
    print("cancel-find", C.ckr_name(fl.C_SessionCancel(h, C.CKF_FIND_OBJECTS)))
    print("after-cancel-find", C.ckr_name(fl.C_FindObjectsFinal(h)))
    print("cancel-bad", C.ckr_name(fl.C_SessionCancel(999999, C.CKF_ENCRYPT)))
    print("message", C.ckr_name(fl.C_MessageEncryptInit(h, byref(cbc), key)),
          C.ckr_name(fl.C_MessageSignFinal(h)), C.ckr_name(fl.C_DecryptMessage(
              h, None, 0, None, 0, None, 0, None, None)))
    assert fl.C_Logout(h) == 0
    assert fl.C_Finalize(None) == 0
    print("done")
    """
)


def run(service, tmp_path: Path, reserved: str, env_config: str, card: str, pin: str):
    script = tmp_path / "host30.py"
    script.write_text(SCRIPT)
    env = consumer_env(service.client_cfg, pin, RESERVED=reserved, PYTHONPATH=str(ROOT))
    env["PKCS11WS_CONFIG"] = env_config
    r = subprocess.run(
        [sys.executable, str(script), module_path(), card],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line), r


def test_interface_30_session_cancel_and_login_user(service, tmp_path):
    name, pin = client_card(service.client_cfg, "i")
    # The path in pReserved wins over a broken $PKCS11WS_CONFIG.
    out, r = run(service, tmp_path, f"config={service.client_cfg}", "/nonexistent.cfg", name, pin)
    assert "done" in r.stdout, r.stdout + r.stderr
    assert out["initialize"] == "CKR_OK"
    assert out["loginuser-wrong"] == "CKR_PIN_INCORRECT"
    assert out["loginuser"] == "CKR_OK"
    assert out["cancel"] == "CKR_OK"
    assert out["after-cancel"] == "CKR_OPERATION_NOT_INITIALIZED"
    assert out["cancel-sign"] == "CKR_OK"
    assert out["after-cancel-sign"] == "CKR_OPERATION_NOT_INITIALIZED"
    assert out["cancel-find"] == "CKR_OK"
    assert out["after-cancel-find"] == "CKR_OPERATION_NOT_INITIALIZED"
    assert out["cancel-bad"] == "CKR_SESSION_HANDLE_INVALID"
    assert out["message"].split() == ["CKR_FUNCTION_NOT_SUPPORTED"] * 3


def test_reserved_config_path_and_free_form_strings(service, tmp_path):
    name, pin = client_card(service.client_cfg, "i")
    # A free-form pReserved that is not ours (pkcs11-provider passes its own strings): ignored,
    # the environment's configuration is used.
    out, r = run(service, tmp_path, "pkcs11-provider init args", str(service.client_cfg), name, pin)
    assert out["initialize"] == "CKR_OK" and "done" in r.stdout
    # config= naming a missing file fails cleanly, saying why on stderr.
    out, r = run(service, tmp_path, "config=/nonexistent/p.cfg", str(service.client_cfg), name, pin)
    assert out["initialize"] == "CKR_GENERAL_ERROR"
    assert "/nonexistent/p.cfg" in r.stderr
