"""python-pkcs11 (PyPI `python-pkcs11`) as the consumer of libpkcs11ws.so, against the real key
service over mutual TLS.

python-pkcs11 loads the module in this process (the module attaches to this interpreter), calls
C_Initialize(NULL) (the configuration comes from $PKCS11WS_CONFIG), releases the GIL around its
calls and uses the two-call length convention for every output. Everything it exposes is
exercised: library/slot/token info, mechanisms, sessions and login, C_GenerateKey for every key
type, C_CreateObject (data objects, X.509 certificates, imported secret keys), attributes,
searching, destroying, single- and multi-part encrypt/decrypt/sign/verify, random, the WSOP
attribute rules and the error codes consumers rely on (interop.md). Known answers use imported
keys: NIST SP 800-38A F.2.1-F.2.6 (AES-CBC) and RFC 4231 cases 1-7 (HMAC-SHA-256/384/512).

python-pkcs11 has no names for CKM_SHA*_KEY_GEN (PKCS#11 3.0); they are passed as pseudo-members
of its Mechanism enum (`mech()` below). What it cannot show (C_GetSessionInfo,
C_CloseAllSessions, the BUFFER_TOO_SMALL length, the separate SIGNATURE_LEN_RANGE code) is
covered by tests/consumers/test_consumer_pykcs11.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import threading
import uuid

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as E
from pkcs11.util.x509 import decode_x509_certificate

from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.certs import self_signed_cert
from tests.support.known_answers import CBC_IV, CBC_PLAINTEXT, CBC_VECTORS, HMAC_VECTORS

ENC = MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
MAC = MechanismFlag.SIGN | MechanismFlag.VERIFY
HMAC_KEY_TYPES = {256: KeyType.SHA256_HMAC, 384: KeyType.SHA384_HMAC, 512: KeyType.SHA512_HMAC}


def mech(code: int, name: str) -> Mechanism:
    """A mechanism python-pkcs11's enum does not name, usable where it expects a Mechanism."""
    m = int.__new__(Mechanism, code)
    m._name_ = name
    m._value_ = code
    return m


KEY_GEN = {
    256: mech(0x4005, "SHA256_KEY_GEN"),
    384: mech(0x4006, "SHA384_KEY_GEN"),
    512: mech(0x4007, "SHA512_KEY_GEN"),
}
HMAC = {256: Mechanism.SHA256_HMAC, 384: Mechanism.SHA384_HMAC, 512: Mechanism.SHA512_HMAC}
HMAC_GENERAL = {
    256: Mechanism.SHA256_HMAC_GENERAL,
    384: Mechanism.SHA384_HMAC_GENERAL,
    512: Mechanism.SHA512_HMAC_GENERAL,
}
DIGEST = {256: hashlib.sha256, 384: hashlib.sha384, 512: hashlib.sha512}

# The WSOP guide's table 6.3: each mechanism's functions, and the key sizes `ckmechinfo` shows.
ENCDEC = MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
SIGVER = MechanismFlag.SIGN | MechanismFlag.VERIFY
GEN = MechanismFlag.GENERATE
WSOP_MECHANISMS = {
    Mechanism.AES_CBC: (ENCDEC, 16, 32),
    Mechanism.AES_CBC_PAD: (ENCDEC, 16, 32),
    Mechanism.AES_KEY_GEN: (GEN, 16, 32),
    **{HMAC[b]: (SIGVER, 1, 1024) for b in HMAC},
    **{HMAC_GENERAL[b]: (SIGVER, 1, 1024) for b in HMAC},
    **{KEY_GEN[b]: (GEN, 1, 1024) for b in KEY_GEN},
    Mechanism.GENERIC_SECRET_KEY_GEN: (GEN, 1, 1024),
}
OP_FLAGS = (
    MechanismFlag.ENCRYPT
    | MechanismFlag.DECRYPT
    | MechanismFlag.SIGN
    | MechanismFlag.VERIFY
    | MechanismFlag.GENERATE
    | MechanismFlag.WRAP
    | MechanismFlag.UNWRAP
    | MechanismFlag.DIGEST
    | MechanismFlag.DERIVE
    | MechanismFlag.SIGN_RECOVER
    | MechanismFlag.VERIFY_RECOVER
    | MechanismFlag.GENERATE_KEY_PAIR
)


