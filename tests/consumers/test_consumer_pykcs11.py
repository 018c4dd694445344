"""PyKCS11 (PyPI `PyKCS11`) as the consumer of libpkcs11ws.so, against the real key service over
mutual TLS.

PyKCS11 loads the module in this process, calls C_Initialize with CKF_OS_LOCKING_OK and holds
the GIL across every call (the module must not release a GIL its caller owns). Its high-level
API covers every function the WSOP guide lists (6.1) and its low-level one (`session.lib`, the
raw C_* calls) the return codes and operation states consumers rely on (interop.md): what
python-pkcs11 hides (C_GetSessionInfo, C_CloseAllSessions, CKR_BUFFER_TOO_SMALL, the distinct
CKR_SIGNATURE_LEN_RANGE, CKR_OPERATION_ACTIVE by explicit C_*Init) is checked here.
Known answers use imported keys: NIST SP 800-38A F.2.1-F.2.6 and RFC 4231 cases 1-7.

PyKCS11 quirks met on the way (theirs, not the module's): 1.5.20's getMechanismList appends
0x1D (CKM_ML_DSA) to whatever the module returns; empty input is refused by PyKCS11 itself
(CKR_ARGUMENTS_BAD without calling the module); after CKR_BUFFER_TOO_SMALL its byte list keeps
the caller's size, and a CK_UNAVAILABLE_INFORMATION length reads as 0 (tests/module/test_module_*.py
check those lengths through ctypes).
"""

from __future__ import annotations

import os
import sys
import uuid

import PyKCS11
import pytest
from cryptography.hazmat.primitives import serialization
from PyKCS11 import LowLevel, Mechanism, PyKCS11Error, ckbytelist

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.certs import self_signed_cert
from tests.support.known_answers import CBC_IV, CBC_PLAINTEXT, CBC_VECTORS, HMAC_VECTORS

T, F = PyKCS11.CK_TRUE, PyKCS11.CK_FALSE
BASE = [(C.CKA_TOKEN, T), (C.CKA_PRIVATE, T)]
HMAC_KT = {256: C.CKK_SHA256_HMAC, 384: C.CKK_SHA384_HMAC, 512: C.CKK_SHA512_HMAC}
HMAC_M = {256: C.CKM_SHA256_HMAC, 384: C.CKM_SHA384_HMAC, 512: C.CKM_SHA512_HMAC}
HMAC_G = {
    256: C.CKM_SHA256_HMAC_GENERAL,
    384: C.CKM_SHA384_HMAC_GENERAL,
    512: C.CKM_SHA512_HMAC_GENERAL,
}
KEY_GEN = {256: C.CKM_SHA256_KEY_GEN, 384: C.CKM_SHA384_KEY_GEN, 512: C.CKM_SHA512_KEY_GEN}
# The WSOP guide's table 6.3 (functions) with the key sizes in bytes.
WSOP = [
    ("CKM_AES_CBC", {"CKF_ENCRYPT", "CKF_DECRYPT"}, 16, 32),
    ("CKM_AES_CBC_PAD", {"CKF_ENCRYPT", "CKF_DECRYPT"}, 16, 32),
    ("CKM_AES_KEY_GEN", {"CKF_GENERATE"}, 16, 32),
    ("CKM_SHA256_HMAC", {"CKF_SIGN", "CKF_VERIFY"}, 1, 1024),
    ("CKM_SHA256_HMAC_GENERAL", {"CKF_SIGN", "CKF_VERIFY"}, 1, 1024),
    ("CKM_SHA384_HMAC", {"CKF_SIGN", "CKF_VERIFY"}, 1, 1024),
    ("CKM_SHA384_HMAC_GENERAL", {"CKF_SIGN", "CKF_VERIFY"}, 1, 1024),
    ("CKM_SHA512_HMAC", {"CKF_SIGN", "CKF_VERIFY"}, 1, 1024),
    ("CKM_SHA512_HMAC_GENERAL", {"CKF_SIGN", "CKF_VERIFY"}, 1, 1024),
    ("CKM_SHA256_KEY_GEN", {"CKF_GENERATE"}, 1, 1024),
    ("CKM_SHA384_KEY_GEN", {"CKF_GENERATE"}, 1, 1024),
    ("CKM_SHA512_KEY_GEN", {"CKF_GENERATE"}, 1, 1024),
    ("CKM_GENERIC_SECRET_KEY_GEN", {"CKF_GENERATE"}, 1, 1024),
]


