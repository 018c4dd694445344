"""Client identities: who is at the other end of a mutual-TLS connection, and with which role.

The clients file (server.yaml `clients`, default DIR/clients.yaml) names every identity:

    clients:
      admin:                       # the identity name (letters, digits, '-'; 1-64)
        role: admin                # admin: every softcard; app: only its own and granted ones
        fingerprints: [9f86d0...]  # SHA-256 of the client certificate (DER), hex
      payments:
        role: app
        subject: "CN=payments,O=Example"   # or match the certificate's subject (RFC 4514)
    deny: [3a7bd3...]              # revoked certificate fingerprints: refused at once

A certificate of the CA that no entry names gets no access (403 CLIENT_NOT_AUTHORIZED) unless
server.yaml says `unlisted_clients: app`; it then acts as an app identity named "cert-" plus the
first 16 hex digits of its fingerprint. A CRL file (server.yaml `crl`) revokes by serial number.

One Clients object per worker process. A connection's certificate is looked at once, when its
first request arrives (Peer); its identity is cached on the connection together with the
generation of the clients file it came from. A reload (SIGHUP) bumps the generation, so every
kept-alive connection resolves its identity again on its next request: a revoked certificate is
refused there. A new certificate that no entry names makes the file be re-read when it changed
on disk, so `issue-client` takes effect without a reload.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Final

import yaml

from pkcs11ws._lite import dataclass

ROLES: Final = ("admin", "app")
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
FINGERPRINT_RE: Final = re.compile(r"^[0-9a-f]{64}$")
UNLISTED_PREFIX: Final = "cert-"
log = logging.getLogger("pkcs11ws.server")


class ClientsError(Exception):
    """The clients file (or the CRL) is missing, unreadable or invalid."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Peer:
    """One connection's client certificate, and its identity as last resolved."""

    __slots__ = ("der", "fingerprint", "generation", "identity", "refusal")

    def __init__(self, der: bytes | None) -> None:
        self.der = der
        self.fingerprint = hashlib.sha256(der).hexdigest() if der else ""
        self.generation = -1  # never resolved
        self.identity: Identity | None = None
        self.refusal = ""  # why identity is None: "unlisted", "revoked" or "no certificate"


