"""Public-key operations in a public session (PKCS#11 4.4: before C_Login a session reaches the
public objects), through PyKCS11, libpkcs11ws.so and the real key service over mutual TLS.

A public key found before C_Login verifies (RSA PKCS#1 v1.5, PSS, ECDSA) and encrypts (RSA
PKCS#1 v1.5 and OAEP) in the module; what it encrypted decrypts once logged in. The attacker's
side: a private key's or a secret key's handle kept from an earlier login, used after C_Logout,
gets CKR_USER_NOT_LOGGED_IN at C_*Init and no request leaves the module; another softcard's public
key, a handle never issued and a public key offered for signing are refused; private objects stay
out of a public search.
"""

from __future__ import annotations

from typing import Any

import PyKCS11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws._native import core
from tests.support.cards import client_card

P256 = bytes.fromhex("06082a8648ce3d030107")
COMMON = [(C.CKA_TOKEN, True)]


def _card(service: Any) -> tuple[str, str]:
    return client_card(service.client_cfg, "pub")


def _pairs(s: Any, tag: str) -> dict[str, Any]:
    """An RSA-2048 and an EC P-256 pair and an AES key, made while logged in."""
    rsa_pub, rsa_priv = s.generateKeyPair(
        [
            *COMMON,
            (C.CKA_ID, f"{tag}-rsa".encode()),
            (C.CKA_VERIFY, True),
            (C.CKA_ENCRYPT, True),
            (C.CKA_MODULUS_BITS, 2048),
        ],
        [
            *COMMON,
            (C.CKA_ID, f"{tag}-rsa".encode()),
            (C.CKA_PRIVATE, True),
            (C.CKA_SIGN, True),
            (C.CKA_DECRYPT, True),
        ],
        mecha=PyKCS11.Mechanism(C.CKM_RSA_PKCS_KEY_PAIR_GEN, None),
    )
    ec_pub, ec_priv = s.generateKeyPair(
        [*COMMON, (C.CKA_ID, f"{tag}-ec".encode()), (C.CKA_VERIFY, True), (C.CKA_EC_PARAMS, P256)],
        [*COMMON, (C.CKA_ID, f"{tag}-ec".encode()), (C.CKA_PRIVATE, True), (C.CKA_SIGN, True)],
        mecha=PyKCS11.Mechanism(C.CKM_EC_KEY_PAIR_GEN, None),
    )
    aes = s.generateKey(
        [
            *COMMON,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_PRIVATE, True),
            (C.CKA_VALUE_LEN, 32),
            (C.CKA_ENCRYPT, True),
        ],
        mecha=PyKCS11.Mechanism(C.CKM_AES_KEY_GEN, None),
    )
    return {
        "rsa_pub": rsa_pub,
        "rsa_priv": rsa_priv,
        "ec_pub": ec_pub,
        "ec_priv": ec_priv,
        "aes": aes,
    }


@pytest.fixture(scope="module")
def env(service: Any) -> Any:
    (name_a, pin_a), (name_b, pin_b) = _card(service), _card(service)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PKCS11WS_CONFIG", str(service.client_cfg))
        lib = PyKCS11.PyKCS11Lib()
        lib.load(module_path())
        slots = {lib.getTokenInfo(s).label.strip(): s for s in lib.getSlotList(tokenPresent=True)}
        a, b = slots[name_a], slots[name_b]
        sa = lib.openSession(a, PyKCS11.CKF_RW_SESSION)
        sa.login(pin_a)
        keys_a = _pairs(sa, "a")
        data = b"signed while logged in, checked in a public session"
        sigs = {
            "rsa": bytes(
                sa.sign(keys_a["rsa_priv"], data, PyKCS11.Mechanism(C.CKM_SHA256_RSA_PKCS, None))
            ),
            "pss": bytes(
                sa.sign(
                    keys_a["rsa_priv"],
                    data,
                    PyKCS11.RSA_PSS_Mechanism(
                        C.CKM_SHA256_RSA_PKCS_PSS, C.CKM_SHA256, C.CKG_MGF1_SHA256, 32
                    ),
                )
            ),
            "ec": bytes(
                sa.sign(keys_a["ec_priv"], data, PyKCS11.Mechanism(C.CKM_ECDSA_SHA256, None))
            ),
        }
        sb = lib.openSession(b, PyKCS11.CKF_RW_SESSION)
        sb.login(pin_b)
        keys_b = _pairs(sb, "b")
        sb.logout()
        sa.logout()
        yield {
            "lib": lib,
            "a": a,
            "pin_a": pin_a,
            "sa": sa,
            "keys_a": keys_a,
            "keys_b": keys_b,
            "data": data,
            "sigs": sigs,
        }
        lib.closeAllSessions(a)
        lib.closeAllSessions(b)
        lib.unload()


def _requests() -> int:
    return int(core.current_provider().client.stats()["requests"])  # type: ignore[attr-defined]


def _ckr(fn: Any) -> int:
    with pytest.raises(PyKCS11.PyKCS11Error) as e:
        fn()
    return int(e.value.value)