def ulong(v: int) -> bytes:
    return v.to_bytes(8, sys.byteorder)


def rv_of(call) -> int:
    """The CKR a PyKCS11 high-level call raised (CKR_OK if none)."""
    try:
        call()
    except PyKCS11Error as e:
        return int(e.value)
    return C.CKR_OK


@pytest.fixture(scope="module")
def p11(service):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        lib = PyKCS11.PyKCS11Lib()
        lib.load(module_path())  # C_GetFunctionList, C_Initialize(CKF_OS_LOCKING_OK)
        yield lib
        lib.unload()  # C_Finalize


@pytest.fixture
def pykcs11_card(p11, service) -> tuple[int, str]:
    """A fresh softcard: (slot, passphrase)."""
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "pk" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    for slot in p11.getSlotList(tokenPresent=True):
        if p11.getTokenInfo(slot).label.strip() == name:
            return slot, pin
    raise LookupError(name)


@pytest.fixture
def se(p11, pykcs11_card):
    slot, pin = pykcs11_card
    s = p11.openSession(slot, PyKCS11.CKF_RW_SESSION)
    s.login(pin)
    yield s
    p11.closeAllSessions(slot)


def import_aes(se, value: bytes, *extra):
    """An imported AES key; extra (attribute, value) pairs replace the defaults."""
    items = dict(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_ENCRYPT, T),
            (C.CKA_DECRYPT, T),
            (C.CKA_LABEL, "aes"),
            (C.CKA_VALUE, value),
            *extra,
        ]
    )
    return se.createObject(list(items.items()))


def import_mac(se, key_type: int, value: bytes):
    return se.createObject(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, key_type),
            (C.CKA_SIGN, T),
            (C.CKA_VERIFY, T),
            (C.CKA_LABEL, "mac"),
            (C.CKA_VALUE, value),
        ]
    )


def cbc(iv: bytes, pad: bool = False) -> Mechanism:
    return Mechanism(C.CKM_AES_CBC_PAD if pad else C.CKM_AES_CBC, iv)


# ---- general, slots, tokens, mechanisms ------------------------------------------------------


def test_info_slots_and_tokens(p11, pykcs11_card):
    slot, _ = pykcs11_card
    info = p11.getInfo()
    assert info.cryptokiVersion == (2, 40)
    assert info.manufacturerID.strip() == "pkcs11ws"
    assert info.libraryDescription.strip() == "pkcs11ws WSOP-compatible"
    assert slot in p11.getSlotList(tokenPresent=True)
    sinfo = p11.getSlotInfo(slot)
    assert {"CKF_TOKEN_PRESENT", "CKF_REMOVABLE_DEVICE"} <= set(sinfo.flags2text())
    tinfo = p11.getTokenInfo(slot)
    assert tinfo.model.strip() == "WSOP softcard" and len(tinfo.serialNumber.strip()) == 16
    assert set(tinfo.flags2text()) == {
        "CKF_RNG",
        "CKF_LOGIN_REQUIRED",
        "CKF_USER_PIN_INITIALIZED",
        "CKF_TOKEN_INITIALIZED",
    }
    assert (tinfo.ulMinPinLen, tinfo.ulMaxPinLen, tinfo.ulSessionCount) == (1, 256, 0)
    assert rv_of(lambda: p11.getTokenInfo(999999)) == C.CKR_SLOT_ID_INVALID


