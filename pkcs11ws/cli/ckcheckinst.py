"""ckcheckinst: check an installation end to end (WSOP user guide 5), one line per check.

    ckcheckinst [--config PATH] [--library PATH] [--softcard NAME]

Checks, in order: the configuration file (which file, which PKCS11WS_* variables override it);
CERT, KEY and AUTH (readable, parse, the key matches the certificate, nothing expired); the key
service (TLS handshake and /health, without retries); the PKCS#11 module through its C ABI
(dlopen, C_Initialize, C_GetInfo) and its slots and tokens. With --softcard NAME it also logs in
to that softcard (passphrase prompted without echo on a terminal, else one line of stdin; never
argv) and runs a self-test through the module: a temporary AES key and HMAC key are generated,
used to encrypt/decrypt and sign/verify, and destroyed.

Each check prints `OK`, `FAILED` (with the reason and the fix) or `SKIPPED` (a check it depends
on failed). Exit status 0 when every check passed, 1 when one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import stat
import sys
from collections.abc import Callable
from typing import TextIO, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pkcs11ws import __version__, _lite, protocol
from pkcs11ws.cli import ckfmt, selftest
from pkcs11ws.cli.ckabi import CKError, Library, LoadError
from pkcs11ws.cli.common import UsageError, default_library, err, pipe_safe, read_passphrase
from pkcs11ws.config import DEFAULT_PATH, ENV_CONFIG, Config, load_config, server_label
from pkcs11ws.errors import ConfigError

PROG = "ckcheckinst"
# Set by the launchers `python -m pkcs11ws install` writes, when they chose the config file.
ENV_CONFIG_SOURCE = "PKCS11WS_CONFIG_SOURCE"
T = TypeVar("T")


class Report:
    """Prints one line per check and counts the outcomes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def _line(self, word: str, name: str, text: str) -> None:
        self.out.write(f"{word:<8}{name}: {text}\n")
        self.out.flush()

    def ok(self, name: str, detail: str, notes: tuple[str, ...] | list[str] = ()) -> None:
        self.passed += 1
        self._line("OK", name, detail)
        for note in notes:
            self.out.write(f"{'':<10}{note}\n")

    def fail(self, name: str, reason: str, fix: str) -> None:
        self.failed += 1
        self._line("FAILED", name, f"{reason.rstrip('.')}. Fix: {fix}")

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        self._line("SKIPPED", name, why)

    def warn(self, name: str, text: str) -> None:
        self._line("WARNING", name, text)


# ------------------------------------------------------------------------------------------
# Configuration and the TLS files


def config_source(explicit: bool) -> str:
    if explicit:
        return "given with --config"
    if os.environ.get(ENV_CONFIG):
        if os.environ.get(ENV_CONFIG_SOURCE) == "launcher":
            return f"${ENV_CONFIG}, set by the install's launcher script"
        return f"from ${ENV_CONFIG}"
    return "the default location"


def check_config(rep: Report, explicit: bool) -> Config | None:
    source = config_source(explicit)
    try:
        cfg = load_config()
    except ConfigError as e:
        missing = os.environ.get(ENV_CONFIG) or DEFAULT_PATH
        example = os.path.join(
            os.path.dirname(os.path.abspath(missing)), "example_" + os.path.basename(missing)
        )
        if "configuration file not found" in e.message and os.path.isfile(example):
            fix = f"copy {example} to {missing} and edit it (HOST, PORT, CERT, KEY, AUTH)"
        elif "configuration file not found" in e.message:
            fix = (
                f"copy conf/example_pkcs11webservices.cfg to pkcs11webservices.cfg and edit "
                f"it, or point ${ENV_CONFIG} (or --config) at your file; without either the "
                f"module reads {DEFAULT_PATH}"
            )
        else:
            fix = "correct the file line or the environment variable named above"
        rep.fail("configuration", f"{e.message} ({source})", fix)
        return None
    overrides = (
        "PKCS11WS_* environment overrides: " + ", ".join(cfg.overrides)
        if cfg.overrides
        else "no PKCS11WS_* environment overrides"
    )
    rep.ok("configuration", f"{cfg.path} ({source}); key service {cfg.where()}", [overrides])
    for w in cfg.warnings:
        rep.warn("configuration", w)
    return cfg


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _validity(rep: Report, name: str, cert: x509.Certificate, role: str, fix: str) -> bool:
    now = dt.datetime.now(dt.UTC)
    subject = cert.subject.rfc4514_string()
    if now < cert.not_valid_before_utc:
        rep.fail(
            name,
            f"{role} {subject!r} is not valid before {_when(cert.not_valid_before_utc)}",
            "check this machine's clock, or " + fix,
        )
        return False
    if now > cert.not_valid_after_utc:
        rep.fail(name, f"{role} {subject!r} expired on {_when(cert.not_valid_after_utc)}", fix)
        return False
    return True


