"""`pkcs11ws-server init DIR` and `issue-client`: a development PKI, the master key, the
configuration files and the client identities.

init writes DIR/pki/{ca,server,client}.{pem,key} (EC P-256; the server certificate names
localhost, 127.0.0.1, ::1 and every --san; the client certificate has the clientAuth EKU),
DIR/master.key (32 random bytes), DIR/server.yaml (the service), DIR/clients.yaml (the client
certificate registered as the identity "admin", role admin) and DIR/pkcs11webservices.cfg (the
module, WSOP format), and creates DIR/log/. Private keys and the master key are written with mode
0600. Paths written into the config files are absolute, resolved from DIR now.

issue_client() signs a new client certificate with the CA next to tls.ca (ca.key), writes it with
its key, the CA certificate and a module configuration into one folder, and registers its
fingerprint under a name and role in the clients file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkcs11ws._lite import dataclass
from pkcs11ws.server import identity, settings
from pkcs11ws.server.store import StoreError, scheme_of

CA_DAYS: Final = 3650
LEAF_DAYS: Final = 825


class InitError(Exception):
    """init refused (for example: it would overwrite an existing configuration)."""


@dataclass(frozen=True)
class InitResult:
    dir: Path
    server_yaml: Path
    client_cfg: Path
    ca: Path
    cert: Path
    key: Path
    kept_pki: bool = False  # an existing CA (and what it issued) was kept
    kept_master_key: bool = False


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply when the file already existed
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pkcs11ws development PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in ["localhost", "127.0.0.1", "::1", *names]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(n))
        except ValueError:
            entry = x509.DNSName(n)
        if entry not in entries:
            entries.append(entry)
    return x509.SubjectAlternativeName(entries)


_LEAF_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def sign_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    eku: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        _builder(_name(cn), ca_cert.subject, key.public_key(), LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        b = b.add_extension(san, critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_pki(pki: Path, sans: list[str] | None = None) -> None:
    """CA, server and client certificates with their keys, into the folder pki."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("pkcs11ws development CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, eku: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None) -> None:
        key, cert = sign_leaf(ca_key, ca_cert, cn, eku, san)
        stem = "server" if eku == ExtendedKeyUsageOID.SERVER_AUTH else "client"
        _write_private(pki / f"{stem}.key", _key_pem(key))
        _write_public(pki / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))

    leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, _san(sans or []))
    leaf("pkcs11ws client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    _write_private(pki / "ca.key", _key_pem(ca_key))
    _write_public(pki / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))


def q(path: Path) -> str:
    """A path as a YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(str(path))


def _database_yaml(d: Path, store: str | None) -> str:
    if store is None:
        return f"""\
store: null                     # null: SQLite at database.path; postgresql://USER@HOST:PORT/DB
database:                       #   for several replicas on PostgreSQL (docs/postgresql.md)
  backend: sqlite
  path: {q(d / "keys.db")}
  synchronous: FULL             # FULL: an acknowledged write survives a power cut
  pool_size: 8                  # PostgreSQL only: connections per worker process
  pool_timeout: 5               # PostgreSQL only: seconds to wait for one, then 503
"""
    return f"""\
# The database: several replicas of this service may share it (docs/postgresql.md). Keep a
# password out of this file: libpq reads ~/.pgpass or PGPASSFILE.
store: {json.dumps(store)}
database:
  pool_size: 8                  # connections per worker process
  pool_timeout: 5               # seconds to wait for a connection before answering 503
"""


def server_yaml(
    d: Path, port: int, scrypt_n: int, admin_port: int, store: str | None = None
) -> str:
    s = settings.DEFAULT_SCRYPT
    c = settings.DEFAULT_CONNECTIONS
    return f"""\
# pkcs11ws key service configuration (written by `pkcs11ws-server init`).
# Relative paths are relative to this file's folder.
host: 127.0.0.1
port: {port}
admin_port: {admin_port}              # /healthz /readyz /metrics over plain HTTP on 127.0.0.1
workers: 1                      # worker processes sharing one store (serve --workers overrides)
tls:                            # TLS 1.2+; a client certificate signed by `ca` is required
  cert: {q(d / "pki" / "server.pem")}
  key: {q(d / "pki" / "server.key")}
  ca: {q(d / "pki" / "ca.pem")}
# The service secret that is never in the database: it wraps every softcard key (over the
# passphrase) and seals activation tokens. Recovery needs the database, this master key and
# the softcard passphrases. A file (0600):
master_key: {q(d / "master.key")}
master_pkcs11:                  # or a key inside a PKCS#11 token instead (set all four)
  module: null                  # e.g. /usr/lib/softhsm/libsofthsm2.so
  token: null                   # token label
  key: null                     # AES key label (`pkcs11ws-server master-key` creates it)
  pin_file: null                # a 0600 file holding the token's user PIN
