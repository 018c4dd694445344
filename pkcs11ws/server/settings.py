"""The key service configuration (server.yaml): its keys, defaults, validation and loading.

Read once at start-up (each worker process reads it once); nothing re-reads it per request.
Relative paths are resolved against the folder holding the yaml file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Final

import yaml

from pkcs11ws._lite import dataclass
from pkcs11ws.server.store import StoreConfig, StoreError, redact, scheme_of

CONFIG_ENV: Final = "PKCS11WS_SERVER_CONFIG"  # how `serve` hands the yaml path to workers
# With --workers N > 1: the supervisor's PID, so that a worker knows it is one (worker.create_app).
SUPERVISOR_ENV: Final = "PKCS11WS_SERVER_SUPERVISOR"
DEFAULT_PORT: Final = 18001
DEFAULT_ADMIN_PORT: Final = DEFAULT_PORT + 1  # what `init` writes: the service port + 1
DEFAULT_MAX_BODY: Final = 8 * 1024 * 1024
DEFAULT_ACTIVATION_TTL: Final = 8 * 3600
DEFAULT_SCRYPT: Final = {"n": 2**15, "r": 8, "p": 1}
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_PASSPHRASE_MIN: Final = 8
DEFAULT_SCRYPT_CONCURRENCY: Final = 2
# Connection hygiene (connections: in server.yaml). The handshake and header timeouts bound what
# a client that opens a socket and stalls can hold; the keep-alive timeout only runs while no
# request is in progress, so a client in use never loses its connection to it.
DEFAULT_CONNECTIONS: Final = {
    "max": 1000,
    "handshake_timeout": 5,
    "keep_alive_timeout": 5,
    "header_timeout": 10,
    "max_header_bytes": 16384,
    "max_headers": 100,
}


def describe_store(s: Settings) -> str:
    """The store for logs and messages (no password)."""
    return redact(s.store.url)


class SettingsError(Exception):
    """server.yaml is missing, unreadable or holds an invalid value."""


@dataclass(frozen=True)
class Key:
    """One server.yaml key: its dotted name, YAML type, default and meaning.

    KEYS below is the one table of server.yaml: load() takes types and defaults from it and
    docs/server-yaml.md is generated from it (`python -m pkcs11ws.server.settings >
    docs/server-yaml.md`; a test checks it is current).
    """

    name: str  # dotted for nested keys: "lockout.threshold"
    kind: type  # int, str, bool (the YAML scalar type); paths and enumerations are str
    default: Any  # None: no default (required, or absent means "off"; the doc says which)
    doc: str


# fmt: off
KEYS: Final[tuple[Key, ...]] = (
    Key("host", str, "127.0.0.1", "Address the TLS listener binds."),
    Key("port", int, DEFAULT_PORT, "TLS port of the key service (1-65535)."),
    Key("admin_port", int, None, "Port of the admin listener on 127.0.0.1, plain HTTP: "
        "`/healthz`, `/readyz`, `/metrics`. Absent or null: no admin listener. `init` writes "
        "the service port + 1."),
    Key("workers", int, 1, "Worker processes sharing one store (1-64); `serve --workers` "
        "overrides."),
    Key("tls.cert", str, None, "Required. Server certificate chain (PEM path)."),
    Key("tls.key", str, None, "Required. Server private key (PEM path)."),
    Key("tls.ca", str, None, "Required. CA certificates that sign accepted client "
        "certificates (PEM path); a client certificate is always required."),
    Key("master_key", str, "master.key", "Path of the 32-byte master key file (mode 0600): "
        "wraps every softcard key over its passphrase wrap and seals activation tokens and "
        "idempotent answers. Never in the database; the service does not start without it. "
        "Not used when `master_pkcs11.module` is set."),
    Key("master_pkcs11.module", str, None, "PKCS#11 library holding the master key instead of "
        "the file (for SoftHSM2: libsofthsm2.so; needs python-pkcs11). The key never leaves "
        "the token: it wraps and unwraps card keys and derives the service subkeys at start."),
    Key("master_pkcs11.token", str, None, "Label of the token holding the master key."),
    Key("master_pkcs11.key", str, None, "Label of the AES master key in that token "
        "(`pkcs11ws-server master-key` creates it, non-extractable)."),
    Key("master_pkcs11.pin_file", str, None, "File (mode 0600) holding the token's user PIN."),
    Key("passphrase_min_length", int, DEFAULT_PASSPHRASE_MIN, "Shortest passphrase of a new "
        "softcard, in bytes (1-256); existing softcards keep theirs."),
    Key("store", str, None, "The store as a URL: `sqlite:///PATH` (relative to this file's "
        "folder; `sqlite:////PATH` absolute) or `postgresql://USER@HOST:PORT/DB` (a libpq URL, "
        "several hosts allowed; see docs/postgresql.md). Absent: SQLite at `database.path`."),
    Key("database.backend", str, "sqlite", "Store backend when `store` is absent: `sqlite`."),
    Key("database.path", str, "keys.db", "SQLite database file (WAL mode; keep it on a local "
        "disk)."),
    Key("database.synchronous", str, "FULL", "SQLite `synchronous`: `NORMAL`, `FULL` (an "
        "acknowledged write survives a power cut) or `EXTRA`."),
    Key("database.pool_size", int, 8, "PostgreSQL: connections per worker process (1-1000)."),
    Key("database.pool_timeout", int, 5, "PostgreSQL: seconds a request waits for a database "
        "connection before it is answered 503, which clients retry (1-3600)."),
    Key("max_body", int, DEFAULT_MAX_BODY, "Largest request body in bytes (>= 1024)."),
    Key("batch.max_items", int, 64, "Most operations one `POST /crypto/v1/batch` may carry "
        "(1-4096); more: 413 BATCH_TOO_LARGE."),
    Key("batch.max_bytes", int, 1024 * 1024, "Largest batch request body in bytes (>= 1024; "
        "max_body when that is smaller); more: 413 BATCH_TOO_LARGE."),
    Key("activation_ttl", int, DEFAULT_ACTIVATION_TTL, "Seconds a softcard activation lasts."),
    Key("idempotency_ttl", int, 24 * 3600, "Seconds an `Idempotency-Key` and its answer are "
        "remembered."),
    Key("lockout.threshold", int, 5, "Wrong passphrases in a row before a softcard refuses "
        "activation (1-1000)."),
    Key("lockout.max_seconds", int, 300, "Longest refusal: after n failures the card refuses "
        "for min(2^(n - threshold), max_seconds) seconds."),
    Key("scrypt.n", int, DEFAULT_SCRYPT["n"], "scrypt cost N for new softcards (a power of two, "
        "2 to 2^20)."),
    Key("scrypt.r", int, DEFAULT_SCRYPT["r"], "scrypt block size r for new softcards (1-32)."),
    Key("scrypt.p", int, DEFAULT_SCRYPT["p"], "scrypt parallelism p for new softcards (1-16)."),
    Key("scrypt.max_concurrent", int, DEFAULT_SCRYPT_CONCURRENCY, "scrypt evaluations run at "
        "once per worker (1-64); the rest queue, so a guessing burst cannot take the threads "
        "other requests use."),
    Key("connections.max", int, DEFAULT_CONNECTIONS["max"], "Established TLS connections per "
        "worker; beyond it a new connection is closed at once (and logged), existing ones go "
        "on."),
    Key("connections.handshake_timeout", int, DEFAULT_CONNECTIONS["handshake_timeout"],
        "Seconds a connection may take to complete its TLS handshake."),
    Key("connections.keep_alive_timeout", int, DEFAULT_CONNECTIONS["keep_alive_timeout"],
        "Seconds a connection may sit idle before its first request or between requests."),
    Key("connections.header_timeout", int, DEFAULT_CONNECTIONS["header_timeout"], "Seconds from "
        "a request's first byte to the end of its headers (slow senders are closed)."),
    Key("connections.max_header_bytes", int, DEFAULT_CONNECTIONS["max_header_bytes"], "Largest "
        "request line and headers, in bytes; beyond: 431."),
    Key("connections.max_headers", int, DEFAULT_CONNECTIONS["max_headers"], "Most header lines "
        "of a request; beyond: 431."),
    Key("log.level", str, "INFO", "One of " + ", ".join(LOG_LEVELS) + "."),
    Key("log.file", str, None, "Log file path; absent or null: standard error."),
    Key("log.access", bool, True, "One access line per request: method, path, status, "
        "duration (never bodies)."),
    Key("log.audit", str, "log/audit.log", "Audit trail (mode 0600): one JSON line per state "
        "change, refused request and refused TLS handshake (time, request id, client identity, "
        "op, softcard, handle, outcome, code; never a secret)."),
    Key("clients", str, "clients.yaml", "Client identities: certificate fingerprint and/or "
        "subject -> name and role (`admin` or `app`), plus a `deny` list of revoked "
        "fingerprints. `issue-client` adds to it; re-read on SIGHUP."),
    Key("unlisted_clients", str, "refuse", "A certificate of the CA that `clients` does not "
        "list: `refuse` (403 CLIENT_NOT_AUTHORIZED, audited) or `app` (an app identity named "
        "`cert-` + 16 hex digits of its fingerprint)."),
    Key("crl", str, None, "A CRL of the CA (PEM or DER path): certificates it revokes are "
        "refused; re-read on SIGHUP. Absent or null: none."),
)
# fmt: on
_BY_NAME: Final = {k.name: k for k in KEYS}
_SECTIONS: Final = frozenset(k.name.split(".")[0] for k in KEYS if "." in k.name)


@dataclass(frozen=True)
class ScryptParams:
    n: int
    r: int
    p: int


@dataclass(frozen=True)
class Pkcs11Master:
    """master_pkcs11: an AES key held by a PKCS#11 token (python-pkcs11)."""

    module: Path  # the PKCS#11 library (for SoftHSM2: libsofthsm2.so)
    token: str  # token label
    key: str  # key label
    pin_file: Path | None  # a 0600 file holding the user PIN (never in the yaml or argv)