def test_mechanisms(p11, pykcs11_card):
    slot, _ = pykcs11_card
    from pkcs11ws import mechanisms

    # The table's order; PyKCS11 names the codes it knows (CKM_EC_KEY_PAIR_GEN as ECDSA's).
    names = [PyKCS11.CKM[n] for n in p11.getMechanismList(slot)]
    table = [m.code for m in mechanisms.MECHANISMS]
    assert names[: len(table)] == table
    assert len(names) - len(table) in (0, 1)  # PyKCS11 1.5.20 appends CKM_ML_DSA (0x1D) itself
    for name, ops, lo, hi in WSOP:
        info = p11.getMechanismInfo(slot, name)
        assert set(info.flags2text()) == ops, name
        assert (info.ulMinKeySize, info.ulMaxKeySize) == (lo, hi), name
    assert rv_of(lambda: p11.getMechanismInfo(slot, "CKM_AES_ECB")) == C.CKR_MECHANISM_INVALID


# ---- sessions and login ----------------------------------------------------------------------


def test_sessions_login_logout(p11, pykcs11_card):
    slot, pin = pykcs11_card
    ro = p11.openSession(slot)
    rw = p11.openSession(slot, PyKCS11.CKF_RW_SESSION)
    assert ro.getSessionInfo().state == C.CKS_RO_PUBLIC_SESSION
    assert rw.getSessionInfo().state == C.CKS_RW_PUBLIC_SESSION
    assert rw.getSessionInfo().slotID == slot
    tinfo = p11.getTokenInfo(slot)
    assert (tinfo.ulSessionCount, tinfo.ulRwSessionCount) == (2, 1)
    assert rv_of(rw.logout) == C.CKR_USER_NOT_LOGGED_IN
    assert rv_of(lambda: rw.login("not-" + pin)) == C.CKR_PIN_INCORRECT
    assert rv_of(lambda: rw.login(pin, user_type=PyKCS11.CKU_SO)) == C.CKR_USER_TYPE_INVALID
    rw.login(pin)
    assert ro.getSessionInfo().state == C.CKS_RO_USER_FUNCTIONS
    assert rw.getSessionInfo().state == C.CKS_RW_USER_FUNCTIONS
    assert rv_of(lambda: ro.login(pin)) == C.CKR_USER_ALREADY_LOGGED_IN
    ro.logout()
    assert rw.getSessionInfo().state == C.CKS_RW_PUBLIC_SESSION
    assert rv_of(ro.logout) == C.CKR_USER_NOT_LOGGED_IN
    ro.closeSession()
    assert rv_of(ro.getSessionInfo) == C.CKR_SESSION_HANDLE_INVALID
    rw.login(pin)
    other = p11.openSession(slot)
    p11.closeAllSessions(slot)
    for s in (rw, other):
        assert rv_of(s.getSessionInfo) == C.CKR_SESSION_HANDLE_INVALID
    assert p11.getTokenInfo(slot).ulSessionCount == 0
    # The last session closed: the token is logged out.
    s = p11.openSession(slot)
    assert s.getSessionInfo().state == C.CKS_RO_PUBLIC_SESSION
    assert s.findObjects() == []
    s.closeSession()


# ---- keys ------------------------------------------------------------------------------------


def key_attrs(se, key, *types):
    return se.getAttributeValue(key, list(types))


@pytest.mark.parametrize("size", [16, 24, 32])
def test_generate_aes(se, size):
    key = se.generateKey(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_VALUE_LEN, size),
            (C.CKA_ENCRYPT, T),
            (C.CKA_DECRYPT, T),
            (C.CKA_LABEL, f"aes{size}"),
            (C.CKA_ID, b"\x07"),
        ],
        Mechanism(C.CKM_AES_KEY_GEN),
    )
    got = key_attrs(
        se,
        key,
        C.CKA_CLASS,
        C.CKA_KEY_TYPE,
        C.CKA_VALUE_LEN,
        C.CKA_LABEL,
        C.CKA_ID,
        C.CKA_KEY_GEN_MECHANISM,
        C.CKA_LOCAL,
        C.CKA_SENSITIVE,
        C.CKA_EXTRACTABLE,
        C.CKA_NEVER_EXTRACTABLE,
        C.CKA_ALWAYS_SENSITIVE,
        C.CKA_TOKEN,
        C.CKA_PRIVATE,
        C.CKA_VALUE,
    )
    assert got == [
        C.CKO_SECRET_KEY,
        C.CKK_AES,
        size,
        f"aes{size}",
        (7,),
        C.CKM_AES_KEY_GEN,
        True,
        True,
        False,
        True,
        True,
        True,
        True,
        None,
    ]
    iv = os.urandom(16)
    data = os.urandom(100)
    ct = bytes(se.encrypt(key, data, cbc(iv, pad=True)))
    assert len(ct) == 112
    assert bytes(se.decrypt(key, ct, cbc(iv, pad=True))) == data