passphrase_min_length: {settings.DEFAULT_PASSPHRASE_MIN}        # bytes, for new softcards
clients: {q(d / "clients.yaml")}  # client identities and roles (issue-client adds to it)
unlisted_clients: refuse        # a CA certificate clients.yaml omits: refuse (403) or app
crl: null                       # or a CRL file of the CA (revoked serials; re-read on SIGHUP)
{_database_yaml(d, store)}max_body: {settings.DEFAULT_MAX_BODY}              # bytes
batch:                          # POST /crypto/v1/batch (the module's group commit)
  max_items: 64                 # operations per batch
  max_bytes: 1048576            # bytes per batch request (<= max_body)
activation_ttl: {settings.DEFAULT_ACTIVATION_TTL}           # seconds a softcard activation lasts
idempotency_ttl: 86400          # seconds an Idempotency-Key is remembered
lockout:                        # wrong passphrases: after `threshold` in a row the softcard
  threshold: 5                  # refuses activation for min(2^(n - threshold), max_seconds) s
  max_seconds: 300
scrypt:                         # passphrase key derivation for new softcards
  n: {scrypt_n}
  r: {s["r"]}
  p: {s["p"]}
  max_concurrent: {settings.DEFAULT_SCRYPT_CONCURRENCY}               # per worker; the rest queue
connections:                    # limits per worker process
  max: {c["max"]}                     # established connections; new ones beyond are closed
  handshake_timeout: {c["handshake_timeout"]}          # seconds
  keep_alive_timeout: {c["keep_alive_timeout"]}         # seconds idle between requests
  header_timeout: {c["header_timeout"]}            # seconds from a request's first byte to its body
  max_header_bytes: {c["max_header_bytes"]}       # beyond it: 431
  max_headers: {c["max_headers"]}              # header lines; beyond it: 431
log:
  level: INFO
  file: null                    # null: standard error; or a path
  access: true                  # one line per request: method, path, status, duration
  audit: {q(d / "log" / "audit.log")}  # one JSON line per change and per refused request
"""


def client_cfg(
    d: Path, port: int, host: str = "127.0.0.1", pki: Path | None = None, log: Path | None = None
) -> str:
    pki = pki if pki is not None else d / "pki"
    log = log if log is not None else d / "log"
    return f"""\