def ulong(v: int) -> bytes:
    return v.to_bytes(8, sys.byteorder)


@pytest.fixture(scope="module")
def lib(service):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        lib = pkcs11.lib(module_path())  # C_Initialize(NULL)
        lib.reinitialize()  # another module's test may have left it initialised elsewhere
        yield lib
        lib.finalize()


@pytest.fixture
def token_card(lib, service) -> tuple[pkcs11.Token, str]:
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "pp" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    return lib.get_token(token_label=name), pin


@pytest.fixture
def session(token_card):
    token, pin = token_card
    with token.open(rw=True, user_pin=pin) as s:
        yield s


def aes_key(session, value: bytes, extra: dict | None = None):
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.LABEL: "imported-aes",
            Attribute.VALUE: value,
            **(extra or {}),
        }
    )


def hmac_key(session, key_type: KeyType, value: bytes):
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: key_type,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
            Attribute.LABEL: "imported-mac",
            Attribute.VALUE: value,
        }
    )


# ---- library, slots, tokens, mechanisms ------------------------------------------------------


def test_library_slot_and_token_info(lib, token_card):
    token, _ = token_card
    assert lib.manufacturer_id == "pkcs11ws"
    assert lib.library_description == "pkcs11ws WSOP-compatible"
    assert lib.cryptoki_version == (2, 40)
    slot = token.slot
    assert slot.slot_id in [s.slot_id for s in lib.get_slots(token_present=True)]
    assert token.label in slot.slot_description and slot.manufacturer_id == "pkcs11ws"
    assert slot.flags & pkcs11.SlotFlag.TOKEN_PRESENT
    assert token.manufacturer_id == "pkcs11ws" and token.model == "WSOP softcard"
    assert len(token.serial) == 16
    want = (
        pkcs11.TokenFlag.LOGIN_REQUIRED
        | pkcs11.TokenFlag.USER_PIN_INITIALIZED
        | pkcs11.TokenFlag.TOKEN_INITIALIZED
        | pkcs11.TokenFlag.RNG
    )
    assert token.flags == want


def test_mechanisms_as_the_wsop_guide_lists_them(token_card):
    slot = token_card[0].slot
    from pkcs11ws import mechanisms

    # python-pkcs11 has no names for the PKCS#11 3.0 SHA-2 key generation codes.
    codes = {getattr(m, "value", m) for m in slot.get_mechanisms()}
    assert codes == {m.code for m in mechanisms.MECHANISMS}
    for m, (ops, lo, hi) in WSOP_MECHANISMS.items():
        info = slot.get_mechanism_info(m)
        assert info.flags & OP_FLAGS == ops, m
        assert (info.min_key_length, info.max_key_length) == (lo, hi), m
    with pytest.raises(E.MechanismInvalid):
        slot.get_mechanism_info(Mechanism.AES_ECB)


# ---- sessions and login ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_login_logout_and_pin_errors(token_card):
    token, pin = token_card
    with pytest.raises(E.PinIncorrect):
        token.open(user_pin="not-" + pin)
    with pytest.raises(E.PinLenRange):
        token.open(user_pin="")
    public = token.open(rw=True)
    assert list(public.get_objects()) == []  # every object is private
    with pytest.raises(E.UserNotLoggedIn):
        public.generate_key(KeyType.AES, 128, store=True, capabilities=ENC)
    with token.open(rw=True, user_pin=pin) as user:
        key = user.generate_key(KeyType.AES, 128, label="k", store=True, capabilities=ENC)
        # The login belongs to the token: the public session sees the key now.
        assert [o.handle for o in public.get_objects()] == [key.handle]
        with pytest.raises(E.UserAlreadyLoggedIn):
            token.open(user_pin=pin)
    # Closing the logged-in session logged out (C_Logout) for every session of the token.
    assert list(public.get_objects()) == []
    with pytest.raises(E.UserNotLoggedIn):
        public.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.VALUE: b"v",
            }
        )
    ro = token.open(user_pin=pin)  # read-only: no object can be made (all are token objects)
    with pytest.raises(E.SessionReadOnly):
        ro.generate_key(KeyType.AES, 128, store=True, capabilities=ENC)
    assert [o.handle for o in ro.get_objects()] == [key.handle]
    ro.close()
    public.close()
    with pytest.raises(E.SessionHandleInvalid):
        list(public.get_objects())