@pytest.mark.parametrize("bits", [256, 384, 512])
def test_generate_hmac(se, bits):
    key = se.generateKey(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_VALUE_LEN, bits // 8),
            (C.CKA_SIGN, T),
            (C.CKA_VERIFY, T),
            (C.CKA_LABEL, "h"),
        ],
        Mechanism(KEY_GEN[bits]),
    )
    assert key_attrs(se, key, C.CKA_KEY_TYPE, C.CKA_KEY_GEN_MECHANISM, C.CKA_VALUE_LEN) == [
        HMAC_KT[bits],
        KEY_GEN[bits],
        bits // 8,
    ]
    mac = bytes(se.sign(key, b"data", Mechanism(HMAC_M[bits])))
    assert len(mac) == bits // 8
    assert se.verify(key, b"data", mac, Mechanism(HMAC_M[bits]))
    half = Mechanism(HMAC_G[bits], ulong(bits // 16))
    assert bytes(se.sign(key, b"data", half)) == mac[: bits // 16]
    assert se.verify(key, b"data", mac[: bits // 16], half)


def test_generate_generic_secret(se):
    key = se.generateKey(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_VALUE_LEN, 20),
            (C.CKA_SIGN, T),
            (C.CKA_VERIFY, T),
        ],
        Mechanism(C.CKM_GENERIC_SECRET_KEY_GEN),
    )
    assert key_attrs(se, key, C.CKA_KEY_TYPE) == [C.CKK_GENERIC_SECRET]
    for bits, m in HMAC_M.items():
        mac = se.sign(key, b"x", Mechanism(m))
        assert len(mac) == bits // 8 and se.verify(key, b"x", mac, Mechanism(m))


@pytest.mark.parametrize("vector", CBC_VECTORS, ids=lambda v: v.name)
def test_nist_sp800_38a_cbc(se, vector):
    key = import_aes(se, vector.key)
    assert key_attrs(se, key, C.CKA_VALUE_LEN, C.CKA_LOCAL) == [len(vector.key), False]
    assert bytes(se.encrypt(key, CBC_PLAINTEXT, cbc(CBC_IV))) == vector.ciphertext
    assert bytes(se.decrypt(key, vector.ciphertext, cbc(CBC_IV))) == CBC_PLAINTEXT
    # Multi-part, in uneven parts. (Each part must complete a block: for an update with no
    # output PyKCS11 makes both of its calls with a NULL buffer, i.e. two length queries.)
    se.encryptInit(cbc(CBC_IV), key)
    out = b"".join(
        bytes(se.encryptUpdate(CBC_PLAINTEXT[a:b])) for a, b in ((0, 17), (17, 40), (40, 64))
    )
    assert out + bytes(se.encryptFinal()) == vector.ciphertext
    se.decryptInit(cbc(CBC_IV, pad=True), key)
    padded = bytes(se.encrypt(key, CBC_PLAINTEXT, cbc(CBC_IV, pad=True)))
    assert padded[:64] == vector.ciphertext and len(padded) == 80
    out = bytes(se.decryptUpdate(padded[:40])) + bytes(se.decryptUpdate(padded[40:]))
    assert out + bytes(se.decryptFinal()) == CBC_PLAINTEXT


@pytest.mark.parametrize("bits", [256, 384, 512])
def test_rfc4231_hmac(se, bits):
    for v in HMAC_VECTORS:
        key = import_mac(se, HMAC_KT[bits], v.key)
        want = v.mac(bits)
        if v.truncated:
            general = Mechanism(HMAC_G[bits], ulong(16))
            if bits == 256:
                assert bytes(se.sign(key, v.data, general)) == want
                assert se.verify(key, v.data, want, general)
            else:  # 16 bytes is under half of SHA-384/512
                assert rv_of(lambda: se.sign(key, v.data, general)) == (  # noqa: B023
                    C.CKR_MECHANISM_PARAM_INVALID
                )
            assert bytes(se.sign(key, v.data, Mechanism(HMAC_M[bits])))[:16] == want
        else:
            assert bytes(se.sign(key, v.data, Mechanism(HMAC_M[bits]))) == want, v.case
            assert se.verify(key, v.data, want, Mechanism(HMAC_M[bits]))
            assert not se.verify(key, v.data, want[:-1] + b"\0", Mechanism(HMAC_M[bits]))
        se.destroyObject(key)


# ---- data objects and certificates -----------------------------------------------------------


def test_data_and_certificate_objects(se):
    data = se.createObject(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_DATA),
            (C.CKA_LABEL, "d1"),
            (C.CKA_APPLICATION, "app"),
            (C.CKA_VALUE, b"\x00value\xff"),
        ]
    )
    cert, _ = self_signed_cert("pykcs11 test", serial=12345)
    der = cert.public_bytes(serialization.Encoding.DER)
    c = se.createObject(
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_CERTIFICATE),
            (C.CKA_CERTIFICATE_TYPE, C.CKC_X_509),
            (C.CKA_VALUE, der),
            (C.CKA_SUBJECT, cert.subject.public_bytes()),
            (C.CKA_ISSUER, cert.issuer.public_bytes()),
            (C.CKA_SERIAL_NUMBER, b"\x02\x02\x30\x39"),
            (C.CKA_LABEL, "c1"),
            (C.CKA_START_DATE, b"20250101"),
            (C.CKA_END_DATE, b"20351231"),
        ]
    )
    assert bytes(se.getAttributeValue(data, [C.CKA_VALUE])[0]) == b"\x00value\xff"
    assert se.getAttributeValue(data, [C.CKA_APPLICATION, C.CKA_CLASS]) == ["app", C.CKO_DATA]
    got = se.getAttributeValue(
        c,
        [C.CKA_VALUE, C.CKA_SUBJECT, C.CKA_CERTIFICATE_TYPE, C.CKA_PRIVATE, C.CKA_TOKEN],
        allAsBinary=True,
    )
    assert bytes(got[0]) == der and bytes(got[1]) == cert.subject.public_bytes()
    assert bytes(got[2]) == ulong(C.CKC_X_509) and bytes(got[3]) == bytes(got[4]) == b"\x01"
    assert se.getAttributeValue(c, [C.CKA_START_DATE, C.CKA_END_DATE], allAsBinary=True) == [
        (50, 48, 50, 53, 48, 49, 48, 49),
        (50, 48, 51, 53, 49, 50, 51, 49),
    ]
    assert [h.value() for h in se.findObjects([(C.CKA_CLASS, C.CKO_CERTIFICATE)])] == [c.value()]
    assert [h.value() for h in se.findObjects([(C.CKA_APPLICATION, "app")])] == [data.value()]
    assert sorted(h.value() for h in se.findObjects()) == sorted([data.value(), c.value()])
    se.destroyObject(data)
    assert rv_of(lambda: se.destroyObject(data)) == C.CKR_OBJECT_HANDLE_INVALID
    assert rv_of(lambda: se.getAttributeValue(data, [C.CKA_LABEL])) == (C.CKR_OBJECT_HANDLE_INVALID)
    assert [h.value() for h in se.findObjects()] == [c.value()]


