"""The key service configuration (server.yaml): its keys, defaults, validation and loading.

Read once at start-up (each worker process reads it once); nothing re-reads it per request.
Relative paths are resolved against the folder holding the yaml file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

CONFIG_ENV: Final = "PKCS11WS_SERVER_CONFIG"  # how `serve` hands the yaml path to workers
# With --workers N > 1: the supervisor's PID, so that a worker knows it is one (app.create_app).
SUPERVISOR_ENV: Final = "PKCS11WS_SERVER_SUPERVISOR"
DEFAULT_PORT: Final = 18001
DEFAULT_MAX_BODY: Final = 8 * 1024 * 1024
DEFAULT_ACTIVATION_TTL: Final = 8 * 3600
DEFAULT_SCRYPT: Final = {"n": 2**15, "r": 8, "p": 1}
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(Exception):
    """server.yaml is missing, unreadable or holds an invalid value."""


@dataclass(frozen=True)
class ScryptParams:
    n: int
    r: int
    p: int


@dataclass(frozen=True)
class Settings:
    path: Path  # the yaml file
    host: str
    port: int
    workers: int
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    master_key: Path
    database_backend: str
    database_path: Path
    database_synchronous: str
    max_body: int
    activation_ttl: int
    idempotency_ttl: int
    lockout_threshold: int
    lockout_max_seconds: int
    scrypt: ScryptParams
    log_level: str
    log_file: Path | None
    access_log: bool


def _get(d: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = d.get(key, default)
    if value is None and default is None:
        return None
    if kind is int and (type(value) is not int):
        raise SettingsError(f"{where}{key}: expected an integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise SettingsError(f"{where}{key}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise SettingsError(f"{where}{key}: expected a string, got {value!r}")
    if kind is dict and not isinstance(value, dict):
        raise SettingsError(f"{where}{key}: expected a mapping")
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
    known = {"host", "port", "workers", "tls", "master_key", "database", "max_body",
             "activation_ttl", "idempotency_ttl", "lockout", "scrypt", "log"}  # fmt: skip
    unknown = set(raw) - known
    if unknown:
        raise SettingsError(f"{p}: unknown keys {sorted(unknown)}")

    tls = _get(raw, "tls", dict, {}, "")
    for k in ("cert", "key", "ca"):
        if not isinstance(tls.get(k), str):
            raise SettingsError(f"tls.{k}: required (a path)")
    db = _get(raw, "database", dict, {}, "")
    backend = _get(db, "backend", str, "sqlite", "database.")
    if backend != "sqlite":
        raise SettingsError(f"database.backend: {backend!r} is not supported (sqlite)")
    sync = _get(db, "synchronous", str, "FULL", "database.").upper()
    if sync not in ("NORMAL", "FULL", "EXTRA"):
        raise SettingsError("database.synchronous: NORMAL, FULL or EXTRA")
    sc = _get(raw, "scrypt", dict, dict(DEFAULT_SCRYPT), "")
    n = _get(sc, "n", int, DEFAULT_SCRYPT["n"], "scrypt.")
    if n < 2 or n & (n - 1):
        raise SettingsError("scrypt.n: a power of two >= 2")
    scrypt = ScryptParams(
        n=_positive("scrypt.n", n, 2, 2**20),
        r=_positive("scrypt.r", _get(sc, "r", int, DEFAULT_SCRYPT["r"], "scrypt."), 1, 32),
        p=_positive("scrypt.p", _get(sc, "p", int, DEFAULT_SCRYPT["p"], "scrypt."), 1, 16),
    )
    log = _get(raw, "log", dict, {}, "")
    level = _get(log, "level", str, "INFO", "log.").upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"log.level: one of {', '.join(LOG_LEVELS)}")
    log_file = _get(log, "file", str, None, "log.")
    lockout = _get(raw, "lockout", dict, {}, "")
    return Settings(
        path=p,
        host=_get(raw, "host", str, "127.0.0.1", ""),
        port=_positive("port", _get(raw, "port", int, DEFAULT_PORT, ""), 1, 65535),
        workers=_positive("workers", _get(raw, "workers", int, 1, ""), 1, 64),
        tls_cert=_path(base, tls["cert"]),
        tls_key=_path(base, tls["key"]),
        tls_ca=_path(base, tls["ca"]),
        master_key=_path(base, _get(raw, "master_key", str, "master.key", "")),
        database_backend=backend,
        database_path=_path(base, _get(db, "path", str, "keys.db", "database.")),
        database_synchronous=sync,
        max_body=_positive("max_body", _get(raw, "max_body", int, DEFAULT_MAX_BODY, ""), 1024),
        activation_ttl=_positive(
            "activation_ttl", _get(raw, "activation_ttl", int, DEFAULT_ACTIVATION_TTL, "")
        ),
        idempotency_ttl=_positive(
            "idempotency_ttl", _get(raw, "idempotency_ttl", int, 24 * 3600, "")
        ),
        lockout_threshold=_positive(
            "lockout.threshold", _get(lockout, "threshold", int, 5, "lockout."), 1, 1000
        ),
        lockout_max_seconds=_positive(
            "lockout.max_seconds", _get(lockout, "max_seconds", int, 300, "lockout."), 1
        ),
        scrypt=scrypt,
        log_level=level,
        log_file=_path(base, log_file) if log_file else None,
        access_log=_get(log, "access", bool, True, "log."),
    )
