"""The module's configuration: the WSOP `pkcs11webservices.cfg` file plus environment overrides.

Format (as the original library's): one `KEY value` per line, key and value separated by
whitespace, the value is the rest of the line with surrounding blanks trimmed; lines whose first
non-blank character is `#` and blank lines are ignored. Keys are matched case-insensitively.

Where the file is: an explicit path (C_Initialize pReserved "config=PATH"), else $PKCS11WS_CONFIG,
else the WSOP default location. Every key can be overridden by $PKCS11WS_<KEY>; the environment
wins and Config.overrides names the variables that applied. Relative file paths in the file are
resolved against the file's directory (so a generated config can sit next to its certificates);
relative paths in the environment against the current directory.

HOST may list several key service replicas, comma-separated: `a.example:18001, b.example`; an
entry without a port takes PORT, an IPv6 literal is written in brackets (`[2001:db8::1]:18001`).
Config.servers is that list as (host, port) pairs, in the order given.

Invalid values raise ConfigError naming the file and line (or the variable) and the reason.
Windows-only, unknown and duplicate keys only warn; Config.warnings carries the text so the
provider can log it once logging is configured.
"""

from __future__ import annotations

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)
from pkcs11ws._lite import dataclass
from pkcs11ws.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, Final

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
    batchinflight: int = 2
    batchsize: int = 32

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """The key services HOST lists, as (host, port); host is bare (no IPv6 brackets)."""
        return parse_servers(self.host, self.port)

    def where(self) -> str:
        """The key service(s) for messages: host:port[, host:port ...]."""
        return ", ".join(server_label(h, p) for h, p in self.servers)


class _Invalid(Exception):
    """A value a parser refuses; the caller adds where it came from."""


# Character sets instead of regular expressions: `re` costs every process that loads the module
# ~7 M instructions to import. (A value never ends in a newline here: `$` let one through.)
_DIGITS: Final = frozenset("0123456789")
_ALNUM: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# Host names and IPv4 literals: a letter or digit, then up to 252 of these.
_NAME_CHARS: Final = _ALNUM | frozenset(".-")
_IPV6_CHARS: Final = frozenset("0123456789ABCDEFabcdef:.")


def _is_int(text: str) -> bool:
    return text != "" and _DIGITS.issuperset(text)


def _is_name(text: str) -> bool:
    return 0 < len(text) <= 253 and text[0] in _ALNUM and _NAME_CHARS.issuperset(text)


def _is_ipv6_chars(text: str) -> bool:
    return text != "" and _IPV6_CHARS.issuperset(text)


MAX_SERVERS: Final = 16


def _int(lo: int, hi: int | None) -> Callable[[str, str], Any]:
    def parse(value: str, base: str) -> int:
        if not _is_int(value):
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


def server_label(host: str, port: int) -> str:
    """host:port as a URL writes it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server(entry: str, port: int) -> tuple[str, int]:
    """One HOST entry: name, name:port, IPv4[:port], [IPv6][:port] or a bare IPv6 literal."""
    if "://" in entry or "/" in entry:
        raise _Invalid(f"{entry!r} is not a host name (give the name only, no scheme or path)")
    host, sep, port_text = entry, "", ""
    if entry.startswith("["):
        close = entry.find("]")
        host, rest = entry[1:close], entry[close + 1 :]
        if close < 0 or not _is_ipv6_chars(host) or host.count(":") < 2 or "[" in host:
            raise _Invalid(f"{entry!r} is not a valid [IPv6] address")
        if rest:
            sep, port_text = rest[:1], rest[1:]
            if sep != ":":
                raise _Invalid(f"{entry!r}: expected :PORT after the ]")
    elif entry.count(":") == 1:
        host, sep, port_text = entry.partition(":")
    elif ":" in entry:  # a bare IPv6 literal takes PORT
        if not _is_ipv6_chars(entry) or entry.count(":") < 2:
            raise _Invalid(f"{entry!r} is not a valid host name or address")
        return entry, port
    if ":" not in host and not _is_name(host):
        raise _Invalid(f"{entry!r} is not a valid host name or address")
    if sep:
        if not _is_int(port_text) or not 1 <= int(port_text) <= 65535:
            raise _Invalid(f"{entry!r}: the port must be 1..65535")
        port = int(port_text)
    return host, port


def parse_servers(value: str, port: int) -> tuple[tuple[str, int], ...]:
    """HOST's list of servers as (host, port) pairs; raises ValueError on junk."""
    try:
        return _servers(value, port)
    except _Invalid as e:
        raise ValueError(str(e)) from None


def _servers(value: str, port: int) -> tuple[tuple[str, int], ...]:
    entries = [e.strip() for e in value.split(",")]
    if any(not e for e in entries):
        raise _Invalid(f"{value!r} has an empty entry (servers are separated by one comma)")
    if len(entries) > MAX_SERVERS:
        raise _Invalid(f"{len(entries)} servers listed; at most {MAX_SERVERS}")
    out: list[tuple[str, int]] = []
    for entry in entries:
        if any(c.isspace() for c in entry):
            raise _Invalid(f"{entry!r} contains a blank (separate servers with commas)")
        server = _server(entry, port)
        if (server[0].lower(), server[1]) in {(h.lower(), p) for h, p in out}:
            raise _Invalid(f"{server_label(*server)} is listed twice")
        out.append(server)
    return tuple(out)


def _host(value: str, base: str) -> str:
    _servers(value, 1)  # syntax only: the ports of bare entries are checked against PORT later
    return ", ".join(e.strip() for e in value.split(","))


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
    # Our own keys (not in WSOP): libcurl's connect timeout per attempt, and the total time one
    # call may take with all its attempts, failovers and retry delays (issue 10: a call must
    # never block for minutes when the service is down).
    "CONNECTTIMEOUT": _Key(_int(1, 3600), 10),
    "TIMEOUT": _Key(_int(1, 3600), 30),
    # Group commit (issue 15, client/group.py): at most BATCHINFLIGHT requests per server in
    # flight; calls that arrive while requests are in flight may wait and leave together in
    # one batch request of at most BATCHSIZE calls.
    "BATCHINFLIGHT": _Key(_int(0, 64), 2),
    "BATCHSIZE": _Key(_int(1, 4096), 32),
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
    # UTF-8 after an optional byte order mark: what the utf-8-sig codec does, without importing
    # its module (encodings.utf_8_sig) in every process that loads the PKCS#11 module.
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
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

    if "host" in values:
        try:
            _servers(values["host"], values["port"])
        except _Invalid as e:  # a duplicate only once bare names took PORT
            raise ConfigError(f"{path}: HOST: {e}") from None
    return Config(
        **values,
        path=path,
        overrides=tuple(overrides),
        warnings=tuple(warnings),
    )