def _read(rep: Report, name: str, path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        rep.fail(
            name,
            f"cannot read {path}: {e.strerror}",
            "make the file readable by the user running the application",
        )
        return None


def check_cert(rep: Report, cfg: Config) -> x509.Certificate | None:
    name = "CERT"
    data = _read(rep, name, cfg.cert)
    if data is None:
        return None
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        rep.fail(
            name,
            f"{cfg.cert} is not a PEM X.509 certificate",
            "CERT must name the client certificate, in PEM format",
        )
        return None
    fix = "issue a new client certificate and point CERT at it"
    if not _validity(rep, name, cert, "the client certificate", fix):
        return cert
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    rep.ok(
        name,
        f"{cfg.cert}: {cert.subject.rfc4514_string()}, issued by "
        f"{cert.issuer.rfc4514_string()}, valid until "
        f"{_when(cert.not_valid_after_utc)} ({days} days left)",
    )
    return cert


def check_key(rep: Report, cfg: Config, cert: x509.Certificate | None) -> None:
    name = "KEY"
    data = _read(rep, name, cfg.key)
    if data is None:
        return
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        rep.fail(
            name,
            f"{cfg.key} is encrypted with a password",
            "the module needs an unencrypted PEM key (openssl pkey -in KEY -out NEW), "
            "kept readable only by its user",
        )
        return
    except (ValueError, UnsupportedAlgorithm):
        rep.fail(
            name,
            f"{cfg.key} is not a PEM private key",
            "KEY must name the client certificate's private key, in PEM format",
        )
        return
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert is not None and (
        cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki)
    ):
        rep.fail(
            name,
            f"{cfg.key} does not match the certificate in CERT ({cfg.cert})",
            "KEY must be the private key of the certificate CERT names",
        )
        return
    match = "matches CERT" if cert is not None else "CERT not parsed"
    rep.ok(name, f"{cfg.key}: {_key_kind(key)} private key, {match}")
    mode = os.stat(cfg.key).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        rep.warn(
            name,
            f"{cfg.key} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it",
        )


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}-bit"
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey") or "a"


def check_auth(rep: Report, cfg: Config) -> None:
    name = "AUTH"
    data = _read(rep, name, cfg.auth)
    if data is None:
        return
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError:
        rep.fail(
            name,
            f"{cfg.auth} holds no PEM X.509 certificate",
            "AUTH must name the CA certificate that signed the key service's "
            "certificate, in PEM format",
        )
        return
    fix = "get the key service's current CA certificate and point AUTH at it"
    for ca in cas:
        if not _validity(rep, name, ca, "the CA certificate", fix):
            return
    first = cas[0]
    more = f" and {len(cas) - 1} more" if len(cas) > 1 else ""
    rep.ok(
        name,
        f"{cfg.auth}: CA {first.subject.rfc4514_string()}{more}, valid until "
        f"{_when(first.not_valid_after_utc)}",
    )


# ------------------------------------------------------------------------------------------
# The key service


