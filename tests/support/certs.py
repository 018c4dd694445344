"""Throw-away self-signed X.509 certificates for the tests (objects to store through the module,
a foreign CA, a client the service does not know): one builder instead of one per test file."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from pkcs11ws import constants as C


def self_signed_cert(
    cn: str,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    *,
    days: float = 1,
    ca: bool = False,
    ski: bool = False,
    serial: int | None = None,
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """(certificate, its key): CN=cn, signed by its own key (a new P-256 key unless `key`), valid
    from five minutes ago for `days`; ca: a critical BasicConstraints CA:TRUE; ski: a
    SubjectKeyIdentifier; serial: a fixed serial number instead of a random one."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if ski:
        ski_ext = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = builder.add_extension(ski_ext, False)
    return builder.sign(key, hashes.SHA256()), key


def self_signed(cn: str = "pkcs11ws drop-in") -> tuple[bytes, bytes, bytes]:
    """A fresh self-signed EC certificate as a PKCS#11 object wants it: (DER, subject DER,
    issuer DER)."""
    cert, _ = self_signed_cert(cn)
    name = cert.subject.public_bytes()
    return cert.public_bytes(serialization.Encoding.DER), name, name


def store_certificate(
    mod: Any, h: int, private: bool, label: bytes, cid: bytes = b"\xc1"
) -> tuple[int, bytes]:
    """A fresh self_signed() certificate stored as a token object through mod (a
    tests.support.p11ctypes Module) in session h: (its handle, its DER)."""
    der, subject, issuer = self_signed(label.decode())
    items = [
        (C.CKA_TOKEN, True),
        (C.CKA_PRIVATE, private),
        (C.CKA_CLASS, C.CKO_CERTIFICATE),
        (C.CKA_CERTIFICATE_TYPE, C.CKC_X_509),
        (C.CKA_VALUE, der),
        (C.CKA_SUBJECT, subject),
        (C.CKA_ISSUER, issuer),
        (C.CKA_LABEL, label),
        (C.CKA_ID, cid),
    ]
    return mod.create(h, items), der


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """The key as an unencrypted PKCS#8 PEM (what the module's KEY file holds)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
