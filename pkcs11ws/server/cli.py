"""The `pkcs11ws-server` command: `init DIR` (development PKI and config), `issue-client`
(a client identity: certificate, key, module config, registered in the clients file), `migrate`
(bring the store's schema up to date), `serve` (which migrates first too), and `backup` /
`restore` of the store (backup.py).

`serve` runs uvicorn in the foreground over TLS 1.2+ with a required client certificate verified
against the configured CA. The app is built by an import-string factory in each worker process
(the config path travels in PKCS11WS_SERVER_CONFIG), so `--workers N` gives N processes on one
store. SIGTERM (or Ctrl-C) stops it cleanly: uvicorn closes the listener, finishes in-flight
requests, then the app closes its store connections; exit status 0. `serve` also runs the
admin listener (admin.py) and holds the store's serving lock that `restore` checks. SIGHUP reloads
(server/reload.py): the clients file, the CRL and the audit file are re-read by every worker,
without a restart and without dropping connections.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pkcs11ws.server import identity, peer, pki, reload
from pkcs11ws.server import settings as settings_mod

APP_FACTORY = "pkcs11ws.server.worker:create_app"
LOOP_FACTORY = "pkcs11ws.server.cli:event_loop"
# After sending its TLS close_notify, asyncio waits this long for the peer's (default 30 s).
# Idle keep-alive clients never answer it, so a graceful stop would otherwise hang on them.
SSL_SHUTDOWN_TIMEOUT = 1.0
log = logging.getLogger("pkcs11ws.server")


class _ShortTLSShutdown:
    """Mixin for an event loop: short TLS handshake and shutdown timeouts on the listening
    servers (a TCP connection that never starts TLS is dropped after handshake_timeout), and
    the TLS connections counted for the metrics (once per connection, never per request)."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            from pkcs11ws.server import conn

            kwargs.setdefault("ssl_shutdown_timeout", SSL_SHUTDOWN_TIMEOUT)
            kwargs.setdefault("ssl_handshake_timeout", float(conn.limits().handshake_timeout))
            if args:
                args = (_counted(args[0]), *args[1:])
            else:
                kwargs["protocol_factory"] = _counted(kwargs["protocol_factory"])
        server: asyncio.Server = await super().create_server(*args, **kwargs)  # type: ignore[misc]
        return server


