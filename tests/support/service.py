"""The real key service for the tests: started as a subprocess over real mutual TLS
(`start_service`, `Service`), and a small stdlib HTTPS client (`Api`) for the contract tests; it
does not use pkcs11ws.client on purpose. tests/conftest.py wraps these in the shared fixtures.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pkcs11ws.server.accesslog import FLUSH_SECONDS

SCRYPT_N_TESTS = 2**12
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    dir: Path
    port: int
    url: str
    client_cfg: Path
    ca: Path
    cert: Path
    key: Path
    server_yaml: Path
    pid: int
    log: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by PID, wait; SIGKILL if it does not stop. Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        return int(self.proc.returncode)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def served(self, what: str) -> int:
        """How many requests (access-log lines containing what) it answered, once the lines of
        the requests already answered are written (held up to accesslog.FLUSH_SECONDS)."""
        time.sleep(3 * FLUSH_SECONDS)
        return sum(
            1
            for ln in self.log_text().splitlines()
            if "pkcs11ws.server.access" in ln and what in ln
        )


def free_port_besides(taken: int) -> int:
    """A free port other than `taken`: the kernel may hand the port just probed out again while
    nothing listens on it yet."""
    while (port := free_port()) == taken:
        pass
    return port


def init_dir(directory: Path, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pkcs11ws.server.cli",
            "init",
            str(directory),
            "--port",
            str(port),
            "--scrypt-n",
            str(SCRYPT_N_TESTS),
            *(() if "--admin-port" in extra else ("--admin-port", str(free_port_besides(port)))),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _merge(doc: dict[str, Any], overrides: dict[str, Any]) -> None:
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k].update(v)
        else:
            doc[k] = v


def start_service(
    directory: Path,
    workers: int = 1,
    overrides: dict[str, Any] | None = None,
    prepare: Callable[[Path], None] | None = None,
    init: bool = True,
    store: str | None = None,
) -> Service:
    """init (unless init is False: a folder made before; store: `init --store URL`), apply
    overrides, call prepare(dir), then serve and wait for /health."""
    yaml_path = directory / "server.yaml"
    if init:
        port = free_port()
        res = init_dir(directory, port, *(("--store", store) if store else ()))
        assert res.returncode == 0, res.stderr
    else:
        port = free_port()
        overrides = {**(overrides or {}), "port": port}
    if overrides:
        doc = yaml.safe_load(yaml_path.read_text())
        _merge(doc, overrides)
        yaml_path.write_text(yaml.safe_dump(doc))
    if prepare is not None:
        prepare(directory)
    return serve_dir(directory, port, workers)


def serve_dir(directory: Path, port: int, workers: int = 1) -> Service:
    """`serve` the kit already in `directory` (its server.yaml listens on `port`)."""
    return launch(directory, directory / "server.yaml", port, workers)


def start_replica(svc: Service, port: int | None = None) -> Service:
    """Another service process from svc's configuration (`serve --port`, no admin listener: the
    configured one is the first replica's): a replica on the same store, same PKI and master
    key."""
    port = port or free_port()
    return launch(svc.dir, svc.server_yaml, port, 1, f"server-{port}.out", explicit_port=True)


def launch(
    directory: Path,
    yaml_path: Path,
    port: int,
    workers: int = 1,
    log_name: str = "server.out",
    explicit_port: bool = False,
) -> Service:
    """Run `serve` on yaml_path and wait for /health. explicit_port: `--port port --admin-port 0`
    (another replica of a configuration, or one restarted on its own port)."""
    log = directory / "log" / log_name
    cmd = [sys.executable, "-m", "pkcs11ws.server.cli", "serve", "--config", str(yaml_path)]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    if explicit_port:
        cmd += ["--port", str(port), "--admin-port", "0"]
    with log.open("ab") as out:  # appended: a restarted service keeps the earlier lines
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pki = directory / "pki"
    svc = Service(
        directory,
        port,
        f"https://127.0.0.1:{port}",
        directory / "pkcs11webservices.cfg",
        pki / "ca.pem",
        pki / "client.pem",
        pki / "client.key",
        yaml_path,
        proc.pid,
        log,
        proc,
    )
    deadline = time.monotonic() + START_TIMEOUT
    api = Api(svc)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}:\n{svc.log_text()}")
        try:
            if api.get("/health").status == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            svc.stop()
            raise RuntimeError(f"the service did not answer /health:\n{svc.log_text()}")
        time.sleep(0.1)
    api.close()
    return svc


# ------------------------------------------------------------------------------------------
# A stdlib HTTPS client for the contract tests.


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def new_idem() -> str:
    return "t-" + uuid.uuid4().hex


@dataclass
class Resp:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        if self.status < 400:
            return None
        return str(self.json["code"])


class Api:
    """One keep-alive mutual-TLS connection to a service (reconnects when it was closed)."""

    def __init__(self, svc: Service, cert: Path | None = None, key: Path | None = None) -> None:
        self.svc = svc
        self.ctx = ssl.create_default_context(cafile=str(svc.ca))
        self.ctx.load_cert_chain(str(cert or svc.cert), str(key or svc.key))
        self.conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connection(self) -> tuple[http.client.HTTPSConnection, bool]:
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(
                "127.0.0.1", self.svc.port, context=self.ctx, timeout=30
            )
            return self.conn, True
        return self.conn, False

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        idem: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Resp:
        raw = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        h = dict(headers or {})
        if raw is not None:
            h.setdefault("Content-Type", "application/json")
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if idem is not None:
            h["Idempotency-Key"] = idem
        for attempt in (0, 1):
            conn, new = self._connection()
            try:
                conn.request(method, path, body=raw, headers=h)
                r = conn.getresponse()
                data = r.read()
            except (
                http.client.RemoteDisconnected,
                ConnectionResetError,
                BrokenPipeError,
                ssl.SSLEOFError,  # the service closed the idle connection (keep-alive timeout)
            ):
                self.close()
                if new or attempt:  # only a stale keep-alive connection is worth a retry
                    raise
                continue
            except BaseException:
                self.close()
                raise
            if r.will_close:
                self.close()
            return Resp(r.status, data, {k.lower(): v for k, v in r.getheaders()})
        raise AssertionError("unreachable")

    def get(self, path: str, **kw: Any) -> Resp:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Resp:
        return self.request("POST", path, {} if body is None else body, **kw)

    def delete(self, path: str, **kw: Any) -> Resp:
        return self.request("DELETE", path, **kw)

    # ---------------------------------------------------------------- common flows

    def ok(self, resp: Resp) -> Any:
        assert 200 <= resp.status < 300, (resp.status, resp.body)
        return resp.json

    def new_card(self, passphrase: bytes = b"correct horse") -> tuple[str, str]:
        """A new softcard (unique name) and an activation token for it."""
        card = self.ok(
            self.post(
                "/km/v1/softcards",
                {"name": uuid.uuid4().hex, "passphrase": b64(passphrase)},
                idem=new_idem(),
            )
        )
        return card["id"], self.activate(card["id"], passphrase)

    def activate(self, card: str, passphrase: bytes) -> str:
        r = self.post(f"/km/v1/softcards/{card}/activate", {"passphrase": b64(passphrase)})
        return str(self.ok(r)["token"])

    def create(self, card: str, token: str, attrs: dict[str, Any]) -> Resp:
        return self.post(
            f"/km/v1/softcards/{card}/objects",
            {"attrs": encode(attrs)},
            token=token,
            idem=new_idem(),
        )

    def import_key(self, card: str, token: str, key_type: int, value: bytes, **attrs: Any) -> str:
        t = {"CKA_CLASS": 4, "CKA_KEY_TYPE": key_type, "CKA_VALUE": value, **attrs}
        return str(self.ok(self.create(card, token, t))["handle"])


def encode(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attribute values in wire form: bytes as base64, bool and int as they are."""
    return {k: b64(v) if isinstance(v, bytes) else v for k, v in attrs.items()}


def decode(attrs: dict[str, Any]) -> dict[str, Any]:
    from pkcs11ws import protocol

    return protocol.decode_attrs(attrs)


def issue_client(svc: Service, name: str, out: Path, role: str = "app") -> Path:
    """`pkcs11ws-server issue-client` on svc's configuration: a client identity (certificate,
    key, CA and module configuration) in folder `out`, which is returned."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pkcs11ws.server.cli",
            "issue-client",
            "--config",
            str(svc.server_yaml),
            "--name",
            name,
            "--role",
            role,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return out
