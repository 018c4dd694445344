"""The service master key: where it lives (a file, or a PKCS#11 token) and what it does.

The master key is the service secret that is never in the database. It does two things:
- derives the purpose-bound subkeys the service uses per request (sealing activation tokens,
  fingerprinting and sealing idempotent answers), once at start;
- wraps every softcard's passphrase-wrapped card key a second time ("outer wrap"), so that the
  database alone, even with a card's passphrase, opens nothing: the outer layer must come off
  first, and only the master key removes it.

Two sources, chosen in server.yaml (`master_pkcs11` when set, else the `master_key` file):
- FileMasterKey: 32 random bytes in a 0600 file; subkeys by HKDF-SHA256, outer wrap AES-256-GCM
  under an HKDF subkey.
- TokenMasterKey: an AES-256 key inside a PKCS#11 token (opened through python-pkcs11, tested
  with SoftHSM2), created non-extractable and sensitive, so it never leaves the token. The
  outer wrap is AES-GCM computed by the token (C_Encrypt / C_Decrypt); subkeys are derived by
  the token with AES-CMAC over fixed labels, once at start.
"""

from __future__ import annotations

import abc
import os
import stat
import threading
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pkcs11ws.server.settings import Pkcs11Master, Settings

MASTER_KEY_LEN: Final = 32
NONCE_LEN: Final = 12
_TAG_BITS: Final = 128


class MasterKeyError(Exception):
    """The master key is missing, unreadable or unusable: the service must not start."""


class UnwrapError(Exception):
    """An outer-wrapped blob does not open under this master key."""


def _hkdf(ikm: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"pkcs11ws " + purpose).derive(ikm)


class MasterKey(abc.ABC):
    """A master key, wherever it is kept. Thread-safe."""

    @abc.abstractmethod
    def subkey(self, purpose: bytes) -> bytes:
        """A 32-byte key bound to purpose, the same for the same master key."""

    @abc.abstractmethod
    def wrap(self, plain: bytes, aad: bytes) -> bytes: ...

    @abc.abstractmethod
    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Raises UnwrapError when blob was not wrapped by this master key with this aad."""

    def close(self) -> None:
        return None


class FileMasterKey(MasterKey):
    def __init__(self, master: bytes) -> None:
        if len(master) != MASTER_KEY_LEN:
            raise MasterKeyError(f"the master key must be exactly {MASTER_KEY_LEN} bytes")
        self._master = master
        # The HKDF labels of the first release (token, idempotency ...) are kept unchanged, so
        # activation tokens and idempotent answers survive the upgrade.
        self._wrap = AESGCM(_hkdf(master, b"card key wrap"))

    def subkey(self, purpose: bytes) -> bytes:
        return _hkdf(self._master, purpose)

    def wrap(self, plain: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._wrap.encrypt(nonce, plain, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < NONCE_LEN + 16:
            raise UnwrapError("wrapped blob too short")
        try:
            return self._wrap.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except InvalidTag:
            raise UnwrapError("wrapped blob does not open") from None


def read_key_file(path: Path) -> bytes:
    """The master key file's bytes; refused when it is readable by others than its owner."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise MasterKeyError(
            f"master key {path} does not exist: the service cannot open any softcard without "
            "it (restore it from your backup, or run `pkcs11ws-server init` for a new service)"
        ) from None
    except OSError as exc:
        raise MasterKeyError(f"master key {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(
            f"master key {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
        )
    if len(data) != MASTER_KEY_LEN:
        raise MasterKeyError(f"master key {path}: expected exactly {MASTER_KEY_LEN} bytes")
    return data


def _pkcs11() -> Any:
    try:
        import pkcs11
        import pkcs11.mechanisms
    except ImportError:
        raise MasterKeyError(
            "master_pkcs11 needs python-pkcs11 (pip install 'pkcs11ws[hsm]')"
        ) from None
    return pkcs11