# ---- key generation --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_generate_aes_keys(session, bits):
    key = session.generate_key(
        KeyType.AES, bits, id=b"\x01\x02", label=f"aes{bits}", store=True, capabilities=ENC
    )
    assert key.key_type == KeyType.AES and key.key_length == bits
    assert key.label == f"aes{bits}" and key.id == b"\x01\x02"
    assert key[Attribute.VALUE_LEN] == bits // 8
    for attr, want in (
        (Attribute.TOKEN, True),
        (Attribute.PRIVATE, True),
        (Attribute.LOCAL, True),
        (Attribute.SENSITIVE, True),
        (Attribute.ALWAYS_SENSITIVE, True),
        (Attribute.NEVER_EXTRACTABLE, True),
        (Attribute.EXTRACTABLE, False),
        (Attribute.ENCRYPT, True),
        (Attribute.DECRYPT, True),
        (Attribute.SIGN, False),
        (Attribute.WRAP, False),
        (Attribute.DERIVE, False),
    ):
        assert key[attr] is want, attr
    assert key[Attribute.KEY_GEN_MECHANISM] == Mechanism.AES_KEY_GEN
    with pytest.raises(E.AttributeSensitive):
        key[Attribute.VALUE]
    iv = os.urandom(16)
    for size in (0, 1, 16, 33, 1000):
        data = os.urandom(size)
        ct = key.encrypt(data, mechanism_param=iv)  # CKM_AES_CBC_PAD, single part
        assert len(ct) == size // 16 * 16 + 16
        assert key.decrypt(ct, mechanism_param=iv) == data
    data = os.urandom(96)
    ct = key.encrypt(data, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    assert len(ct) == 96
    chunks = [data[:5], data[5:40], data[40:]]  # multi-part: C_EncryptUpdate/C_EncryptFinal
    assert (
        b"".join(key.encrypt(iter(chunks), mechanism=Mechanism.AES_CBC, mechanism_param=iv)) == ct
    )
    assert (
        b"".join(
            key.decrypt(iter([ct[:17], ct[17:]]), mechanism=Mechanism.AES_CBC, mechanism_param=iv)
        )
        == data
    )


def test_generate_aes_key_size_out_of_range(session):
    with pytest.raises(E.KeySizeRange):
        session.generate_key(KeyType.AES, 160, store=True, capabilities=ENC)


@pytest.mark.parametrize("bits", [256, 384, 512])
def test_generate_hmac_keys(session, bits):
    key = session.generate_key(
        HMAC_KEY_TYPES[bits],
        bits,
        label=f"mac{bits}",
        store=True,
        capabilities=MAC,
        mechanism=KEY_GEN[bits],
    )
    # (CKA_KEY_GEN_MECHANISM is CKM_SHA*_KEY_GEN, which python-pkcs11 cannot decode: the
    # PyKCS11 suite reads it.)
    assert key.key_type == HMAC_KEY_TYPES[bits] and key[Attribute.VALUE_LEN] == bits // 8
    data = os.urandom(100)
    mac = key.sign(data, mechanism=HMAC[bits])
    assert len(mac) == bits // 8
    assert key.verify(data, mac, mechanism=HMAC[bits])
    assert not key.verify(data + b"!", mac, mechanism=HMAC[bits])
    # Multi-part gives the same MAC; _GENERAL gives its prefix, half to full length.
    assert key.sign(iter([data[:30], data[30:]]), mechanism=HMAC[bits]) == mac
    half = bits // 16
    short = key.sign(data, mechanism=HMAC_GENERAL[bits], mechanism_param=ulong(half))
    assert short == mac[:half]
    assert key.verify(data, short, mechanism=HMAC_GENERAL[bits], mechanism_param=ulong(half))
    for bad in (half - 1, bits // 8 + 1):
        with pytest.raises(E.MechanismParamInvalid):
            key.sign(data, mechanism=HMAC_GENERAL[bits], mechanism_param=ulong(bad))
    # An HMAC key of another hash does not fit this mechanism.
    other = 256 if bits != 256 else 384
    with pytest.raises(E.KeyTypeInconsistent):
        key.sign(data, mechanism=HMAC[other])


def test_generate_generic_secret_for_every_hmac(session):
    key = session.generate_key(
        KeyType.GENERIC_SECRET, 256, label="generic", store=True, capabilities=MAC
    )  # CKM_GENERIC_SECRET_KEY_GEN
    assert key.key_type == KeyType.GENERIC_SECRET
    for bits in HMAC:
        mac = key.sign(b"generic", mechanism=HMAC[bits])
        assert len(mac) == bits // 8 and key.verify(b"generic", mac, mechanism=HMAC[bits])


# ---- known answers with imported keys --------------------------------------------------------


@pytest.mark.parametrize("vector", CBC_VECTORS, ids=lambda v: v.name)
def test_nist_sp800_38a_cbc(session, vector):
    key = aes_key(session, vector.key)
    assert key.key_length == len(vector.key) * 8 and key[Attribute.LOCAL] is False
    ct = key.encrypt(CBC_PLAINTEXT, mechanism=Mechanism.AES_CBC, mechanism_param=CBC_IV)
    assert ct == vector.ciphertext  # F.2.1 / F.2.3 / F.2.5
    assert (
        key.decrypt(vector.ciphertext, mechanism=Mechanism.AES_CBC, mechanism_param=CBC_IV)
        == CBC_PLAINTEXT
    )  # F.2.2 / F.2.4 / F.2.6
    parts = key.encrypt(
        iter([CBC_PLAINTEXT[:7], CBC_PLAINTEXT[7:50], CBC_PLAINTEXT[50:]]),
        mechanism=Mechanism.AES_CBC,
        mechanism_param=CBC_IV,
    )
    assert b"".join(parts) == vector.ciphertext
    padded = key.encrypt(CBC_PLAINTEXT, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=CBC_IV)
    assert padded[:64] == vector.ciphertext and len(padded) == 80
    assert key.decrypt(padded, mechanism_param=CBC_IV) == CBC_PLAINTEXT


@pytest.mark.parametrize("bits", [256, 384, 512])
def test_rfc4231_hmac(session, bits):
    for v in HMAC_VECTORS:
        key = hmac_key(session, HMAC_KEY_TYPES[bits], v.key)
        want = v.mac(bits)
        if v.truncated:
            # Case 5 gives 128 bits: the _GENERAL mechanism makes it where 128 is at least half
            # the hash (SHA-256); otherwise it is the prefix of the full MAC.
            if bits == 256:
                got = key.sign(v.data, mechanism=HMAC_GENERAL[bits], mechanism_param=ulong(16))
                assert got == want
            else:
                with pytest.raises(E.MechanismParamInvalid):
                    key.sign(v.data, mechanism=HMAC_GENERAL[bits], mechanism_param=ulong(16))
            assert key.sign(v.data, mechanism=HMAC[bits])[:16] == want
            continue
        assert key.sign(v.data, mechanism=HMAC[bits]) == want, v.case
        assert key.verify(v.data, want, mechanism=HMAC[bits])
        bad = bytes([want[0] ^ 0x80]) + want[1:]
        assert not key.verify(v.data, bad, mechanism=HMAC[bits])  # CKR_SIGNATURE_INVALID
        assert not key.verify(v.data, want[:-1], mechanism=HMAC[bits])  # SIGNATURE_LEN_RANGE
        chunks = iter([v.data[:3], v.data[3:]])
        assert key.sign(chunks, mechanism=HMAC[bits]) == want
        key.destroy()


def test_imported_generic_secret_known_answer(session):
    v = HMAC_VECTORS[1]
    key = hmac_key(session, KeyType.GENERIC_SECRET, v.key)
    for bits in HMAC:
        assert key.sign(v.data, mechanism=HMAC[bits]) == v.mac(bits)


# ---- data objects and certificates -----------------------------------------------------------


def test_data_objects(session):
    value = b"<config> & \x00\x01\xff"
    oid = bytes.fromhex("06082b06010401823702")  # a DER OBJECT IDENTIFIER
    obj = session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: "config",
            Attribute.APPLICATION: "pkcs11ws-tests",
            Attribute.OBJECT_ID: oid,
            Attribute.VALUE: value,
        }
    )
    empty = session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: "empty",
            Attribute.VALUE: b"",
        }
    )
    assert obj[Attribute.VALUE] == value and obj[Attribute.OBJECT_ID] == oid
    assert obj[Attribute.APPLICATION] == "pkcs11ws-tests" and obj[Attribute.LABEL] == "config"
    assert obj[Attribute.TOKEN] is True and obj[Attribute.PRIVATE] is True
    assert empty[Attribute.VALUE] == b""
    found = session.get_objects({Attribute.CLASS: ObjectClass.DATA})
    assert sorted(o.handle for o in found) == sorted([obj.handle, empty.handle])
    found = list(session.get_objects({Attribute.APPLICATION: "pkcs11ws-tests"}))
    assert [o.handle for o in found] == [obj.handle]
    assert list(session.get_objects({Attribute.LABEL: "nothing"})) == []
    obj.destroy()
    with pytest.raises(E.ObjectHandleInvalid):
        obj[Attribute.VALUE]
    with pytest.raises(E.ObjectHandleInvalid):
        obj.destroy()
    assert [o.handle for o in session.get_objects({Attribute.CLASS: ObjectClass.DATA})] == [
        empty.handle
    ]