# ---- the WSOP attribute rules ----------------------------------------------------------------

# CKA_COPYABLE is on the WSOP list but this module copies: it may be given either way.
MUST_BE_FALSE = (
    C.CKA_DERIVE,
    C.CKA_EXTRACTABLE,
    C.CKA_TRUSTED,
    C.CKA_UNWRAP,
    C.CKA_WRAP,
    C.CKA_WRAP_WITH_TRUSTED,
)
MUST_BE_TRUE = (C.CKA_ALWAYS_SENSITIVE, C.CKA_NEVER_EXTRACTABLE, C.CKA_LOCAL, C.CKA_SENSITIVE)
IMPORTED_FALSE = (C.CKA_ALWAYS_SENSITIVE, C.CKA_NEVER_EXTRACTABLE, C.CKA_LOCAL)


def test_attribute_rules(se):
    aes = [(C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_VALUE_LEN, 16), (C.CKA_ENCRYPT, T)]
    gen = Mechanism(C.CKM_AES_KEY_GEN)

    def generate(*items) -> int:
        return rv_of(lambda: se.generateKey(list(items), gen))

    def create(*items) -> int:
        return rv_of(lambda: se.createObject(list(items)))

    for attr in MUST_BE_FALSE:
        assert generate(*BASE, *aes, (attr, T)) == C.CKR_TEMPLATE_INCONSISTENT, attr
        assert create(*BASE, (C.CKA_CLASS, C.CKO_DATA), (attr, T)) == (
            C.CKR_TEMPLATE_INCONSISTENT
        ), attr
        assert generate(*BASE, *aes, (attr, F)) == C.CKR_OK, attr
    for attr in MUST_BE_TRUE:
        assert generate(*BASE, *aes, (attr, F)) == C.CKR_TEMPLATE_INCONSISTENT, attr
        # An imported key was known outside: never always sensitive, never local.
        wrong = T if attr in IMPORTED_FALSE else F
        assert (
            create(
                *BASE,
                (C.CKA_CLASS, C.CKO_SECRET_KEY),
                (C.CKA_KEY_TYPE, C.CKK_AES),
                (C.CKA_VALUE, bytes(16)),
                (attr, wrong),
            )
            == C.CKR_TEMPLATE_INCONSISTENT
        )
        assert generate(*BASE, *aes, (attr, T)) == C.CKR_OK, attr
    for missing in (C.CKA_TOKEN, C.CKA_PRIVATE):
        rest = [a for a in BASE if a[0] != missing]
        assert generate(*rest, *aes) == C.CKR_TEMPLATE_INCOMPLETE
        assert create(*rest, (C.CKA_CLASS, C.CKO_DATA)) == C.CKR_TEMPLATE_INCOMPLETE
        assert generate(*rest, (missing, F), *aes) == C.CKR_TEMPLATE_INCONSISTENT
        assert create(*rest, (missing, F), (C.CKA_CLASS, C.CKO_DATA)) == (
            C.CKR_TEMPLATE_INCONSISTENT
        )
    assert (
        create(
            *BASE,
            (C.CKA_CLASS, C.CKO_CERTIFICATE),
            (C.CKA_CERTIFICATE_TYPE, 1),
            (C.CKA_VALUE, b"x"),
            (C.CKA_SUBJECT, b"y"),
        )
        == C.CKR_ATTRIBUTE_VALUE_INVALID
    )
    # A private key without its type and components (imports are tested in
    # test_consumer_pykcs11_asym.py).
    assert create(*BASE, (C.CKA_CLASS, C.CKO_PRIVATE_KEY)) == C.CKR_TEMPLATE_INCOMPLETE
    assert generate(*BASE, (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_VALUE_LEN, 20)) == (
        C.CKR_KEY_SIZE_RANGE
    )
    assert len(se.findObjects()) == len(MUST_BE_FALSE) + len(MUST_BE_TRUE)  # the accepted ones