@dataclass(frozen=True)
class Connections:
    max: int
    handshake_timeout: int
    keep_alive_timeout: int
    header_timeout: int
    max_header_bytes: int
    max_headers: int


@dataclass(frozen=True)
class Settings:
    path: Path  # the yaml file
    host: str
    port: int
    admin_port: int | None
    workers: int
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    master_key: Path | None  # the master key file; None when master_pkcs11 is set
    database_backend: str  # the store's scheme: "sqlite" or "postgresql"
    database_path: Path  # the SQLite file (meaningful when database_backend is "sqlite")
    database_synchronous: str
    store: StoreConfig  # what store.open_store opens
    max_body: int
    batch_max_items: int
    batch_max_bytes: int
    activation_ttl: int
    idempotency_ttl: int
    lockout_threshold: int
    lockout_max_seconds: int
    scrypt: ScryptParams
    log_level: str
    log_file: Path | None
    access_log: bool
    audit_log: Path
    clients: Path  # the clients file (identities and roles, identity.py)
    unlisted_clients: str  # "refuse" | "app": certificates of the CA the clients file omits
    crl: Path | None  # a CRL of the CA: revoked serial numbers (re-read on SIGHUP)
    master_pkcs11: Pkcs11Master | None = None
    passphrase_min_length: int = DEFAULT_PASSPHRASE_MIN
    scrypt_concurrency: int = DEFAULT_SCRYPT_CONCURRENCY
    connections: Connections = Connections(**DEFAULT_CONNECTIONS)