def self_signed() -> bytes:
    cert, _ = self_signed_cert("pkcs11ws test", days=30, ski=True)
    return cert.public_bytes(serialization.Encoding.DER)


def test_private_x509_certificate(session):
    der = self_signed()
    # (python-pkcs11 crashes encoding a None value: drop the absent issuer key hash.)
    attrs = {
        k: v for k, v in decode_x509_certificate(der, extended_set=True).items() if v is not None
    }
    attrs.update(
        {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: "cert",
            Attribute.ID: b"\x42",
        }
    )
    # The extended set names CKA_HASH_OF_SUBJECT_PUBLIC_KEY, which WSOP does not support.
    with pytest.raises(E.AttributeTypeInvalid):
        session.create_object(attrs)
    del attrs[Attribute.HASH_OF_SUBJECT_PUBLIC_KEY]
    cert = session.create_object(attrs)
    for attr in (
        Attribute.VALUE,
        Attribute.SUBJECT,
        Attribute.ISSUER,
        Attribute.SERIAL_NUMBER,
        Attribute.START_DATE,
        Attribute.END_DATE,
        Attribute.LABEL,
        Attribute.ID,
    ):
        assert cert[attr] == attrs[attr], attr
    assert cert[Attribute.CERTIFICATE_TYPE] == pkcs11.CertificateType.X_509
    assert cert[Attribute.PRIVATE] is True
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}))
    assert [o.handle for o in found] == [cert.handle]
    missing = {k: v for k, v in attrs.items() if k != Attribute.SUBJECT}
    with pytest.raises(E.TemplateIncomplete):
        session.create_object(missing)
    cert.destroy()
    assert list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})) == []


