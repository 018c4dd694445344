"""The servers a benchmark run needs, each started on a free 127.0.0.1 port (or a private unix
socket) and stopped by PID: the key service (`pkcs11ws-server init` + `serve`), the ASGI floor
(bench/floor_app.py), a private SoftHSM2 token, and p11-kit's server exporting that token.

Every class is a context manager; stop() is safe to call twice. Secrets (the softcard
passphrase, SoftHSM PINs) travel to children only in environment variables.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from bench.build import ROOT
from bench.procs import free_port, pinned, stop_pid, wait_for

SCRYPT_N = 2**12  # login cost only; no benchmarked operation derives a key
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
)
P11KIT_CLIENTS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
)
TOKEN_LABEL = "bench"


def first_existing(paths: tuple[str, ...], what: str) -> str:
    for p in paths:
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{what} not found (looked at {', '.join(paths)})")


def softhsm_module() -> str:
    return first_existing(SOFTHSM_MODULES, "SoftHSM2 (Debian package softhsm2)")


def p11kit_client_module() -> str:
    r = subprocess.run(["dpkg", "-L", "p11-kit-modules"], capture_output=True, text=True)
    found = tuple(line for line in r.stdout.splitlines() if line.endswith("/p11-kit-client.so"))
    return first_existing(found + P11KIT_CLIENTS, "p11-kit-client.so (Debian p11-kit-modules)")


class _Managed:
    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _https_ok(port: int, ca: Path, cert: Path, key: Path, path: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    finally:
        conn.close()


@dataclass
class KeyServiceDir:
    """A configured (init) key service folder: PKI, master key, store, both config files."""

    dir: Path

    @property
    def server_yaml(self) -> Path:
        return self.dir / "server.yaml"

    @property
    def client_cfg(self) -> Path:
        return self.dir / "pkcs11webservices.cfg"

    @property
    def ca(self) -> Path:
        return self.dir / "pki" / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "pki" / "client.pem"

    @property
    def key(self) -> Path:
        return self.dir / "pki" / "client.key"

    def curlbench(self, exe: str | Path, url: str, body: str | Path) -> list[str]:
        """curlbench's command up to its load options: one POST of body to url over mutual
        TLS with this folder's client certificate and CA."""
        return [str(exe), "--url", url, "--body-file", str(body), "--cert", str(self.cert),
                "--key", str(self.key), "--ca", str(self.ca)]  # fmt: skip

    @property
    def server_cert(self) -> Path:
        return self.dir / "pki" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "pki" / "server.key"

    @classmethod
    def init(cls, directory: Path) -> KeyServiceDir:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pkcs11ws.server.cli",
                "init",
                str(directory),
                "--port",
                str(free_port()),
                "--scrypt-n",
                str(SCRYPT_N),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        if r.returncode != 0:
            raise RuntimeError(f"pkcs11ws-server init failed: {r.stderr.strip()}")
        return cls(directory)


class KeyService(_Managed):
    """`pkcs11ws-server serve` on a config folder, on its own port, with N workers."""

    def __init__(
        self,
        d: KeyServiceDir,
        workers: int = 1,
        cpus: str | None = None,
        name: str = "service",
        port: int | None = None,
        prefix: tuple[str, ...] = (),
        ready_timeout: float = 60,
    ) -> None:
        """prefix: a command the service runs under (bench/service_ir.py: valgrind)."""
        from pkcs11ws.server import settings

        self.d = d
        self.workers = workers
        # The configured port (the one pkcs11webservices.cfg names) unless told otherwise.
        self.port = port if port is not None else settings.load(d.server_yaml).port
        self.log = d.dir / "log" / f"{name}.out"
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "pkcs11ws.server.cli",
            "serve",
            "--config",
            str(d.server_yaml),
            "--port",
            str(self.port),
            "--workers",
            str(workers),
        ]
        # Its own free admin listener port: the configured one (port + 1 by default) may be
        # taken on a shared machine, and another service on the same folder needs its own.
        cmd += ["--admin-port", str(free_port())]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                pinned(cmd, cpus),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        try:
            wait_for(
                lambda: _https_ok(self.port, d.ca, d.cert, d.key, "/health"),
                ready_timeout,
                f"the key service ({self.log})",
                self.proc,
            )
        except BaseException:
            self.stop()
            raise

    def count_log(self, needle: str) -> int:
        with self.log.open("rb") as f:
            return sum(1 for line in f if needle.encode() in line)


class FloorServer(_Managed):
    """bench/floor_app.py on uvicorn with the key service's TLS settings and certificates."""

    def __init__(
        self,
        d: KeyServiceDir,
        cpus: str | None = None,
        prefix: tuple[str, ...] = (),
        ready_timeout: float = 60,
    ) -> None:
        self.port = free_port()
        self.log = d.dir / "log" / "floor.out"
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "bench.floor_app",
            "--port",
            str(self.port),
            "--cert",
            str(d.server_cert),
            "--key",
            str(d.server_key),
            "--ca",
            str(d.ca),
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                pinned(cmd, cpus),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        try:
            wait_for(
                lambda: _https_ok(self.port, d.ca, d.cert, d.key, "/"),
                ready_timeout,
                f"the floor server ({self.log})",
                self.proc,
            )
        except BaseException:
            self.stop()
            raise


@dataclass
class SoftHSM:
    """A private SoftHSM2 configuration and token folder; PINs generated per run."""

    dir: Path
    module: str = field(default_factory=softhsm_module)
    pin: str = field(default_factory=lambda: secrets.token_hex(8))
    so_pin: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        (self.dir / "tokens").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"directories.tokendir = {self.dir / 'tokens'}\n"
            "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )

    @property
    def conf(self) -> Path:
        return self.dir / "softhsm2.conf"

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf), "P11BENCH_PIN": self.pin}

    def init_token(self, p11bench: Path) -> None:
        """C_InitToken + C_InitPIN through p11bench (PINs in the environment, not argv)."""
        env = {**os.environ, **self.env(), "P11BENCH_SO_PIN": self.so_pin}
        r = subprocess.run(
            [str(p11bench), "--module", self.module, "--token", TOKEN_LABEL, "--init-token"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"SoftHSM token init failed: {r.stderr.strip()}")


class P11KitServer(_Managed):
    """`p11-kit server` exporting the SoftHSM token over a private unix socket."""

    def __init__(self, hsm: SoftHSM, cpus: str | None = None) -> None:
        exe = shutil.which("p11-kit")
        if exe is None:
            raise FileNotFoundError("p11-kit not found (Debian package p11-kit)")
        self.client_module = p11kit_client_module()
        self.socket = hsm.dir / "p11-kit.sock"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.log = hsm.dir / "p11-kit.out"
        cmd = [
            exe,
            "server",
            "--foreground",
            "--name",
            str(self.socket),
            "--provider",
            hsm.module,
            f"pkcs11:token={TOKEN_LABEL}",
        ]
        env = {**os.environ, "SOFTHSM2_CONF": str(hsm.conf)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                pinned(cmd, cpus),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            wait_for(self.socket.exists, 30, f"p11-kit server ({self.log})", self.proc)
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        return {"P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}