def connection_fix(message: str, cfg: Config) -> str:
    """What to do about a failed connection, from libcurl's message."""
    m = message.lower()
    where = f"{cfg.host}:{cfg.port}"
    if "refused this client certificate" in m:
        return (
            "CERT must be a valid (not expired) client certificate signed by a CA the key "
            "service trusts (its tls.ca), with KEY its private key"
        )
    if "resolve" in m:
        return f"HOST {cfg.host} does not resolve: correct HOST"
    if "refused" in m or "couldn't connect" in m or "failed to connect" in m:
        return (
            f"nothing accepts connections at {where}: start the key service "
            "(pkcs11ws-server serve) or correct HOST and PORT"
        )
    if "timed out" in m or "timeout" in m:
        return f"no answer from {where} in time: check HOST, PORT and any firewall between"
    if "subject name" in m or "no alternative certificate subject" in m or "hostname" in m:
        return f"HOST {cfg.host} must be a name in the key service's certificate"
    if (
        "certificate problem" in m
        or "peer certificate" in m
        or "self-signed" in m
        or "self signed" in m
        or "unable to get local issuer" in m
    ):
        return (
            "the key service's certificate is not signed by the CA in AUTH: AUTH must be "
            "the CA certificate that signed the service's certificate"
        )
    if "set private key" in m or "client certificate" in m or "unable to use" in m:
        return "libcurl cannot use CERT with KEY: KEY must be CERT's private key, both in PEM"
    if "reset by peer" in m or "recv failure" in m or "unexpected eof" in m:
        return (
            "the key service closed the connection during the TLS handshake, which is how it "
            "refuses a client certificate: CERT must be a valid certificate signed by a CA the "
            "service trusts (its tls.ca), with KEY its private key"
        )
    if "alert" in m or "handshake" in m or "certificate" in m or "ssl" in m or "tls" in m:
        return (
            "the key service refused the TLS handshake: CERT must be a valid client "
            "certificate signed by a CA the service trusts, with KEY its private key"
        )
    return "check HOST, PORT, CERT, KEY and AUTH, and that the key service runs"


def check_service(rep: Report, cfg: Config) -> bool:
    """Check every key service HOST lists (one line each); True when at least one answers."""
    servers = cfg.servers
    ok = False
    for i, (host, port) in enumerate(servers, 1):
        one = _lite.replace(cfg, host=f"[{host}]" if ":" in host else host, port=port)
        name = "key service" if len(servers) == 1 else f"key service #{i}"
        ok = _check_one_service(rep, one, name) or ok
    return ok


def _check_one_service(rep: Report, cfg: Config, name: str) -> bool:
    from pkcs11ws.errors import InstallationError, PKCS11Error, ServiceError

    url = f"https://{server_label(*cfg.servers[0])}"
    # One attempt: a check reports at once instead of waiting through MAXRETRIES x RETRYDELAY.
    quick = _lite.replace(
        cfg, maxretries=0, connecttimeout=min(cfg.connecttimeout, 10), timeout=min(cfg.timeout, 30)
    )
    try:
        from pkcs11ws.client.api import KeyServiceClient

        client = KeyServiceClient(quick)
    except InstallationError as e:
        rep.fail(name, f"the HTTPS client cannot start: {e.message}", "run the fix it gives")
        return False
    except ImportError as e:
        rep.fail(name, f"the HTTPS client cannot start: {e}", "reinstall pycurl as it says")
        return False
    try:
        h = client.health()
    except ServiceError as e:
        rep.fail(
            name,
            f"{url} answered /health with {e.code} (HTTP {e.http}): {e.message}",
            "check that HOST and PORT name a pkcs11ws key service",
        )
        return False
    except PKCS11Error as e:
        text = e.message if url in e.message else f"{url}: {e.message}"
        rep.fail(name, text, connection_fix(e.message, cfg))
        return False
    finally:
        client.close()
    rep.ok(
        name,
        f"{url}: TLS handshake with the client certificate and /health answered "
        f"({h['status']}; pkcs11ws-server {h['version']}, protocol {h['protocol']})",
    )
    if h["protocol"] != protocol.VERSION:
        rep.warn(
            name, f"the service speaks protocol {h['protocol']}, this client {protocol.VERSION}"
        )
    return True


# ------------------------------------------------------------------------------------------
# The module


def check_module(rep: Report, path: str | None, cfg: Config | None) -> Library | None:
    name = "module"
    if path is None:
        try:
            path = default_library()
        except FileNotFoundError as e:
            rep.fail(
                name,
                str(e),
                "build it with `make build` (pip install -e .), or pass --library PATH",
            )
            return None
    try:
        lib = Library(path)
    except LoadError as e:
        fix = "pass --library PATH of a PKCS#11 module, or rebuild ours with `make build`"
        rep.fail(name, str(e), fix)
        return None
    try:
        lib.initialize()
        info = lib.info()
    except CKError as e:
        if cfg is None:
            fix = "correct the configuration first (see its check above)"
        else:
            fix = f"see the module's log file {cfg.logfilepath} (LOGLEVEL 6 says the most)"
        rep.fail(name, f"{path}: {e}", fix)
        return None
    rep.ok(
        name,
        f"{path}: {info.description} {info.library_version} by {info.manufacturer}, "
        f"Cryptoki {info.cryptoki_version}; C_Initialize and C_GetInfo work",
    )
    return lib