def _counted(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A protocol factory whose protocols count their connection opening and closing."""
    from pkcs11ws.server import metrics  # in a worker, after `serve` chose the metrics mode

    opened, closed = metrics.connection_opened, metrics.connection_closed

    def make() -> Any:
        proto = factory()
        made, lost = proto.connection_made, proto.connection_lost
        counted = False

        def connection_made(transport: Any) -> None:
            nonlocal counted
            counted = True
            opened()
            made(transport)

        def connection_lost(exc: Exception | None) -> None:
            if counted:
                closed()
            lost(exc)

        proto.connection_made, proto.connection_lost = connection_made, connection_lost
        return proto

    return make


class _StdlibLoop(_ShortTLSShutdown, asyncio.SelectorEventLoop):
    pass


def event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn loop factory: uvloop when installed (cheaper TLS and I/O), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return _StdlibLoop()

    class _UvLoop(_ShortTLSShutdown, uvloop.Loop):  # type: ignore[misc]
        pass

    return _UvLoop()


def _load_cert_chain(ctx: ssl.SSLContext, certfile: str, keyfile: str, cafile: str) -> None:
    """The server certificate with its chain given, not built at every handshake.

    A certificate file without its chain (init writes server.pem so) makes OpenSSL build the
    chain from the verify store, which holds the client CA, at EVERY handshake: a verification
    of our own certificate, its signature check included (~1 M instructions of a fresh
    connection's ~11 M). When the CA file holds the self-signed root that issued our
    certificate, the chain is that root, as OpenSSL would send it: loaded once from a
    temporary file (public certificates only), the same bytes on the wire."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        with open(certfile, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
        with open(cafile, "rb") as f:
            roots = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError):
        certs, roots = [], []
    chain = b""
    if len(certs) == 1:
        for root in roots:
            try:
                root.verify_directly_issued_by(root)
                certs[0].verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if root != certs[0]:
                chain = root.public_bytes(serialization.Encoding.PEM)
                break
    if not chain:
        # A chain of its own, none to build, or files OpenSSL will say what is wrong with.
        ctx.load_cert_chain(certfile, keyfile)
        return
    try:
        with tempfile.TemporaryDirectory(prefix="pkcs11ws-chain-") as d:
            full = os.path.join(d, "chain.pem")
            with open(full, "wb") as f:
                f.write(certs[0].public_bytes(serialization.Encoding.PEM) + chain)
            ctx.load_cert_chain(full, keyfile)
    except OSError:  # no writable temporary folder: OpenSSL builds the chain, as before
        ctx.load_cert_chain(certfile, keyfile)


def tls_context(config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn ssl_context_factory: TLS 1.2 minimum, client certificate required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cert_chain(ctx, config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)
    ctx.load_verify_locations(cafile=config.ssl_ca_certs)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # One TLS 1.3 session ticket per connection, not OpenSSL's two: making a stateless ticket
    # re-decodes the whole session, the client certificate included (~1.6 M instructions, a
    # sixth of a fresh connection's handshake), and a client that starts, asks once and exits
    # (pkcs11-tool -L) waits for it. libcurl keeps one session per host, replaced by each newer
    # ticket, so a module's reconnects still resume with one
    # (tests/service/test_server_tls_tickets.py).
    ctx.num_tickets = 1
    peer.audit_handshakes(ctx)
    return ctx


def _exit_zero(signum: int, frame: object) -> None:
    sys.exit(0)


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        res = pki.init(
            Path(args.dir),
            port=args.port,
            force=args.force,
            scrypt_n=args.scrypt_n,
            replace_ca_and_master_key=args.replace_ca_and_master_key,
            admin_port=args.admin_port,
            store=args.store,
            sans=args.san,
        )
    except pki.InitError as exc:
        print(f"pkcs11ws-server init: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {res.server_yaml}")
    print(f"wrote {res.client_cfg}")
    print(
        f"{'kept' if res.kept_pki else 'wrote'} {res.dir / 'pki'} "
        "(ca, server and client certificates and keys)"
    )
    print(f"{'kept' if res.kept_master_key else 'wrote'} {res.dir / 'master.key'}")
    print(f"{res.dir / 'clients.yaml'}: the client certificate is the identity 'admin'")
    print(f"start with: pkcs11ws-server serve --config {res.server_yaml}")
    return 0


def _cmd_issue_client(args: argparse.Namespace) -> int:
    try:
        res = pki.issue_client(
            Path(args.config),
            args.name,
            args.role,
            Path(args.out),
            cert_pem=Path(args.cert) if args.cert else None,
            ca_key=Path(args.ca_key) if args.ca_key else None,
            host=args.host,
        )
    except (pki.InitError, settings_mod.SettingsError, OSError, ValueError) as exc:
        print(f"pkcs11ws-server issue-client: {exc}", file=sys.stderr)
        return 1
    made = "client.pem, client.key" if res.key is not None else "client.pem"
    print(f"wrote {res.out}: {made}, ca.pem, pkcs11webservices.cfg")
    print(f"registered {args.name!r} (role {args.role}, SHA-256 {res.fingerprint})")
    return 0


def _check_files(s: settings_mod.Settings) -> None:
    for what, p in (("tls.cert", s.tls_cert), ("tls.key", s.tls_key), ("tls.ca", s.tls_ca)):
        if not p.is_file():
            raise settings_mod.SettingsError(f"{what}: {p} does not exist")


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pkcs11ws.server.masterkey import MasterKeyError, open_master_key
    from pkcs11ws.server.sealing import MasterKeys
    from pkcs11ws.server.store import StoreError, StoreUnavailable, backend_class

    try:
        s = settings_mod.load(args.config)
        store = backend_class(s.store.url).open(s.store)
        try:
            # The master-key step re-wraps stored card keys: it needs the master key.
            master = open_master_key(s)
            try:
                keys = MasterKeys(master)
                before, after = store.migrate(
                    card_rewrap=lambda card, inner: keys.wrap_card(inner, card)
                )
            finally:
                master.close()
        finally:
            store.close()
    except (settings_mod.SettingsError, MasterKeyError, StoreError, StoreUnavailable) as exc:
        print(f"pkcs11ws-server migrate: {exc}", file=sys.stderr)
        return 2
    shown = settings_mod.describe_store(s)
    if before == after:
        print(f"{shown}: schema version {after}, up to date")
    else:
        print(f"{shown}: schema version {before} -> {after}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    os.umask(0o077)  # state files this process and its workers create are owner-only
    try:
        s = settings_mod.load(args.config)
        _check_files(s)
    except settings_mod.SettingsError as exc:
        print(f"pkcs11ws-server serve: {exc}", file=sys.stderr)
        return 2
    # Metrics in multiprocess mode, one private folder per run (metrics.py says why); set
    # before anything imports prometheus-client, inherited by the worker processes.
    metrics_dir = tempfile.mkdtemp(prefix="pkcs11ws-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _serve(args, s)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(args: argparse.Namespace, s: settings_mod.Settings) -> int:
    import uvicorn

    from pkcs11ws.server import backup
    from pkcs11ws.server.app import open_store
    from pkcs11ws.server.masterkey import MasterKeyError, open_master_key
    from pkcs11ws.server.sealing import MasterKeys
    from pkcs11ws.server.store import StoreError, StoreUnavailable
    from pkcs11ws.server.worker import configure_logging

    workers = args.workers if args.workers is not None else s.workers
    port = args.port if args.port is not None else s.port
    admin = None
    try:
        master = open_master_key(s)
    except MasterKeyError as exc:
        print(f"pkcs11ws-server serve: {exc}", file=sys.stderr)
        print(
            "pkcs11ws-server serve: not started: the service refuses to run without its master key",
            file=sys.stderr,
        )
        return 2
    configure_logging(s)
    try:
        # Create (or migrate) the schema once here, before anything else opens the store, so
        # worker processes never race to do it (they only check it).
        open_store(s, keys=MasterKeys(master)).close()
        # Held while serving: `restore` refuses to replace a store a service has open.
        in_use = backup.hold_store(s)
        admin_port = args.admin_port if args.admin_port is not None else s.admin_port
        if admin_port:
            from pkcs11ws.server.admin import Admin

            admin = Admin(s, open_store(s), workers, admin_port)
        identity.Clients(s.clients, s.unlisted_clients, s.crl, s.tls_ca)  # must load
    except (
        backup.BackupError,
        identity.ClientsError,
        StoreError,
        StoreUnavailable,
        RuntimeError,
        ValueError,
        OSError,
    ) as exc:
        print(f"pkcs11ws-server serve: {exc}", file=sys.stderr)
        return 2
    finally:
        master.close()
    os.environ[settings_mod.CONFIG_ENV] = str(s.path)
    if workers > 1:
        os.environ[settings_mod.SUPERVISOR_ENV] = str(os.getpid())
    else:
        os.environ.pop(settings_mod.SUPERVISOR_ENV, None)
    if admin is not None:
        admin.start()
    log.info(
        "serving on https://%s:%d with %d worker(s), store %s",
        s.host,
        port,
        workers,
        settings_mod.describe_store(s),
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the default action
    # would kill the process with status -15; a handler turns that into a clean exit 0.
    signal.signal(signal.SIGTERM, _exit_zero)
    # SIGHUP reloads in the workers (server/reload.py); here it must not kill the service.
    reload.ignore_sighup()
    if workers > 1:
        from uvicorn.supervisors.multiprocess import Multiprocess

        # uvicorn's supervisor replaces every worker on SIGHUP, dropping kept connections;
        # pass the signal on instead, so each worker reloads in place.
        Multiprocess.handle_hup = reload.forward_to_workers  # type: ignore[method-assign,assignment]
    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            interface="asgi3",  # App.__call__ returns its coroutine: not a coroutine function
            host=s.host,
            port=port,
            workers=workers,
            ssl_certfile=str(s.tls_cert),
            ssl_keyfile=str(s.tls_key),
            ssl_ca_certs=str(s.tls_ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED,
            ssl_context_factory=tls_context,
            log_config=None,
            log_level=s.log_level.lower(),
            access_log=False,  # the app writes its own access line (no bodies, no secrets)
            server_header=False,
            # Clients connect directly over mutual TLS and nothing reads the client address: the
            # X-Forwarded-* rewriting middleware would only cost CPU on every request.
            proxy_headers=False,
            lifespan="on",
            timeout_keep_alive=s.connections.keep_alive_timeout,
            loop=LOOP_FACTORY,
            http=peer.PROTOCOL,  # connection limits (conn.py); the client certificate in the scope
            timeout_graceful_shutdown=10,
        )
    finally:
        # Also on the SystemExit(0) that _exit_zero raises from inside uvicorn.run.
        if admin is not None:
            admin.stop()
        in_use.close()
    return 0


def _cmd_backup(args: argparse.Namespace) -> int:
    from pkcs11ws.server import backup

    try:
        s = settings_mod.load(args.config)
        if s.database_backend != "sqlite":
            raise backup.BackupError(
                f"{args.command} copies a SQLite store; back up PostgreSQL with its own tools"
                " (pg_dump, pg_basebackup, pgBackRest, Barman: docs/postgresql.md)"
            )
        if args.command == "backup":
            cards, objects = backup.backup(s, Path(args.out))
            print(f"backed up {cards} softcard(s), {objects} object(s) to {Path(args.out)}")
        else:
            cards, objects = backup.restore(s, Path(args.backup), args.overwrite)
            print(f"restored {cards} softcard(s), {objects} object(s) to {s.database_path}")
    except (settings_mod.SettingsError, backup.BackupError, OSError) as exc:
        print(f"pkcs11ws-server {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_master_key(args: argparse.Namespace) -> int:
    """Create the configured master key if it does not exist yet (the token key for
    master_key.pkcs11, a 0600 file otherwise); an existing key is never replaced."""
    from pkcs11ws.server.masterkey import MASTER_KEY_LEN, MasterKeyError, create_token_key

    os.umask(0o077)
    try:
        s = settings_mod.load(args.config)
        if s.master_pkcs11 is not None:
            made = create_token_key(s.master_pkcs11)
            where = f"key {s.master_pkcs11.key!r} in token {s.master_pkcs11.token!r}"
        else:
            assert s.master_key is not None
            try:
                fd = os.open(s.master_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                made = False
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(MASTER_KEY_LEN))
                made = True
            where = str(s.master_key)
    except (settings_mod.SettingsError, MasterKeyError, OSError) as exc:
        print(f"pkcs11ws-server master-key: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # python-pkcs11 errors: the token refused
        print(
            f"pkcs11ws-server master-key: the token refused: {type(exc).__name__} {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"created the master key: {where}" if made else f"the master key exists: {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pkcs11ws-server", description="pkcs11ws key service")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="write a development PKI, master key and config files")
    i.add_argument("dir", help="folder to write into (created if missing)")
    i.add_argument("--port", type=int, default=settings_mod.DEFAULT_PORT)
    i.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="admin listener port on 127.0.0.1 (default: --port + 1)",
    )
    i.add_argument(
        "--force",
        action="store_true",
        help="rewrite existing configuration files; keeps an existing CA and master key",
    )
    i.add_argument(
        "--replace-ca-and-master-key",
        action="store_true",
        help="replace an existing CA and master key: keys stored under the old master "
        "key and certificates issued by the old CA become unusable",
    )
    i.add_argument(
        "--scrypt-n",
        type=int,
        default=settings_mod.DEFAULT_SCRYPT["n"],
        help="scrypt cost for new softcards (lower only for tests)",
    )
    i.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name or IP address for the server certificate "
        "(repeatable; localhost, 127.0.0.1 and ::1 are always in it)",
    )
    i.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="a PostgreSQL database: postgresql://USER@HOST:PORT/DB (default: SQLite in DIR)",
    )
    i.set_defaults(func=_cmd_init)
    m = sub.add_parser("migrate", help="bring the store's schema to this version (serve does too)")
    m.add_argument("--config", required=True, help="path to server.yaml")
    m.set_defaults(func=_cmd_migrate)
    c = sub.add_parser("issue-client", help="make a client identity: certificate, key, config")
    c.add_argument("--config", required=True, help="path to server.yaml")
    c.add_argument("--name", required=True, help="identity name (letters, digits, '-')")
    c.add_argument(
        "--role",
        choices=identity.ROLES,
        default="app",
        help="admin: every softcard; app (default): own and granted ones",
    )
    c.add_argument("--out", required=True, help="folder for client.pem, client.key, ca.pem, cfg")
    c.add_argument("--cert", help="register this existing certificate (your own CA) instead")
    c.add_argument("--ca-key", help="the CA key (default: ca.key next to tls.ca)")
    c.add_argument("--host", help="HOST for the module config (default: the service's host)")
    c.set_defaults(func=_cmd_issue_client)
    s = sub.add_parser("serve", help="run the key service in the foreground")
    s.add_argument("--config", required=True, help="path to server.yaml")
    s.add_argument(
        "--port",
        type=int,
        default=None,
        help="override the configured port (several replicas from one config)",
    )
    s.add_argument("--workers", type=int, default=None, help="worker processes (one store)")
    s.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="override the configured admin_port (0: no admin listener)",
    )
    s.set_defaults(func=_cmd_serve)
    b = sub.add_parser("backup", help="copy the store consistently, also while serving")
    b.add_argument("--config", required=True, help="path to server.yaml")
    b.add_argument("out", help="the backup file to write (must not exist)")
    b.set_defaults(func=_cmd_backup)
    r = sub.add_parser("restore", help="put a backup in place as the store (service stopped)")
    r.add_argument("--config", required=True, help="path to server.yaml")
    r.add_argument("backup", help="a file written by `backup`")
    r.add_argument("--overwrite", action="store_true", help="replace an existing store")
    r.set_defaults(func=_cmd_backup)
    m = sub.add_parser("master-key", help="create the configured master key if it is missing")
    m.add_argument("--config", required=True, help="path to server.yaml")
    m.set_defaults(func=_cmd_master_key)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