def _read_pin(cfg: Pkcs11Master) -> str:
    if cfg.pin_file is None:
        raise MasterKeyError("master_pkcs11.pin_file: required (a file holding the user PIN)")
    try:
        st = cfg.pin_file.stat()
        pin = cfg.pin_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MasterKeyError(f"master_pkcs11.pin_file {cfg.pin_file}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(f"{cfg.pin_file}: the PIN file must be mode 0600")
    return pin


class TokenMasterKey(MasterKey):
    """An AES key in a PKCS#11 token; every use of it is an operation of the token."""

    def __init__(self, cfg: Pkcs11Master) -> None:
        p = _pkcs11()
        self._p = p
        self._lock = threading.Lock()  # one PKCS#11 session, used from worker threads
        try:
            lib = p.lib(str(cfg.module))
            token = lib.get_token(token_label=cfg.token)
            self._session = token.open(user_pin=_read_pin(cfg))
        except MasterKeyError:
            raise
        except Exception as exc:  # python-pkcs11 raises many kinds; all mean "cannot start"
            raise MasterKeyError(
                f"master_pkcs11: cannot open token {cfg.token!r} with {cfg.module}: "
                f"{type(exc).__name__} {exc}"
            ) from None
        try:
            self._key = self._session.get_key(
                object_class=p.ObjectClass.SECRET_KEY, key_type=p.KeyType.AES, label=cfg.key
            )
        except Exception as exc:
            self._session.close()
            raise MasterKeyError(
                f"master_pkcs11: no single AES key labelled {cfg.key!r} in token "
                f"{cfg.token!r} ({type(exc).__name__}); create it with "
                "`pkcs11ws-server master-key --config server.yaml`"
            ) from None

    def _gcm(self, nonce: bytes, aad: bytes) -> Any:
        # python-pkcs11 >= 0.8 takes a GCMParams object; older releases took a tuple.
        params = getattr(self._p.mechanisms, "GCMParams", None)
        return (nonce, aad, _TAG_BITS) if params is None else params(nonce, aad, _TAG_BITS)

    def subkey(self, purpose: bytes) -> bytes:
        label = b"pkcs11ws subkey " + purpose
        with self._lock:
            blocks = [
                bytes(self._key.sign(label + bytes([i]), mechanism=self._p.Mechanism.AES_CMAC))
                for i in (1, 2)
            ]
        return _hkdf(b"".join(blocks), purpose)

    def wrap(self, plain: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        with self._lock:
            ct = self._key.encrypt(
                plain, mechanism=self._p.Mechanism.AES_GCM, mechanism_param=self._gcm(nonce, aad)
            )
        return nonce + bytes(ct)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < NONCE_LEN + 16:
            raise UnwrapError("wrapped blob too short")
        try:
            with self._lock:
                pt = self._key.decrypt(
                    blob[NONCE_LEN:],
                    mechanism=self._p.Mechanism.AES_GCM,
                    mechanism_param=self._gcm(blob[:NONCE_LEN], aad),
                )
        except self._p.PKCS11Error:
            raise UnwrapError("wrapped blob does not open") from None
        return bytes(pt)

    def close(self) -> None:
        with self._lock:
            self._session.close()


def create_token_key(cfg: Pkcs11Master) -> bool:
    """Generate the master AES key in the token unless it exists (non-extractable, sensitive).
    True when a key was created."""
    p = _pkcs11()
    lib = p.lib(str(cfg.module))
    token = lib.get_token(token_label=cfg.token)
    with token.open(user_pin=_read_pin(cfg), rw=True) as session:
        found = list(
            session.get_objects(
                {p.Attribute.CLASS: p.ObjectClass.SECRET_KEY, p.Attribute.LABEL: cfg.key}
            )
        )
        if found:
            return False
        session.generate_key(
            p.KeyType.AES,
            256,
            label=cfg.key,
            store=True,
            capabilities=p.MechanismFlag.ENCRYPT | p.MechanismFlag.DECRYPT | p.MechanismFlag.SIGN,
            template={p.Attribute.EXTRACTABLE: False, p.Attribute.SENSITIVE: True},
        )
    return True


def open_master_key(s: Settings) -> MasterKey:
    """The configured master key; MasterKeyError (a message for the operator) when unusable."""
    if s.master_pkcs11 is not None:
        return TokenMasterKey(s.master_pkcs11)
    assert s.master_key is not None
    return FileMasterKey(read_key_file(s.master_key))