# ---- error codes through the raw calls -------------------------------------------------------


def sign_call(se, data: bytes, size: int) -> tuple[int, bytes]:
    out = ckbytelist([0] * size) if size else ckbytelist()
    rv = se.lib.C_Sign(se.session, ckbytelist(data), out)
    return rv, bytes(out)


def test_operation_states_and_buffer_rules(se):
    key = import_mac(se, C.CKK_SHA256_HMAC, HMAC_VECTORS[0].key)
    want = HMAC_VECTORS[0].sha256
    m = Mechanism(C.CKM_SHA256_HMAC).to_native()
    assert se.lib.C_SignInit(se.session, m, key) == C.CKR_OK
    assert se.lib.C_SignInit(se.session, m, key) == C.CKR_OPERATION_ACTIVE
    assert sign_call(se, HMAC_VECTORS[0].data, 16)[0] == C.CKR_BUFFER_TOO_SMALL
    rv, length = sign_call(se, HMAC_VECTORS[0].data, 0)  # the length query
    assert (rv, len(length)) == (C.CKR_OK, 32)
    assert sign_call(se, HMAC_VECTORS[0].data, 32) == (C.CKR_OK, want)  # still active until now
    assert sign_call(se, b"x", 32)[0] == C.CKR_OPERATION_NOT_INITIALIZED
    # An error in C_Sign ends the operation.
    assert se.lib.C_SignInit(se.session, m, key) == C.CKR_OK
    se.destroyObject(key)
    assert sign_call(se, b"x", 32)[0] == C.CKR_KEY_HANDLE_INVALID
    assert sign_call(se, b"x", 32)[0] == C.CKR_OPERATION_NOT_INITIALIZED
    assert se.lib.C_SignInit(se.session, m, key) == C.CKR_KEY_HANDLE_INVALID
    # ... and in C_Encrypt.
    aes = import_aes(se, bytes(16))
    cm = cbc(bytes(16)).to_native()
    assert se.lib.C_EncryptInit(se.session, cm, aes) == C.CKR_OK
    assert se.lib.C_EncryptInit(se.session, cm, aes) == C.CKR_OPERATION_ACTIVE
    out = ckbytelist([0] * 32)
    assert se.lib.C_Encrypt(se.session, ckbytelist(b"x" * 15), out) == C.CKR_DATA_LEN_RANGE
    assert se.lib.C_Encrypt(se.session, ckbytelist(b"x" * 16), out) == (
        C.CKR_OPERATION_NOT_INITIALIZED
    )
    # A search is an operation too.
    t = LowLevel.ckattrlist(0)
    assert se.lib.C_FindObjectsInit(se.session, t) == C.CKR_OK
    assert se.lib.C_FindObjectsInit(se.session, t) == C.CKR_OPERATION_ACTIVE
    assert se.lib.C_FindObjectsFinal(se.session) == C.CKR_OK