# ---- the WSOP attribute rules ----------------------------------------------------------------

# CKA_COPYABLE is on the WSOP list but this module copies: it may be given either way.
MUST_BE_FALSE = (
    Attribute.DERIVE,
    Attribute.EXTRACTABLE,
    Attribute.TRUSTED,
    Attribute.UNWRAP,
    Attribute.WRAP,
    Attribute.WRAP_WITH_TRUSTED,
)
MUST_BE_TRUE = (
    Attribute.ALWAYS_SENSITIVE,
    Attribute.NEVER_EXTRACTABLE,
    Attribute.LOCAL,
    Attribute.SENSITIVE,
)


def test_attribute_rules(session):
    gen = {"label": "rule", "store": True, "capabilities": ENC}
    for attr in MUST_BE_FALSE:
        with pytest.raises(E.TemplateInconsistent):
            session.generate_key(KeyType.AES, 128, template={attr: True}, **gen)
        with pytest.raises(E.TemplateInconsistent):
            aes_key(session, bytes(16), {attr: True})
        # ... and false is accepted.
        session.generate_key(KeyType.AES, 128, template={attr: False}, **gen).destroy()
    for attr in MUST_BE_TRUE:
        with pytest.raises(E.TemplateInconsistent):
            session.generate_key(KeyType.AES, 128, template={attr: False}, **gen)
        session.generate_key(KeyType.AES, 128, template={attr: True}, **gen).destroy()
    with pytest.raises(E.TemplateInconsistent):
        session.generate_key(KeyType.AES, 128, label="session", store=False, capabilities=ENC)
    with pytest.raises(E.TemplateInconsistent):
        session.generate_key(KeyType.AES, 128, template={Attribute.PRIVATE: False}, **gen)
    data = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.VALUE: b"v",
    }
    for attr in (Attribute.TOKEN, Attribute.PRIVATE):
        with pytest.raises(E.TemplateIncomplete):
            session.create_object({k: v for k, v in data.items() if k != attr})
        with pytest.raises(E.TemplateInconsistent):
            session.create_object({**data, attr: False})
    cert = decode_x509_certificate(self_signed())
    # A certificate may leave CKA_PRIVATE out (Java's KeyStore does): it is then private.
    made = session.create_object({**cert, Attribute.TOKEN: True})
    assert made[Attribute.PRIVATE] is True
    made.destroy()
    with pytest.raises(E.TemplateIncomplete):
        session.create_object({**cert, Attribute.PRIVATE: True})  # no CKA_TOKEN
    with pytest.raises(E.TemplateInconsistent):
        session.create_object({**cert, Attribute.PRIVATE: True, Attribute.TOKEN: False})
    # Not one of those templates made an object.
    assert list(session.get_objects()) == []