# pkcs11ws / WSOP PKCS#11 module configuration (written by `pkcs11ws-server`).
# Web Services server host name and port.
HOST {host}
PORT {port}
# Client TLS certificate and key, and the CA that signed the server certificate.
CERT {pki}/client.pem
KEY {pki}/client.key
AUTH {pki}/ca.pem
# 0 none, 1 fatal, 2 error, 3 warning, 4 debug1, 5 debug3, 6 debug9.
LOGLEVEL 4
LOGSTDOUT 0
LOGFILEPATH {log}/pkcs11webservices.log
# Retries of a failed request, and the delay (seconds) between them.
MAXRETRIES 5
RETRYDELAY 1
"""


def init(
    directory: Path,
    port: int = settings.DEFAULT_PORT,
    force: bool = False,
    scrypt_n: int = settings.DEFAULT_SCRYPT["n"],
    replace_ca_and_master_key: bool = False,
    admin_port: int | None = None,
    store: str | None = None,
    sans: list[str] | None = None,
) -> InitResult:
    """Write the kit into `directory`.

    `admin_port` defaults to `port` + 1. `force` rewrites the two configuration files but keeps
    an existing CA (with the certificates it issued), the client identities (clients.yaml) and
    master key. Only `replace_ca_and_master_key` replaces those: a new master key makes every
    stored softcard unreadable and a new CA invalidates every issued client certificate, so
    that can never be a side effect of another flag. `store`: a PostgreSQL URL for the store
    (default: SQLite). `sans` (--san) with a kept CA re-issues only the server certificate.
    """
    d = directory.expanduser().resolve()
    yaml_path = d / "server.yaml"
    ca, master = d / "pki" / "ca.pem", d / "master.key"
    if yaml_path.exists() and not (force or replace_ca_and_master_key):
        raise InitError(
            f"{yaml_path} exists; use --force to rewrite the configuration files "
            "(the CA and master key are kept)"
        )
    if admin_port is None:
        admin_port = port + 1
    if not 1 <= port <= 65535 or not 1 <= admin_port <= 65535 or port == admin_port:
        raise InitError(f"ports {port} and {admin_port}: two different ports in 1-65535")
    if scrypt_n < 2 or scrypt_n & (scrypt_n - 1):
        raise InitError("scrypt n must be a power of two")
    if store is not None:
        try:
            if scheme_of(store) == "sqlite":
                raise InitError("--store: only for PostgreSQL (SQLite is the default)")
        except StoreError as exc:
            raise InitError(str(exc)) from None
    existing = [p for p in (ca, master) if p.exists()]
    if existing and not force and not replace_ca_and_master_key:
        raise InitError(
            f"{', '.join(map(str, existing))} exist(s); use --force to keep them and write the "
            "configuration files, or --replace-ca-and-master-key to replace them (stored keys "
            "and issued certificates become unusable)"
        )
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)  # the service directory holds the master key and the store: owner-only
    (d / "log").mkdir(mode=0o700, exist_ok=True)
    (d / "log").chmod(0o700)
    for n in sans or []:
        if not n or any(c.isspace() for c in n) or "," in n:
            raise InitError(f"--san {n!r}: a host name or an IP address")
    kept_pki = ca.exists() and not replace_ca_and_master_key
    kept_master_key = master.exists() and not replace_ca_and_master_key
    clients = d / "clients.yaml"
    if not kept_pki:
        make_pki(d / "pki", sans)
        if clients.exists():
            clients.unlink()  # the old identities name certificates of the old CA
    elif sans:
        _reissue_server(d / "pki", sans)
    if not kept_master_key:
        _write_private(master, os.urandom(32))
    yaml_path.write_text(server_yaml(d, port, scrypt_n, admin_port, store), encoding="utf-8")
    if not clients.exists():
        admin_fp = identity.fingerprint_of_pem((d / "pki" / "client.pem").read_bytes())
        identity.add_client(clients, "admin", "admin", admin_fp)
    cfg = d / "pkcs11webservices.cfg"
    cfg.write_text(client_cfg(d, port), encoding="utf-8")
    settings.load(yaml_path)  # what we wrote must load
    return InitResult(
        d,
        yaml_path,
        cfg,
        d / "pki" / "ca.pem",
        d / "pki" / "client.pem",
        d / "pki" / "client.key",
        kept_pki,
        kept_master_key,
    )


def _reissue_server(pki: Path, sans: list[str]) -> None:
    """A new server certificate (with sans) from the kept CA."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InitError(f"{pki / 'ca.key'}: not the EC key init writes")
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key, cert = sign_leaf(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, _san(sans))
    _write_private(pki / "server.key", _key_pem(key))
    _write_public(pki / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class IssueResult:
    out: Path
    cert: Path
    key: Path | None
    ca: Path
    cfg: Path
    fingerprint: str


def issue_client(
    config: Path,
    name: str,
    role: str,
    out: Path,
    cert_pem: Path | None = None,
    ca_key: Path | None = None,
    host: str | None = None,
) -> IssueResult:
    """Make (or, with cert_pem, take) a client certificate and register it as identity name."""
    s = settings.load(config)
    if not identity.NAME_RE.match(name) or name.startswith(identity.UNLISTED_PREFIX):
        raise InitError("--name: 1-64 letters, digits and '-', not starting with 'cert-'")
    if role not in identity.ROLES:
        raise InitError("--role: admin or app")
    try:
        if name in identity.load_doc(s.clients).get("clients", {}):
            raise InitError(f"{s.clients}: a client named {name!r} exists")
    except identity.ClientsError as exc:
        raise InitError(str(exc)) from None
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    ca_pem = s.tls_ca.read_bytes()
    key_path: Path | None = None
    if cert_pem is not None:
        pem = cert_pem.read_bytes()
        x509.load_pem_x509_certificate(pem)  # must be a certificate
    else:
        ca_key_path = ca_key if ca_key is not None else s.tls_ca.with_name("ca.key")
        try:
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        except OSError as exc:
            raise InitError(
                f"the CA key {ca_key_path}: {exc.strerror} (give --ca-key, or "
                "issue the certificate with your CA and pass --cert)"
            ) from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise InitError(f"{ca_key_path}: an EC CA key is needed to issue (or pass --cert)")
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        key, cert = sign_leaf(loaded, ca_cert, name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        key_path = out / "client.key"
        _write_private(key_path, _key_pem(key))
    _write_public(out / "client.pem", pem)
    _write_public(out / "ca.pem", ca_pem)
    (out / "log").mkdir(exist_ok=True)
    cfg = out / "pkcs11webservices.cfg"
    server_host = host or ("127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host)
    cfg.write_text(client_cfg(out, s.port, server_host, pki=out, log=out / "log"), encoding="utf-8")
    fp = identity.fingerprint_of_pem(pem)
    try:
        identity.add_client(s.clients, name, role, fp)
    except identity.ClientsError as exc:
        raise InitError(str(exc)) from None
    return IssueResult(out, out / "client.pem", key_path, out / "ca.pem", cfg, fp)