def check_slots(rep: Report, lib: Library) -> list[tuple[int, str]] | None:
    name = "slots and tokens"
    try:
        every = lib.slots(token_present=False)
        tokens = []
        notes = []
        for slot in every:
            si = lib.slot_info(slot)
            if not si.token_present:
                notes.append(f"slot {slot}: no token")
                continue
            t = lib.token_info(slot)
            tokens.append((slot, t.label))
            notes.append(
                f"slot {slot}: token {t.label!r}, serial {t.serial}, "
                f"{ckfmt.flags(t.flags, ckfmt.TOKEN_FLAGS)}"
            )
    except CKError as e:
        rep.fail(
            name,
            str(e),
            "the module cannot list the softcards: see the key service check "
            "above and the module's log",
        )
        return None
    if not tokens:
        notes.append("no softcards yet: create one with `softcardtool -g --name=NAME`")
    rep.ok(name, f"{len(every)} slot(s), {len(tokens)} token(s)", notes)
    return tokens


def _guard(rep: Report, name: str, fix: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except CKError as e:
        rep.fail(name, str(e), fix)
        return None


def _is_ours(path: str) -> bool:
    try:
        return os.path.samefile(path, default_library())
    except OSError:  # FileNotFoundError included: not built, or no such file
        return False


def run_checks(args: argparse.Namespace, passphrase: bytes | None, out: TextIO) -> Report:
    rep = Report(out)
    out.write(f"{PROG} (pkcs11ws {__version__}): checking the installation\n")
    cfg = check_config(rep, explicit=args.config is not None)
    service_ok = False
    if cfg is None:
        for what in ("CERT", "KEY", "AUTH", "key service"):
            rep.skip(what, "needs a valid configuration")
    else:
        cert = check_cert(rep, cfg)
        check_key(rep, cfg, cert)
        check_auth(rep, cfg)
        service_ok = check_service(rep, cfg)
    lib = check_module(rep, args.library, cfg)
    if lib is None:
        rep.skip("slots and tokens", "needs the module")
        if args.softcard:
            rep.skip("self-test", "needs the module")
        return rep
    try:
        ours = args.library is None or _is_ours(args.library)
        if ours and not service_ok:
            rep.skip("slots and tokens", "needs the key service")
            tokens = None
        else:
            tokens = check_slots(rep, lib)
        if args.softcard:
            if tokens is None:
                rep.skip("self-test", "needs the slot list")
            else:
                assert passphrase is not None
                selftest.run(rep, lib, tokens, args.softcard, passphrase)
    finally:
        _guard(rep, "module", "see the module's log", lib.finalize)
    return rep


@pipe_safe
def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Check the pkcs11ws installation: configuration, TLS files, key service, "
        "PKCS#11 module.",
    )
    ap.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${ENV_CONFIG}, else {DEFAULT_PATH})",
    )
    ap.add_argument(
        "--library", metavar="PATH", help="PKCS#11 module to load (default: the pkcs11ws module)"
    )
    ap.add_argument(
        "--softcard",
        metavar="NAME",
        help="also log in to this softcard and run a "
        "self-test (the passphrase is prompted for, or read from standard input)",
    )
    ap.add_argument(
        "-V", "--version", action="version", version=f"%(prog)s (pkcs11ws {__version__})"
    )
    args = ap.parse_args(argv)
    if args.config is not None:
        # The module loaded below reads the same variable.
        os.environ[ENV_CONFIG] = os.path.abspath(args.config)
        os.environ.pop(ENV_CONFIG_SOURCE, None)
    if args.library is not None:
        args.library = os.path.abspath(args.library)
    passphrase = None
    if args.softcard:
        try:
            passphrase = read_passphrase(
                stdin or sys.stdin, f"Passphrase of softcard {args.softcard!r}: "
            )
        except UsageError as e:
            err(PROG, str(e))
            return 2
    rep = run_checks(args, passphrase, sys.stdout)
    total = rep.passed + rep.failed
    if rep.failed:
        print(
            f"{PROG}: {rep.failed} of {total} checks FAILED"
            + (f", {rep.skipped} skipped" if rep.skipped else "")
        )
        return 1
    print(f"{PROG}: all {total} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