# ---- error codes -----------------------------------------------------------------------------


def test_cipher_error_codes(session):
    key = aes_key(session, os.urandom(32))
    iv = os.urandom(16)
    with pytest.raises(E.DataLenRange):
        key.encrypt(b"x" * 15, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    with pytest.raises(E.EncryptedDataLenRange):
        key.decrypt(b"x" * 17, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    with pytest.raises(E.EncryptedDataLenRange):
        key.decrypt(b"", mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
    # A block that decrypts to a last byte of 0: never valid PKCS#7 padding.
    block = key.encrypt(bytes(16), mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    with pytest.raises(E.EncryptedDataInvalid):
        key.decrypt(block, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
    for bad_iv in (None, b"short", bytes(17)):
        with pytest.raises(E.MechanismParamInvalid):
            key.encrypt(bytes(16), mechanism=Mechanism.AES_CBC, mechanism_param=bad_iv)
    with pytest.raises(E.MechanismInvalid):
        key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
    signing_aes = aes_key(session, os.urandom(16), {Attribute.SIGN: True})
    with pytest.raises(E.KeyTypeInconsistent):
        signing_aes.sign(b"x", mechanism=Mechanism.SHA256_HMAC)
    # Each error above ended its operation: a new one starts without CKR_OPERATION_ACTIVE.
    assert key.encrypt(bytes(16), mechanism=Mechanism.AES_CBC, mechanism_param=iv) == block


def test_operation_active_and_errors_end_operations(session):
    key = aes_key(session, os.urandom(16))
    iv = bytes(16)
    running = key.encrypt(
        iter([bytes(16), bytes(16)]), mechanism=Mechanism.AES_CBC, mechanism_param=iv
    )
    first = next(running)  # C_EncryptInit + C_EncryptUpdate: the operation is active
    with pytest.raises(E.OperationActive):
        key.encrypt(bytes(16), mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    assert first + b"".join(running) == key.encrypt(
        bytes(32), mechanism=Mechanism.AES_CBC, mechanism_param=iv
    )
    mac = hmac_key(session, KeyType.SHA256_HMAC, b"k" * 32)
    with pytest.raises(E.MechanismParamInvalid):
        mac.sign(b"x", mechanism=Mechanism.SHA256_HMAC_GENERAL, mechanism_param=ulong(8))
    assert (
        mac.sign(b"x", mechanism=Mechanism.SHA256_HMAC)
        == hmac.new(b"k" * 32, b"x", hashlib.sha256).digest()
    )


def test_handle_and_login_error_codes(token_card):
    token, pin = token_card
    public = token.open(rw=True)
    user = token.open(rw=True, user_pin=pin)
    key = user.generate_key(KeyType.AES, 128, label="h", store=True, capabilities=ENC)
    data = user.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: "d",
        }
    )
    seen = public.get_key(label="h")  # the same object, through the public session
    assert seen.handle == key.handle
    with pytest.raises(E.AttributeSensitive):
        seen[Attribute.VALUE]
    assert seen.key_type == key.key_type == KeyType.AES  # python-pkcs11 caches the key type
    user.close()  # C_Logout + C_CloseSession
    with pytest.raises(E.UserNotLoggedIn):
        seen.encrypt(bytes(16), mechanism_param=bytes(16))
    # Logged out, a private object is out of sight: C_GetAttributeValue says so with
    # OBJECT_HANDLE_INVALID, the code the standard lists for it.
    with pytest.raises(E.ObjectHandleInvalid):
        seen[Attribute.LABEL]
    with pytest.raises(E.UserNotLoggedIn):
        public.generate_key(KeyType.AES, 128, store=True, capabilities=ENC)
    with pytest.raises(E.SessionHandleInvalid):
        key.encrypt(bytes(16), mechanism_param=bytes(16))  # its session is closed
    user = token.open(rw=True, user_pin=pin)
    key = user.get_key(label="h")
    data = next(user.get_objects({Attribute.LABEL: "d"}))
    assert key.key_type == KeyType.AES
    key.destroy()
    data.destroy()
    with pytest.raises(E.KeyHandleInvalid):
        key.encrypt(bytes(16), mechanism_param=bytes(16))
    with pytest.raises(E.ObjectHandleInvalid):
        data[Attribute.LABEL]
    user.close()
    public.close()


# ---- random, threads, finalize ---------------------------------------------------------------


def test_random(session):
    a, b = session.generate_random(256), session.generate_random(256)
    assert len(a) == len(b) == 32 and a != b
    with pytest.raises(E.RandomSeedNotSupported):
        session.seed_random(b"seed")


def test_threads_with_their_own_sessions(token_card):
    """python-pkcs11 releases the GIL around calls: threads really run the module at once."""
    token, pin = token_card
    first = token.open(rw=True, user_pin=pin)
    v = CBC_VECTORS[2]
    aes_key(first, v.key, {Attribute.LABEL: "kat-aes"})
    hmac_key(first, KeyType.SHA512_HMAC, HMAC_VECTORS[3].key)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with token.open() as s:  # the token is logged in: no PIN needed
                aes = s.get_key(label="kat-aes")
                mac = s.get_key(label="imported-mac")
                for _ in range(10):
                    assert (
                        aes.encrypt(
                            CBC_PLAINTEXT, mechanism=Mechanism.AES_CBC, mechanism_param=CBC_IV
                        )
                        == v.ciphertext
                    )
                    assert (
                        mac.sign(HMAC_VECTORS[3].data, mechanism=Mechanism.SHA512_HMAC)
                        == HMAC_VECTORS[3].sha512
                    )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    assert not errors, errors


def test_finalize_and_initialize_again(lib, token_card):
    token, pin = token_card
    with token.open(rw=True, user_pin=pin) as s:
        s.generate_key(KeyType.AES, 256, label="survives", store=True, capabilities=ENC)
    lib.reinitialize()  # C_Finalize + C_Initialize
    token = lib.get_token(token_label=token.label)
    with token.open(user_pin=pin) as s:
        key = s.get_key(label="survives")
        assert (
            key.decrypt(key.encrypt(b"again", mechanism_param=bytes(16)), mechanism_param=bytes(16))
            == b"again"
        )