def test_public_session_finds_and_uses_public_keys(env: Any) -> None:
    s = env["lib"].openSession(env["a"])  # read-only, never logged in
    assert s.getSessionInfo().state == PyKCS11.CKS_RO_PUBLIC_SESSION
    (pub,) = s.findObjects([(C.CKA_CLASS, C.CKO_PUBLIC_KEY), (C.CKA_ID, b"a-rsa")])
    (ec_pub,) = s.findObjects([(C.CKA_CLASS, C.CKO_PUBLIC_KEY), (C.CKA_ID, b"a-ec")])
    assert s.findObjects([(C.CKA_CLASS, C.CKO_PRIVATE_KEY)]) == []
    data, sigs = env["data"], env["sigs"]
    before = _requests()
    m = PyKCS11.Mechanism(C.CKM_SHA256_RSA_PKCS, None)
    assert s.verify(pub, data, sigs["rsa"], m)
    assert not s.verify(pub, data + b"!", sigs["rsa"], m)
    pss = PyKCS11.RSA_PSS_Mechanism(C.CKM_SHA256_RSA_PKCS_PSS, C.CKM_SHA256, C.CKG_MGF1_SHA256, 32)
    assert s.verify(pub, data, sigs["pss"], pss)
    assert s.verify(ec_pub, data, sigs["ec"], PyKCS11.Mechanism(C.CKM_ECDSA_SHA256, None))
    ct_v15 = bytes(s.encrypt(pub, b"to the private half", PyKCS11.Mechanism(C.CKM_RSA_PKCS)))
    oaep = PyKCS11.RSAOAEPMechanism(C.CKM_SHA256, C.CKG_MGF1_SHA256)
    ct_oaep = bytes(s.encrypt(pub, b"OAEP too", oaep))
    assert _requests() == before  # all of it in the module
    # The signatures verify in cryptography with the public key read in the public session.
    n = int.from_bytes(bytes(s.getAttributeValue(pub, [C.CKA_MODULUS])[0]), "big")
    key = rsa.RSAPublicNumbers(65537, n).public_key()
    key.verify(sigs["rsa"], data, padding.PKCS1v15(), hashes.SHA256())
    point = bytes(s.getAttributeValue(ec_pub, [C.CKA_EC_POINT])[0])[2:]
    eck = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    r, t = sigs["ec"][:32], sigs["ec"][32:]
    der = utils.encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(t, "big"))
    eck.verify(der, data, ec.ECDSA(hashes.SHA256()))
    # Once logged in, the private half decrypts what the public session encrypted.
    env["sa"].login(env["pin_a"])
    try:
        priv = env["keys_a"]["rsa_priv"]
        dec = env["sa"].decrypt(priv, ct_v15, PyKCS11.Mechanism(C.CKM_RSA_PKCS))
        assert bytes(dec) == b"to the private half"
        assert bytes(env["sa"].decrypt(priv, ct_oaep, oaep)) == b"OAEP too"
    finally:
        env["sa"].logout()
    s.closeSession()


def test_private_and_secret_keys_need_the_login(env: Any) -> None:
    """Handles kept from a login, used after C_Logout: refused at C_*Init, nothing sent."""
    s = env["lib"].openSession(env["a"], PyKCS11.CKF_RW_SESSION)
    k = env["keys_a"]
    before = _requests()
    sha = PyKCS11.Mechanism(C.CKM_SHA256_RSA_PKCS, None)
    assert _ckr(lambda: s.sign(k["rsa_priv"], b"x", sha)) == C.CKR_USER_NOT_LOGGED_IN
    assert _ckr(lambda: s.sign(k["ec_priv"], b"x", PyKCS11.Mechanism(C.CKM_ECDSA_SHA256))) == (
        C.CKR_USER_NOT_LOGGED_IN
    )
    v15 = PyKCS11.Mechanism(C.CKM_RSA_PKCS)
    assert _ckr(lambda: s.decrypt(k["rsa_priv"], b"\0" * 256, v15)) == C.CKR_USER_NOT_LOGGED_IN
    aes_mech = PyKCS11.Mechanism(C.CKM_AES_CBC_PAD, b"\0" * 16)
    assert _ckr(lambda: s.encrypt(k["aes"], b"x", aes_mech)) == C.CKR_USER_NOT_LOGGED_IN
    # A public key is no signing key, logged in or not.
    assert _ckr(lambda: s.sign(k["rsa_pub"], b"x", sha)) == C.CKR_KEY_TYPE_INCONSISTENT
    # Another softcard's public key (its handle is valid in this process, on another slot).
    other = env["keys_b"]["rsa_pub"]
    assert _ckr(lambda: s.verify(other, b"x", b"\0" * 256, sha)) == C.CKR_KEY_HANDLE_INVALID
    assert _ckr(lambda: s.encrypt(other, b"x", v15)) == C.CKR_KEY_HANDLE_INVALID
    # A handle never issued, and the private key's attributes (private object: not visible).
    bogus = PyKCS11.CK_OBJECT_HANDLE(s)
    bogus.assign(0x7FFFFFF0)
    assert _ckr(lambda: s.verify(bogus, b"x", b"\0" * 256, sha)) == C.CKR_KEY_HANDLE_INVALID
    assert _ckr(lambda: s.getAttributeValue(k["rsa_priv"], [C.CKA_LABEL])) == (
        C.CKR_OBJECT_HANDLE_INVALID
    )
    assert _requests() == before
    s.closeSession()