def fingerprint_of_pem(pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class _Table:
    by_fingerprint: dict[str, Identity]
    by_subject: dict[str, Identity]
    names: dict[str, Identity]
    deny: frozenset[str]
    revoked_serials: frozenset[int]


def _fingerprints(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ClientsError(f"{where}: a fingerprint or a list of them")
    out = []
    for fp in items:
        fp = str(fp).lower().replace(":", "")
        if not FINGERPRINT_RE.match(fp):
            raise ClientsError(f"{where}: {fp!r} is not a SHA-256 hex fingerprint")
        out.append(fp)
    return out


def parse(doc: Any, where: str = "clients file") -> tuple[dict[str, Identity], _Table]:
    """Validate a loaded clients file; returns (identities by name, lookup table w/o CRL)."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or set(doc) - {"clients", "deny"}:
        raise ClientsError(f"{where}: expected a mapping with 'clients' and optional 'deny'")
    clients = doc.get("clients") or {}
    if not isinstance(clients, dict):
        raise ClientsError(f"{where}: 'clients' must map names to entries")
    names: dict[str, Identity] = {}
    by_fp: dict[str, Identity] = {}
    by_subject: dict[str, Identity] = {}
    for name, entry in clients.items():
        name = str(name)
        w = f"{where}: clients.{name}"
        if not NAME_RE.match(name) or name.startswith(UNLISTED_PREFIX):
            raise ClientsError(f"{w}: names are 1-64 letters, digits and '-' (not 'cert-...')")
        if not isinstance(entry, dict) or set(entry) - {"role", "fingerprints", "subject"}:
            raise ClientsError(f"{w}: keys are role, fingerprints, subject")
        role = entry.get("role", "app")
        if role not in ROLES:
            raise ClientsError(f"{w}.role: admin or app")
        ident = Identity(name, role)
        names[name] = ident
        fps = _fingerprints(entry.get("fingerprints", []), f"{w}.fingerprints")
        subject = entry.get("subject")
        if not fps and not subject:
            raise ClientsError(f"{w}: give fingerprints or a subject")
        for fp in fps:
            if fp in by_fp:
                raise ClientsError(f"{w}: fingerprint {fp} is also {by_fp[fp].name}'s")
            by_fp[fp] = ident
        if subject is not None:
            if not isinstance(subject, str) or not subject:
                raise ClientsError(f"{w}.subject: an RFC 4514 string")
            by_subject[subject] = ident
    deny = frozenset(_fingerprints(doc.get("deny") or [], f"{where}: deny"))
    return names, _Table(by_fp, by_subject, names, deny, frozenset())


def _crl_serials(crl_path: Path, ca_path: Path) -> frozenset[int]:
    from cryptography import x509

    try:
        data = crl_path.read_bytes()
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_crl(data)
        )
    except (OSError, ValueError) as exc:
        raise ClientsError(f"crl {crl_path}: {exc}") from None
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise ClientsError(f"crl {crl_path}: not signed by the CA {ca_path}")
    return frozenset(r.serial_number for r in crl)


class Clients:
    """The identities of one worker process, reloadable."""

    def __init__(
        self,
        path: Path,
        unlisted: str = "refuse",
        crl: Path | None = None,
        ca: Path | None = None,
    ) -> None:
        self.path = path
        self.unlisted = unlisted
        self.crl = crl
        self.ca = ca
        self.generation = 0
        self._lock = threading.Lock()
        self._mtime = 0.0
        self._table = self._read()

    def _read(self) -> _Table:
        try:
            st = os.stat(self.path)
            doc = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ClientsError(
                f"cannot read the clients file {self.path}: {exc.strerror}"
            ) from None
        except yaml.YAMLError as exc:
            raise ClientsError(f"{self.path}: not valid YAML: {exc}") from None
        _, table = parse(doc, str(self.path))
        if self.crl is not None and self.ca is not None:
            serials = _crl_serials(self.crl, self.ca)
            table = _Table(table.by_fingerprint, table.by_subject, table.names, table.deny, serials)
        self._mtime = st.st_mtime
        return table

    @property
    def names(self) -> dict[str, Identity]:
        return self._table.names

    def reload(self) -> bool:
        """Re-read the files; on an error keep the previous table (and say so). True if read."""
        with self._lock:
            try:
                table = self._read()
            except ClientsError as exc:
                log.error("clients not reloaded, the previous list stays: %s", exc)
                return False
            self._table = table
            self.generation += 1
        log.info(
            "clients reloaded from %s: %d identities, %d denied",
            self.path,
            len(table.names),
            len(table.deny),
        )
        return True

    def _changed_on_disk(self) -> bool:
        try:
            return os.stat(self.path).st_mtime != self._mtime
        except OSError:
            return False

    def identify(self, peer: Peer) -> Identity | None:
        """Resolve (and cache on the peer) the identity of a connection's certificate."""
        ident = self._lookup(peer)
        if ident is None and peer.refusal == "unlisted" and self._changed_on_disk():
            self.reload()  # issue-client wrote a new entry since we last read the file
            ident = self._lookup(peer)
        peer.identity = ident
        peer.generation = self.generation
        return ident

    def _lookup(self, peer: Peer) -> Identity | None:
        t = self._table
        if not peer.der:
            peer.refusal = "no certificate"
            return None
        fp = peer.fingerprint
        if fp in t.deny:
            peer.refusal = "revoked"
            return None
        ident = t.by_fingerprint.get(fp)
        if ident is None and (t.by_subject or t.revoked_serials or self.unlisted == "app"):
            from cryptography import x509

            cert = x509.load_der_x509_certificate(peer.der)
            if cert.serial_number in t.revoked_serials:
                peer.refusal = "revoked"
                return None
            ident = t.by_subject.get(cert.subject.rfc4514_string())
            if ident is None and self.unlisted == "app":
                ident = Identity(UNLISTED_PREFIX + fp[:16], "app")
        elif ident is not None and t.revoked_serials:
            from cryptography import x509

            if x509.load_der_x509_certificate(peer.der).serial_number in t.revoked_serials:
                peer.refusal = "revoked"
                return None
        if ident is None:
            peer.refusal = "unlisted"
        return ident


# -------------------------------------------------------------------------------------------
# Writing the file (init, issue-client): a small YAML document we own entirely.

HEADER: Final = """\
# pkcs11ws client identities (see `pkcs11ws-server issue-client`). Each entry maps a client
# certificate (SHA-256 fingerprint of its DER form, and/or its RFC 4514 subject) to a name and a
# role: admin manages every softcard; app sees and uses only the softcards it created or was
# granted. `deny` lists revoked certificate fingerprints. After editing, send the service SIGHUP.
"""


def load_doc(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"clients": {}, "deny": []}
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    parse(doc, str(path))
    doc.setdefault("clients", {})
    doc.setdefault("deny", [])
    if doc["clients"] is None:
        doc["clients"] = {}
    if doc["deny"] is None:
        doc["deny"] = []
    return dict(doc)


def save_doc(path: Path, doc: dict[str, Any]) -> None:
    """Validate, then replace the file atomically (a reader never sees half a file)."""
    parse(doc, str(path))
    text = HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def add_client(path: Path, name: str, role: str, fingerprint: str) -> None:
    doc = load_doc(path)
    if name in doc["clients"]:
        raise ClientsError(f"{path}: a client named {name!r} exists")
    doc["clients"][name] = {"role": role, "fingerprints": [fingerprint]}
    save_doc(path, doc)
