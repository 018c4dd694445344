"""The module's configuration: the WSOP `pkcs11webservices.cfg` file plus environment overrides.

Format (as the original library's): one `KEY value` per line, key and value separated by
whitespace, the value is the rest of the line with surrounding blanks trimmed; lines whose first
non-blank character is `#` and blank lines are ignored. Keys are matched case-insensitively.

Where the file is: an explicit path (C_Initialize pReserved "config=PATH"), else $PKCS11WS_CONFIG,
else the WSOP default location. Every key can be overridden by $PKCS11WS_<KEY>; the environment
wins and Config.overrides names the variables that applied. Relative file paths in the file are
resolved against the file's directory (so a generated config can sit next to its certificates);
relative paths in the environment against the current directory.

Invalid values raise ConfigError naming the file and line (or the variable) and the reason.
Windows-only, unknown and duplicate keys only warn; Config.warnings carries the text so the
provider can log it once logging is configured.
"""

from __future__ import annotations

import os
import re

from pkcs11ws.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from dataclasses import dataclass
    from typing import Any, Final
else:  # dataclasses imports inspect: too heavy for the module's start-up
    from pkcs11ws._lite import dataclass

DEFAULT_PATH: Final = "/opt/nfast/webservices/pkcs11/conf/pkcs11webservices.cfg"
DEFAULT_LOGFILEPATH: Final = "/opt/nfast/webservices/pkcs11/log/pkcs11webservices.log"
ENV_CONFIG: Final = "PKCS11WS_CONFIG"
ENV_PREFIX: Final = "PKCS11WS_"
WINDOWS_ONLY: Final = ("CERTNAME", "CERTSTORE", "STORETYPE", "EVENTLOG")


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    cert: str
    key: str
    auth: str
    loglevel: int
    logstdout: bool
    logsys: bool
    logfilepath: str
    maxretries: int
    retrydelay: int
    connecttimeout: int
    timeout: int
    path: str
    overrides: tuple[str, ...]
    warnings: tuple[str, ...]


class _Invalid(Exception):
    """A value a parser refuses; the caller adds where it came from."""


_INT_RE: Final = re.compile(r"^[0-9]+$")
# Host names, IPv4 literals, and IPv6 literals with or without brackets.
_HOST_RE: Final = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[?[0-9A-Fa-f:.]+\]?)$")