def test_cipher_and_mac_error_codes(se):
    key = import_aes(se, os.urandom(32))
    iv = os.urandom(16)
    assert rv_of(lambda: se.encrypt(key, b"x" * 17, cbc(iv))) == C.CKR_DATA_LEN_RANGE
    assert rv_of(lambda: se.decrypt(key, b"x" * 20, cbc(iv))) == C.CKR_ENCRYPTED_DATA_LEN_RANGE
    zero_last = bytes(se.encrypt(key, bytes(32), cbc(iv)))  # decrypts to ...00: bad padding
    assert rv_of(lambda: se.decrypt(key, zero_last, cbc(iv, pad=True))) == (
        C.CKR_ENCRYPTED_DATA_INVALID
    )
    for bad in (None, b"", b"1234567890", bytes(32)):
        assert rv_of(lambda: se.encrypt(key, bytes(16), Mechanism(C.CKM_AES_CBC, bad))) == (  # noqa: B023
            C.CKR_MECHANISM_PARAM_INVALID
        ), bad
    assert rv_of(lambda: se.encrypt(key, bytes(16), Mechanism(PyKCS11.CKM_AES_ECB))) == (
        C.CKR_MECHANISM_INVALID
    )
    mac = import_mac(se, C.CKK_SHA384_HMAC, os.urandom(48))
    m = Mechanism(C.CKM_SHA384_HMAC)
    sig = bytes(se.sign(mac, b"data", m))
    assert se.verify(mac, b"data", sig, m) is True
    assert se.verify(mac, b"data", bytes([sig[0] ^ 1]) + sig[1:], m) is False  # SIGNATURE_INVALID
    assert rv_of(lambda: se.verify(mac, b"data", sig[:-1], m)) == C.CKR_SIGNATURE_LEN_RANGE
    assert rv_of(lambda: se.verify(mac, b"data", sig + b"\0", m)) == C.CKR_SIGNATURE_LEN_RANGE
    g = Mechanism(C.CKM_SHA384_HMAC_GENERAL, ulong(30))
    assert rv_of(lambda: se.verify(mac, b"data", sig[:24], g)) == C.CKR_SIGNATURE_LEN_RANGE
    assert rv_of(lambda: se.sign(mac, b"data", Mechanism(C.CKM_SHA384_HMAC_GENERAL, b"\1"))) == (
        C.CKR_MECHANISM_PARAM_INVALID
    )
    assert rv_of(lambda: se.sign(mac, b"data", Mechanism(C.CKM_SHA256_HMAC))) == (
        C.CKR_KEY_TYPE_INCONSISTENT
    )
    assert rv_of(lambda: se.encrypt(mac, bytes(16), cbc(iv))) == C.CKR_KEY_TYPE_INCONSISTENT
    enc_only = import_aes(se, bytes(16), (C.CKA_DECRYPT, F))
    assert rv_of(lambda: se.decrypt(enc_only, bytes(16), cbc(iv))) == (
        C.CKR_KEY_FUNCTION_NOT_PERMITTED
    )


