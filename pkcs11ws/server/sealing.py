"""The key service's own cryptography: master-key sealing and passphrase-based key wrapping.

Key hierarchy:
- the master key (masterkey.py: a 0600 file, or an AES key inside a PKCS#11 token) -> subkeys,
  one per purpose: sealing activation tokens, fingerprinting idempotent requests (HMAC) and
  sealing stored responses.
- per softcard: a random 32-byte card key, wrapped (AES-GCM) under KEK = scrypt(passphrase,
  per-card salt), and that blob wrapped again under the master key (the outer wrap), which is
  what the store holds. Without the master key the passphrase layer cannot even be reached, so
  a copy of the database allows no offline guessing; a wrong passphrase fails the inner unwrap.
- per object: secret values (key bytes, data and certificate values) AES-GCM under the card key
  with the object handle as associated data, so a ciphertext cannot be moved to another object.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import struct
import uuid
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pkcs11ws._lite import dataclass
from pkcs11ws.server.masterkey import MasterKey, UnwrapError

CARD_KEY_LEN: Final = 32
SALT_LEN: Final = 16
NONCE_LEN: Final = 12
TOKEN_PREFIX: Final = "v1."
_TOKEN_AAD: Final = b"pkcs11ws activation token v1"
_CARD_AAD: Final = b"pkcs11ws outer card key "
# session id, card id, card key, expiry; then the identity name it is bound to (UTF-8).
_TOKEN_PLAIN: Final = struct.Struct(">16s16s32sQ")


class SealError(Exception):
    """A sealed blob does not open (wrong key, tampered or truncated)."""


@dataclass(frozen=True)
class TokenClaims:
    session: str  # UUID
    card: str  # UUID
    card_key: bytes
    expires: int  # unix seconds
    client: str = ""  # the identity that activated: the token works only over its connections


def seal(aead: AESGCM, plain: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    return nonce + aead.encrypt(nonce, plain, aad)


def unseal(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_LEN + 16:
        raise SealError("sealed blob too short")
    try:
        return aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
    except InvalidTag:
        raise SealError("sealed blob does not open") from None


class MasterKeys:
    """Purpose-bound keys derived from the service master key (built once per process)."""

    def __init__(self, master: MasterKey) -> None:
        self.master = master
        self._token = AESGCM(master.subkey(b"token"))
        self._fingerprint = master.subkey(b"idempotency fingerprint")
        self._response = AESGCM(master.subkey(b"idempotency response"))

    def wrap_card(self, inner: bytes, card_id: str) -> bytes:
        """The outer wrap of a passphrase-wrapped card key (what the store keeps)."""
        return self.master.wrap(inner, _CARD_AAD + card_id.encode())

    def unwrap_card(self, outer: bytes, card_id: str) -> bytes:
        """The passphrase-wrapped card key; SealError under another master key."""
        try:
            return self.master.unwrap(outer, _CARD_AAD + card_id.encode())
        except UnwrapError:
            raise SealError("the card key is not wrapped under this master key") from None

    def seal_token(self, claims: TokenClaims) -> str:
        plain = _TOKEN_PLAIN.pack(
            uuid.UUID(claims.session).bytes,
            uuid.UUID(claims.card).bytes,
            claims.card_key,
            claims.expires,
        ) + claims.client.encode("utf-8")
        return TOKEN_PREFIX + _b64url(seal(self._token, plain, _TOKEN_AAD))

    def open_token(self, token: str) -> TokenClaims:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 512:
            raise SealError("not an activation token")
        blob = _b64url_decode(token[len(TOKEN_PREFIX) :])
        plain = unseal(self._token, blob, _TOKEN_AAD)
        size = _TOKEN_PLAIN.size
        if len(plain) < size:
            raise SealError("token has the wrong size")
        sid, cid, card_key, expires = _TOKEN_PLAIN.unpack(plain[:size])
        try:
            client = plain[size:].decode("utf-8")
        except UnicodeDecodeError:
            raise SealError("token names no valid identity") from None
        return TokenClaims(
            str(uuid.UUID(bytes=sid)), str(uuid.UUID(bytes=cid)), card_key, expires, client
        )

    def fingerprint(self, *parts: bytes) -> bytes:
        """HMAC of a request: never a plain hash, since bodies can hold passphrases."""
        mac = hmac.new(self._fingerprint, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(struct.pack(">Q", len(part)))
            mac.update(part)
        return mac.digest()

    def seal_response(self, body: bytes, idem_key: str) -> bytes:
        return seal(self._response, body, idem_key.encode())

    def open_response(self, blob: bytes, idem_key: str) -> bytes:
        return unseal(self._response, blob, idem_key.encode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SealError("token is not base64url") from None


def kek(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt key-encryption key; slow on purpose: call it off the event loop."""
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=32)


def wrap_card_key(kek_bytes: bytes, card_key: bytes, card_id: str) -> bytes:
    return seal(AESGCM(kek_bytes), card_key, b"card " + card_id.encode())


def unwrap_card_key(kek_bytes: bytes, wrapped: bytes, card_id: str) -> bytes:
    """Raises SealError when the passphrase (so the KEK) is wrong."""
    return unseal(AESGCM(kek_bytes), wrapped, b"card " + card_id.encode())


# Building an AESGCM (OpenSSL key schedule) costs more than opening a short value: keep one per
# card key recently used (searches open one value per object found).
_card_aead: Final = functools.lru_cache(maxsize=256)(AESGCM)


def encrypt_value(card_key: bytes, handle: str, value: bytes) -> bytes:
    return seal(_card_aead(card_key), value, handle.encode())


def decrypt_value(card_key: bytes, handle: str, blob: bytes) -> bytes:
    return unseal(_card_aead(card_key), blob, handle.encode())
