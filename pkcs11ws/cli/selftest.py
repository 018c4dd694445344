"""ckcheckinst's self-test of a softcard, entirely through the PKCS#11 module's C ABI.

Log in; generate a temporary AES-256 key (CKM_AES_KEY_GEN) and HMAC key (CKM_SHA256_KEY_GEN,
or CKM_GENERIC_SECRET_KEY_GEN where the module lacks the 3.0 mechanism); AES-CBC-PAD encrypt and
decrypt; HMAC-SHA256 sign, verify, and check that a changed message does not verify; an EC P-256
key pair (CKM_EC_KEY_PAIR_GEN) signs with CKM_ECDSA_SHA256 and its public half verifies; a
CKM_SHA256 digest equals hashlib's; destroy the keys whatever happened; log out. The keys are
token objects (the WSOP rules allow no others) with a label that says where they came from, so a
left-over is easy to find.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from typing import Protocol

from pkcs11ws import constants as C
from pkcs11ws.cli.ckabi import AttrIn, CKError, Library, Mechanism, Session

MESSAGE = b"ckcheckinst self-test message, not a multiple of 16 bytes"


class Reporter(Protocol):
    def ok(self, name: str, detail: str, notes: tuple[str, ...] | list[str] = ()) -> None: ...

    def fail(self, name: str, reason: str, fix: str) -> None: ...


def _secret(label: str, key_type: int, size: int, usage: Sequence[int]) -> list[tuple[int, AttrIn]]:
    return [
        (C.CKA_CLASS, C.CKO_SECRET_KEY),
        (C.CKA_KEY_TYPE, key_type),
        (C.CKA_VALUE_LEN, size),
        (C.CKA_TOKEN, True),
        (C.CKA_PRIVATE, True),
        (C.CKA_LABEL, label.encode()),
        *[(u, True) for u in usage],
    ]


def _login_fix(e: CKError) -> str:
    if e.rv == C.CKR_PIN_INCORRECT:
        return "give the passphrase set when the softcard was generated"
    if e.rv == C.CKR_PIN_LOCKED:
        return "too many wrong passphrases: wait for the lockout to end, then retry"
    if e.rv == C.CKR_PIN_LEN_RANGE:
        return "passphrases are 1 to 256 bytes"
    return "see the module's log"


def run(
    rep: Reporter, lib: Library, tokens: list[tuple[int, str]], card: str, passphrase: bytes
) -> None:
    slots = [s for s, label in tokens if label == card]
    if not slots:
        rep.fail(
            f"softcard {card}",
            f"no token is labelled {card!r}",
            "`softcardtool -l` lists the softcards; create one with `softcardtool -g --name=NAME`",
        )
        return
    try:
        session = lib.open_session(slots[0], rw=True)
    except CKError as e:
        rep.fail(f"softcard {card}", str(e), "see the module's log")
        return
    with session:
        try:
            session.login(passphrase)
        except CKError as e:
            rep.fail(f"softcard {card}", f"log in: {e}", _login_fix(e))
            return
        rep.ok(f"softcard {card}", f"logged in on slot {slots[0]} (C_Login)")
        made: list[tuple[int, str]] = []
        try:
            _aes(rep, session, made)
            _hmac(rep, session, made)
            _ec(rep, session, made)
            _digest(rep, session)
        finally:
            _destroy(rep, session, made)
            try:
                session.logout()
            except CKError as e:
                rep.fail(f"softcard {card}", f"log out: {e}", "see the module's log")


def _aes(rep: Reporter, s: Session, made: list[tuple[int, str]]) -> None:
    name = "self-test AES"
    label = f"ckcheckinst-{secrets.token_hex(4)}-aes"
    try:
        key = s.generate_key(
            Mechanism(C.CKM_AES_KEY_GEN),
            _secret(label, C.CKK_AES, 32, (C.CKA_ENCRYPT, C.CKA_DECRYPT)),
        )
    except CKError as e:
        rep.fail(name, f"generate an AES-256 key: {e}", "see the module's log")
        return
    made.append((key, label))
    iv = os.urandom(16)
    try:
        ct = s.encrypt(Mechanism(C.CKM_AES_CBC_PAD, iv), key, MESSAGE)
        pt = s.decrypt(Mechanism(C.CKM_AES_CBC_PAD, iv), key, ct)
    except CKError as e:
        rep.fail(name, f"CKM_AES_CBC_PAD: {e}", "see the module's log")
        return
    if pt != MESSAGE or ct == MESSAGE or len(ct) != (len(MESSAGE) // 16 + 1) * 16:
        rep.fail(
            name,
            "CKM_AES_CBC_PAD decrypt did not give back the plaintext",
            "report this: the module or the key service computes wrong results",
        )
        return
    rep.ok(
        name,
        f"generated a temporary AES-256 key {label!r} (CKM_AES_KEY_GEN), "
        f"CKM_AES_CBC_PAD encrypt and decrypt of {len(MESSAGE)} bytes agree",
    )


def _hmac(rep: Reporter, s: Session, made: list[tuple[int, str]]) -> None:
    name = "self-test HMAC"
    label = f"ckcheckinst-{secrets.token_hex(4)}-hmac"
    usage = (C.CKA_SIGN, C.CKA_VERIFY)
    tries = (
        (C.CKM_SHA256_KEY_GEN, C.CKK_SHA256_HMAC),
        (C.CKM_GENERIC_SECRET_KEY_GEN, C.CKK_GENERIC_SECRET),
    )
    key = 0
    mech_name = ""
    for mech, key_type in tries:
        try:
            key = s.generate_key(Mechanism(mech), _secret(label, key_type, 32, usage))
        except CKError as e:
            if e.rv == C.CKR_MECHANISM_INVALID and mech != tries[-1][0]:
                continue
            rep.fail(name, f"generate an HMAC key: {e}", "see the module's log")
            return
        mech_name = C.CKM_NAMES[mech]
        break
    made.append((key, label))
    sign = Mechanism(C.CKM_SHA256_HMAC)
    try:
        mac = s.sign(sign, key, MESSAGE)
        good = s.verify(sign, key, MESSAGE, mac)
        bad = s.verify(sign, key, MESSAGE + b"!", mac)
    except CKError as e:
        rep.fail(name, f"CKM_SHA256_HMAC: {e}", "see the module's log")
        return
    if len(mac) != 32 or good != C.CKR_OK or bad != C.CKR_SIGNATURE_INVALID:
        rep.fail(
            name,
            f"CKM_SHA256_HMAC: {len(mac)}-byte MAC, verify gave "
            f"{C.ckr_name(good)}, a changed message gave {C.ckr_name(bad)}",
            "report this: the module or the key service computes wrong results",
        )
        return
    rep.ok(
        name,
        f"generated a temporary HMAC key {label!r} ({mech_name}), CKM_SHA256_HMAC "
        "sign and verify agree and a changed message does not verify",
    )


P256 = bytes.fromhex("06082a8648ce3d030107")  # CKA_EC_PARAMS: the OID of P-256


def _ec(rep: Reporter, s: Session, made: list[tuple[int, str]]) -> None:
    name = "self-test EC key pair"
    label = f"ckcheckinst-{secrets.token_hex(4)}-ec"
    common: list[tuple[int, AttrIn]] = [(C.CKA_TOKEN, True), (C.CKA_LABEL, label.encode())]
    try:
        pub, priv = s.generate_key_pair(
            Mechanism(C.CKM_EC_KEY_PAIR_GEN),
            [*common, (C.CKA_EC_PARAMS, P256), (C.CKA_VERIFY, True)],
            [*common, (C.CKA_PRIVATE, True), (C.CKA_SIGN, True)],
        )
    except CKError as e:
        rep.fail(name, f"generate an EC P-256 key pair: {e}", "see the module's log")
        return
    made.extend(((priv, label), (pub, label + " (public)")))
    # SoftHSM 2.6 has no CKM_ECDSA_SHA256: there the digest is made here and signed by CKM_ECDSA.
    mech_name, msg, changed = "CKM_ECDSA_SHA256", MESSAGE, MESSAGE + b"!"
    try:
        try:
            sig = s.sign(Mechanism(C.CKM_ECDSA_SHA256), priv, msg)
        except CKError as e:
            if e.rv != C.CKR_MECHANISM_INVALID:
                raise
            mech_name = "CKM_ECDSA"
            msg, changed = hashlib.sha256(msg).digest(), hashlib.sha256(changed).digest()
            sig = s.sign(Mechanism(C.CKM_ECDSA), priv, msg)
        mech = Mechanism(getattr(C, mech_name))
        good = s.verify(mech, pub, msg, sig)
        bad = s.verify(mech, pub, changed, sig)
    except CKError as e:
        rep.fail(name, f"{mech_name}: {e}", "see the module's log")
        return
    if len(sig) != 64 or good != C.CKR_OK or bad != C.CKR_SIGNATURE_INVALID:
        rep.fail(
            name,
            f"{mech_name}: {len(sig)}-byte signature, verify gave "
            f"{C.ckr_name(good)}, a changed message gave {C.ckr_name(bad)}",
            "report this: the module or the key service computes wrong results",
        )
        return
    rep.ok(
        name,
        f"generated a temporary EC P-256 key pair {label!r} (CKM_EC_KEY_PAIR_GEN), "
        f"{mech_name} sign and verify agree and a changed message does not "
        "verify",
    )


def _digest(rep: Reporter, s: Session) -> None:
    name = "self-test digest"
    try:
        got = s.digest(Mechanism(C.CKM_SHA256), MESSAGE)
    except CKError as e:
        rep.fail(name, f"CKM_SHA256: {e}", "see the module's log")
        return
    if got != hashlib.sha256(MESSAGE).digest():
        rep.fail(
            name,
            "CKM_SHA256 differs from SHA-256",
            "report this: the module computes wrong results",
        )
        return
    rep.ok(name, "CKM_SHA256 (C_DigestInit, C_Digest) equals SHA-256")


def _destroy(rep: Reporter, s: Session, made: list[tuple[int, str]]) -> None:
    if not made:
        return
    left = []
    for key, label in made:
        try:
            s.destroy(key)
        except CKError as e:
            left.append(f"{label!r} ({e.name})")
    if left:
        rep.fail(
            "self-test cleanup",
            "could not destroy " + ", ".join(left),
            "delete those keys by their label with a PKCS#11 tool",
        )
        return
    rep.ok("self-test cleanup", f"destroyed the {len(made)} temporary key(s) (C_DestroyObject)")