def test_handle_and_login_error_codes(p11, pykcs11_card):
    slot, pin = pykcs11_card
    s = p11.openSession(slot, PyKCS11.CKF_RW_SESSION)
    s.login(pin)
    key = import_aes(s, bytes(16))
    data = s.createObject([*BASE, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_VALUE, b"v")])
    # Sensitive: PyKCS11 asks again one by one and reports None (the module answered
    # CKR_ATTRIBUTE_SENSITIVE for CKA_VALUE and the rest of the template as usual).
    t = LowLevel.ckattrlist(2)
    t[0].SetType(C.CKA_VALUE)
    t[1].SetType(C.CKA_LABEL)
    assert s.lib.C_GetAttributeValue(s.session, key, t) == C.CKR_ATTRIBUTE_SENSITIVE
    assert t[1].GetLen() == 3
    assert s.getAttributeValue(key, [C.CKA_VALUE, C.CKA_LABEL]) == [None, "aes"]
    s.logout()
    cm = cbc(bytes(16)).to_native()
    assert s.lib.C_EncryptInit(s.session, cm, key) == C.CKR_USER_NOT_LOGGED_IN
    assert rv_of(lambda: s.getAttributeValue(data, [C.CKA_VALUE])) == (
        C.CKR_OBJECT_HANDLE_INVALID  # private objects are out of sight
    )
    assert rv_of(lambda: s.createObject([*BASE, (C.CKA_CLASS, C.CKO_DATA)])) == (
        C.CKR_USER_NOT_LOGGED_IN
    )
    s.login(pin)
    s.destroyObject(key)
    assert s.lib.C_EncryptInit(s.session, cm, key) == C.CKR_KEY_HANDLE_INVALID
    s.closeSession()
    assert rv_of(lambda: s.encrypt(key, bytes(16), cbc(bytes(16)))) == (
        C.CKR_SESSION_HANDLE_INVALID
    )
    assert rv_of(lambda: s.findObjects()) == C.CKR_SESSION_HANDLE_INVALID


def test_random(se):
    a, b = se.generateRandom(64), se.generateRandom(64)
    assert len(a) == len(b) == 64 and a != b
    assert rv_of(lambda: se.seedRandom(b"seed")) == C.CKR_RANDOM_SEED_NOT_SUPPORTED


def test_finalize_and_load_again(service, pykcs11_card):
    slot, pin = pykcs11_card
    other = PyKCS11.PyKCS11Lib()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        other.load(module_path())  # shares the loaded library with the fixture's instance
        s = other.openSession(slot, PyKCS11.CKF_RW_SESSION)
        s.login(pin)
        key = import_aes(s, CBC_VECTORS[0].key)
        s.logout()
        s.closeSession()
        assert other.lib.C_Finalize() == C.CKR_OK
        assert rv_of(other.getInfo) == C.CKR_CRYPTOKI_NOT_INITIALIZED
        assert other.lib.C_Initialize() == C.CKR_OK
        s = other.openSession(slot)
        s.login(pin)
        assert [h.value() for h in s.findObjects([(C.CKA_LABEL, "aes")])] == [key.value()]
        assert bytes(s.encrypt(key, CBC_PLAINTEXT, cbc(CBC_IV))) == CBC_VECTORS[0].ciphertext
        s.closeSession()
        other.unload()