def _v(raw: dict[str, Any], name: str) -> Any:
    """The value of KEYS[name] in the loaded yaml (its default when absent), type-checked."""
    key = _BY_NAME[name]
    section, _, leaf = name.rpartition(".")
    d = (raw.get(section) or {}) if section else raw
    value = d.get(leaf, key.default)
    if value is None and key.default is None:
        return None
    kind = key.kind
    if kind is int and (type(value) is not int):
        raise SettingsError(f"{name}: expected an integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise SettingsError(f"{name}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise SettingsError(f"{name}: expected a string, got {value!r}")
    return value


def _path(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def _positive(name: str, value: int, low: int = 1, high: int | None = None) -> int:
    if value < low or (high is not None and value > high):
        raise SettingsError(f"{name}: {value} out of range [{low}, {high if high else 'inf'}]")
    return value


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate server.yaml."""
    p = Path(path).resolve()
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{p}: expected a mapping at the top level")
    base = p.parent
    unknown = set(raw) - {k.name.split(".")[0] for k in KEYS}
    for section in _SECTIONS & set(raw):
        if raw[section] is not None and not isinstance(raw[section], dict):
            raise SettingsError(f"{section}: expected a mapping")
        leaves = {k.name for k in KEYS if k.name.startswith(section + ".")}
        unknown |= {f"{section}.{k}" for k in raw[section] or {}} - leaves
    if unknown:
        raise SettingsError(f"{p}: unknown keys {sorted(unknown)}")

    for k in ("tls.cert", "tls.key", "tls.ca"):
        if _v(raw, k) is None:
            raise SettingsError(f"{k}: required (a path)")
    backend = _v(raw, "database.backend")
    if backend != "sqlite":
        raise SettingsError(
            f"database.backend: {backend!r} is not supported (sqlite; for PostgreSQL set"
            " store: postgresql://USER@HOST:PORT/DB)"
        )
    sync = _v(raw, "database.synchronous").upper()
    if sync not in ("NORMAL", "FULL", "EXTRA"):
        raise SettingsError("database.synchronous: NORMAL, FULL or EXTRA")
    db_path = _path(base, _v(raw, "database.path"))
    url = _v(raw, "store")
    if url is None:
        url = f"sqlite:///{db_path}"  # the database: keys of before the store: URL
    else:
        try:
            scheme = scheme_of(url)
        except StoreError as exc:
            raise SettingsError(str(exc)) from None
        if scheme == "sqlite":
            if "path" in (raw.get("database") or {}):
                raise SettingsError("store and database.path both name the SQLite file")
            # sqlite:///rel/path is relative to this file's folder, sqlite:////abs/path absolute.
            rest = url.partition("://")[2]
            if not rest.startswith("/") or len(rest) < 2:
                raise SettingsError(f"store: {url!r}: expected sqlite:///PATH")
            db_path = _path(base, rest[1:])
            url = f"sqlite:///{db_path}"
        else:
            backend = "postgresql"
    store = StoreConfig(
        url=url,
        synchronous=sync,
        pool_size=_positive("database.pool_size", _v(raw, "database.pool_size"), 1, 1000),
        pool_timeout=_positive("database.pool_timeout", _v(raw, "database.pool_timeout"), 1, 3600),
    )
    n = _v(raw, "scrypt.n")
    if n < 2 or n & (n - 1):
        raise SettingsError("scrypt.n: a power of two >= 2")
    scrypt = ScryptParams(
        n=_positive("scrypt.n", n, 2, 2**20),
        r=_positive("scrypt.r", _v(raw, "scrypt.r"), 1, 32),
        p=_positive("scrypt.p", _v(raw, "scrypt.p"), 1, 16),
    )
    level = _v(raw, "log.level").upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"log.level: one of {', '.join(LOG_LEVELS)}")
    log_file = _v(raw, "log.file")
    admin_port = _v(raw, "admin_port")
    pkcs11 = {k: _v(raw, f"master_pkcs11.{k}") for k in ("module", "token", "key", "pin_file")}
    master_pkcs11 = None
    if any(v is not None for v in pkcs11.values()):
        for k, v in pkcs11.items():
            if v is None:
                raise SettingsError(
                    f"master_pkcs11.{k}: required with the other master_pkcs11 keys"
                )
        master_pkcs11 = Pkcs11Master(
            module=_path(base, pkcs11["module"]),
            token=pkcs11["token"],
            key=pkcs11["key"],
            pin_file=_path(base, pkcs11["pin_file"]),
        )
    conns = Connections(
        **{
            k: _positive(f"connections.{k}", _v(raw, f"connections.{k}"), 1)
            for k in DEFAULT_CONNECTIONS
        }
    )
    unlisted = _v(raw, "unlisted_clients")
    if unlisted not in ("refuse", "app"):
        raise SettingsError("unlisted_clients: refuse or app")
    crl = _v(raw, "crl")
    max_body = _positive("max_body", _v(raw, "max_body"), 1024)
    return Settings(
        path=p,
        host=_v(raw, "host"),
        port=_positive("port", _v(raw, "port"), 1, 65535),
        admin_port=None if admin_port is None else _positive("admin_port", admin_port, 1, 65535),
        workers=_positive("workers", _v(raw, "workers"), 1, 64),
        tls_cert=_path(base, _v(raw, "tls.cert")),
        tls_key=_path(base, _v(raw, "tls.key")),
        tls_ca=_path(base, _v(raw, "tls.ca")),
        master_key=None if master_pkcs11 else _path(base, _v(raw, "master_key")),
        master_pkcs11=master_pkcs11,
        passphrase_min_length=_positive(
            "passphrase_min_length", _v(raw, "passphrase_min_length"), 1, 256
        ),
        scrypt_concurrency=_positive(
            "scrypt.max_concurrent", _v(raw, "scrypt.max_concurrent"), 1, 64
        ),
        connections=conns,
        database_backend=backend,
        database_path=db_path,
        database_synchronous=sync,
        store=store,
        max_body=max_body,
        batch_max_items=_positive("batch.max_items", _v(raw, "batch.max_items"), 1, 4096),
        batch_max_bytes=min(
            _positive("batch.max_bytes", _v(raw, "batch.max_bytes"), 1024), max_body
        ),
        activation_ttl=_positive("activation_ttl", _v(raw, "activation_ttl")),
        idempotency_ttl=_positive("idempotency_ttl", _v(raw, "idempotency_ttl")),
        lockout_threshold=_positive("lockout.threshold", _v(raw, "lockout.threshold"), 1, 1000),
        lockout_max_seconds=_positive("lockout.max_seconds", _v(raw, "lockout.max_seconds"), 1),
        scrypt=scrypt,
        log_level=level,
        log_file=_path(base, log_file) if log_file else None,
        access_log=_v(raw, "log.access"),
        audit_log=_path(base, _v(raw, "log.audit")),
        clients=_path(base, _v(raw, "clients")),
        unlisted_clients=unlisted,
        crl=_path(base, crl) if crl else None,
    )


def markdown() -> str:
    """docs/server-yaml.md: the reference of every key, from KEYS."""
    out = [
        "# server.yaml reference",
        "",
        "<!-- Generated by `python -m pkcs11ws.server.settings`; edit KEYS in "
        "pkcs11ws/server/settings.py. -->",
        "",
        "The key service reads one YAML file (`pkcs11ws-server serve --config server.yaml`), "
        "once at start-up in each worker process. `pkcs11ws-server init DIR` writes a complete "
        "one. Nested keys are written as mappings (`lockout.threshold` is `threshold:` under "
        "`lockout:`). Relative paths are relative to the folder holding the file; `~` is "
        "expanded. Unknown keys are an error, so a misspelt key never silently falls back to "
        "its default.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for k in KEYS:
        default = "-" if k.default is None else f"`{json.dumps(k.default)}`"
        out.append(f"| `{k.name}` | {k.kind.__name__} | {default} | {k.doc} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