def _int(lo: int, hi: int | None) -> Callable[[str, str], Any]:
    def parse(value: str, base: str) -> int:
        if not _INT_RE.match(value):
            raise _Invalid(f"{value!r} is not an integer")
        n = int(value)
        if n < lo or (hi is not None and n > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise _Invalid(f"{n} is out of range ({bound})")
        return n

    return parse


def _flag(value: str, base: str) -> bool:
    if value not in ("0", "1"):
        raise _Invalid(f"{value!r} is not 0 or 1")
    return value == "1"


def _host(value: str, base: str) -> str:
    if "://" in value or "/" in value:
        raise _Invalid(f"{value!r} is not a host name (give the name only, no scheme or path)")
    if not _HOST_RE.match(value):
        raise _Invalid(f"{value!r} is not a valid host name or address")
    return value


def _abspath(value: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _readable_file(value: str, base: str) -> str:
    path = _abspath(value, base)
    if not os.path.exists(path):
        raise _Invalid(f"file {path} does not exist")
    if not os.path.isfile(path):
        raise _Invalid(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise _Invalid(f"file {path} is not readable")
    return path


def _log_path(value: str, base: str) -> str:
    # Not checked here: the logger warns once on stderr when it cannot open the file.
    return _abspath(value, base)


@dataclass(frozen=True)
class _Key:
    parse: Callable[[str, str], Any]
    default: Any  # None: required


KEYS: Final[dict[str, _Key]] = {
    "HOST": _Key(_host, None),
    "PORT": _Key(_int(1, 65535), 18001),
    "CERT": _Key(_readable_file, None),
    "KEY": _Key(_readable_file, None),
    "AUTH": _Key(_readable_file, None),
    "LOGLEVEL": _Key(_int(0, 6), 4),
    "LOGSTDOUT": _Key(_flag, False),
    "LOGSYS": _Key(_flag, False),
    "LOGFILEPATH": _Key(_log_path, DEFAULT_LOGFILEPATH),
    "MAXRETRIES": _Key(_int(0, 256), 5),
    "RETRYDELAY": _Key(_int(0, None), 10),
    # Our own keys (not in WSOP): libcurl connect timeout and total time per request attempt.
    "CONNECTTIMEOUT": _Key(_int(1, 3600), 10),
    "TIMEOUT": _Key(_int(1, 86400), 60),
}


def config_path(environ: Mapping[str, str] | None = None) -> str:
    """The file to read when no explicit path is given: $PKCS11WS_CONFIG, else the default."""
    env = os.environ if environ is None else environ
    return env.get(ENV_CONFIG) or DEFAULT_PATH


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return text.splitlines()


_LOG_KEYS: Final = ("LOGLEVEL", "LOGFILEPATH", "LOGSTDOUT", "LOGSYS")


def log_settings(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int, str, bool, bool]:
    """(LOGLEVEL, LOGFILEPATH, LOGSTDOUT, LOGSYS) read leniently: a missing or invalid value,
    or an unreadable file, gives the default. For reporting a configuration load_config refused.
    """
    env = os.environ if environ is None else environ
    path = os.path.abspath(path or config_path(env))
    raw: dict[str, str] = {}
    try:
        lines = _read_lines(path)
    except ConfigError:
        lines = []
    for line in lines:
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() in _LOG_KEYS:
            raw[parts[0].upper()] = parts[1].strip()
    out: list[Any] = []
    for key in _LOG_KEYS:
        spec = KEYS[key]
        var = ENV_PREFIX + key
        if var in env:
            value, base = env[var].strip(), os.getcwd()
        else:
            value, base = raw.get(key, ""), os.path.dirname(path)
        try:
            out.append(spec.parse(value, base) if value else spec.default)
        except _Invalid:
            out.append(spec.default)
    return out[0], out[1], out[2], out[3]


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError on the first invalid value."""
    env = os.environ if environ is None else environ
    path = os.path.abspath(path or config_path(env))
    base = os.path.dirname(path)
    warnings: list[str] = []
    # key -> (raw value, line number)
    raw: dict[str, tuple[str, int]] = {}

    for lineno, line in enumerate(_read_lines(path), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(None, 1)
        key = parts[0].upper()
        value = parts[1].strip() if len(parts) > 1 else ""
        where = f"{path}:{lineno}"
        if key in WINDOWS_ONLY:
            warnings.append(f"{where}: {key} is a Windows-only setting; ignored on this platform")
            continue
        if key not in KEYS:
            warnings.append(f"{where}: unknown key {parts[0]!r} ignored")
            continue
        if key in raw:
            warnings.append(
                f"{where}: duplicate key {key} (first at line {raw[key][1]}); the last one wins"
            )
        if not value:
            raise ConfigError(f"{where}: {key} has no value")
        raw[key] = (value, lineno)

    values: dict[str, Any] = {}
    overrides: list[str] = []
    for key, spec in KEYS.items():
        var = ENV_PREFIX + key
        if var in env:
            value = env[var].strip()
            overrides.append(var)
            if not value:
                raise ConfigError(f"environment variable {var}: empty value")
            try:
                values[key.lower()] = spec.parse(value, os.getcwd())
            except _Invalid as e:
                raise ConfigError(f"environment variable {var}: {key}: {e}") from None
        elif key in raw:
            value, lineno = raw[key]
            try:
                values[key.lower()] = spec.parse(value, base)
            except _Invalid as e:
                raise ConfigError(f"{path}:{lineno}: {key}: {e}") from None
        elif spec.default is None:
            raise ConfigError(f"{path}: {key} is required (no {key} line and no ${var})")
        else:
            values[key.lower()] = spec.default

    return Config(
        **values,
        path=path,
        overrides=tuple(overrides),
        warnings=tuple(warnings),
    )
