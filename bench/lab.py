"""The benchmark lab: every server started, every token and key in place, and the variants
(ways to run a point) built over them.

Variants of HMAC-SHA256 sign of 64 bytes (the main sweep):
  module-c        p11bench (C host) -> libpkcs11ws.so -> key service
  python-pkcs11   python-pkcs11 (Python host) -> libpkcs11ws.so -> key service
  pyclient        pkcs11ws.client.KeyServiceClient.sign (no PKCS#11 layer) -> key service
  pycurl          the module's request through raw pycurl -> key service
  libcurl-c       the module's request through libcurl from C (curlbench) -> key service
  floor-libcurl   the same libcurl client -> minimal ASGI HMAC app (bench/floor_app.py)
  softhsm         p11bench -> SoftHSM2 in process
  p11kit-softhsm  p11bench -> p11-kit-client.so -> p11-kit server -> SoftHSM2
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.build import ROOT, build_all
from bench.procs import Placement, pinned
from bench.runner import Point, Variant
from bench.services import (
    TOKEN_LABEL,
    FloorServer,
    KeyService,
    KeyServiceDir,
    P11KitServer,
    SoftHSM,
)

P11_OPS = ("sign64", "sign4k", "verify64", "encrypt4k", "decrypt4k", "find", "sessinfo", "noop",
           "rsasign", "ecsign", "gcm4k")  # fmt: skip
SIGN_LOG_LINE = "POST /crypto/v1/sign 200"


@dataclass
class Lab:
    work: Path
    placement: Placement
    stack: contextlib.ExitStack
    bins: dict[str, Path] = field(default_factory=dict)
    module: str = ""
    ksd: KeyServiceDir | None = None
    service: KeyService | None = None
    floor: FloorServer | None = None
    hsm: SoftHSM | None = None
    p11kit: P11KitServer | None = None
    passphrase: str = field(default_factory=lambda: secrets.token_hex(12))
    token: str = ""
    key_handle: str = ""
    body_file: Path | None = None
    notes: list[str] = field(default_factory=list)
    p11kit_ops: tuple[str, ...] = ()

    # ------------------------------------------------------------------ set-up

    def module_env(self, port: int | None = None) -> dict[str, str]:
        assert self.ksd is not None
        env = {"PKCS11WS_CONFIG": str(self.ksd.client_cfg), "P11BENCH_PIN": self.passphrase}
        if port is not None:
            env["PKCS11WS_PORT"] = str(port)
        return env

    def p11bench_setup(self, module: str, env: dict[str, str]) -> None:
        r = subprocess.run(
            [str(self.bins["p11bench"]), "--module", module, "--token", TOKEN_LABEL, "--setup"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            raise RuntimeError(f"p11bench --setup on {module} failed: {r.stderr.strip()}")

    def start_service_only(self, say: Callable[[str], None] = print) -> None:
        """The key service, a softcard, the keys and data objects, the sign request body."""
        from pkcs11ws.client.api import KeyServiceClient
        from pkcs11ws.config import load_config
        from pkcs11ws.paths import module_path
        from pkcs11ws.protocol import STRUCTS, encode

        if not self.bins:
            self.bins = build_all()
        self.module = module_path()
        say("starting the key service")
        self.ksd = KeyServiceDir.init(self.work / "service")
        self.service = self.stack.enter_context(
            KeyService(self.ksd, 1, self.placement.server, "service")
        )
        client = KeyServiceClient(load_config(str(self.ksd.client_cfg)))
        try:
            card = client.create_softcard(TOKEN_LABEL, self.passphrase.encode())
            say("creating keys and data objects through the module")
            self.p11bench_setup(self.module, self.module_env())
            self.token, _ = client.activate(card["id"], self.passphrase.encode())
            found = client.search_objects(card["id"], self.token, {"CKA_LABEL": b"p11bench-hmac"})
            self.key_handle = found[0]["handle"]
        finally:
            client.close()
        # The body of the module's C_Sign of 64 bytes (pkcs11ws/client/api.py), without the
        # token and request id the module now puts in it (protocol.TOKEN_FIELD): the raw
        # transport rows send the token as an Authorization header, as other clients may.
        body = encode(
            STRUCTS["Sign"],
            {"key": self.key_handle, "mechanism": "CKM_SHA256_HMAC", "data": bytes(range(64))},
        )
        self.body_file = self.work / "sign64.json"
        self.body_file.write_bytes(json.dumps(body, separators=(",", ":")).encode())

    def start(self, say: Callable[[str], None] = print) -> None:
        """Everything: the key service, the floor, SoftHSM2 and p11-kit's server."""
        self.start_service_only(say)
        assert self.ksd is not None
        say("starting the ASGI floor")
        self.floor = self.stack.enter_context(FloorServer(self.ksd, self.placement.server))
        try:
            say("initialising a SoftHSM2 token and starting p11-kit server")
            self.hsm = SoftHSM(self.work / "softhsm")
            self.hsm.init_token(self.bins["p11bench"])
            self.p11bench_setup(self.hsm.module, self.hsm.env())
            self.p11kit = self.stack.enter_context(P11KitServer(self.hsm, self.placement.server))
            self.p11kit_ops = self._probe_p11kit()
        except (FileNotFoundError, RuntimeError) as e:
            self.notes.append(f"peers unavailable: {e}")
            say(f"WARNING: {e}")

    def _probe_p11kit(self) -> tuple[str, ...]:
        """The operations p11-kit's remoting can carry: one call of each, noted when refused."""
        assert self.hsm is not None and self.p11kit is not None
        env = {**os.environ, **self.hsm.env(), **self.p11kit.env()}
        ok = []
        for op in P11_OPS:
            r = subprocess.run(
                [
                    str(self.bins["p11bench"]),
                    "--module",
                    self.p11kit.client_module,
                    "--token",
                    TOKEN_LABEL,
                    "--op",
                    op,
                    "--count",
                    "1",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            result = json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else {}
            if r.returncode == 0 and result.get("ops") == 1:
                ok.append(op)
            else:
                why = result.get("first_error") or r.stderr.strip()[-200:]
                self.notes.append(
                    f"p11kit-softhsm cannot run {op}: {result.get('error_where', '')} returned "
                    f"CKR {why} through p11-kit-client (p11-kit {_p11kit_version()})"
                )
        return tuple(ok)

    # ------------------------------------------------------------------ variants

    def _p11(
        self,
        name: str,
        describe: str,
        module: str,
        env: dict[str, str],
        service: KeyService | P11KitServer | None,
        port: int | None,
        ops: tuple[str, ...],
        cpus: str | None,
    ) -> Variant:
        exe = str(self.bins["p11bench"])

        def command(p: Point) -> tuple[list[str], dict[str, str]]:
            cmd = [exe, "--module", module, "--token", TOKEN_LABEL, *p.p11bench_args()]
            return pinned(cmd, cpus), env

        pid = (lambda: service.pid) if service is not None else (lambda: None)
        log = service.log if isinstance(service, KeyService) else None
        return Variant(name, describe, command, pid, port, ops, log=log)

    def _curl(
        self,
        name: str,
        describe: str,
        port: int,
        service: KeyService | FloorServer,
        cpus: str | None,
    ) -> Variant:
        assert self.ksd is not None and self.body_file is not None
        d, exe, body = self.ksd, str(self.bins["curlbench"]), str(self.body_file)

        def command(p: Point) -> tuple[list[str], dict[str, str]]:
            cmd = [
                *d.curlbench(exe, f"https://127.0.0.1:{port}/crypto/v1/sign", body),
                *p.window_args(),
            ]
            return pinned(cmd, cpus), {"BENCH_TOKEN": self.token}

        log = service.log if isinstance(service, KeyService) else None
        return Variant(name, describe, command, lambda: service.pid, port, log=log)

    def _py(
        self,
        name: str,
        describe: str,
        mode: str,
        args: list[str],
        env: dict[str, str],
        service: KeyService,
        cpus: str | None,
    ) -> Variant:
        def command(p: Point) -> tuple[list[str], dict[str, str]]:
            cmd = [sys.executable, "-m", "bench.pyhosts", mode, *args, *p.window_args()]
            return pinned(cmd, cpus), {**env, "PYTHONPATH": str(ROOT)}

        return Variant(name, describe, command, lambda: service.pid, service.port, log=service.log)

    def module_variant(
        self, service: KeyService, suffix: str = "", cpus: str | None = "client"
    ) -> Variant:
        c = self.placement.client if cpus == "client" else cpus
        return self._p11(
            "module-c" + suffix,
            "C host -> libpkcs11ws.so -> key service",
            self.module,
            self.module_env(service.port),
            service,
            service.port,
            P11_OPS,
            c,
        )

    def libcurl_variant(
        self, service: KeyService, suffix: str = "", cpus: str | None = "client"
    ) -> Variant:
        c = self.placement.client if cpus == "client" else cpus
        return self._curl(
            "libcurl-c" + suffix,
            "the module's HTTP request via libcurl from C",
            service.port,
            service,
            c,
        )

    def sweep_variants(self) -> list[Variant]:
        assert self.service is not None and self.floor is not None and self.ksd is not None
        svc, d, cpu = self.service, self.ksd, self.placement.client
        tls = ["--cert", str(d.cert), "--key", str(d.key), "--ca", str(d.ca)]
        url = f"https://127.0.0.1:{svc.port}/crypto/v1/sign"
        token_env = {"BENCH_TOKEN": self.token}
        out = [
            self.module_variant(svc),
            self._p11(
                "module-c-single",
                "the same, group commit off (BATCHINFLIGHT 0: one request per call)",
                self.module,
                {**self.module_env(svc.port), "PKCS11WS_BATCHINFLIGHT": "0"},
                svc,
                svc.port,
                P11_OPS,
                cpu,
            ),
            self._py(
                "python-pkcs11",
                "python-pkcs11 -> libpkcs11ws.so -> key service",
                "pkcs11",
                ["--module", self.module, "--token", TOKEN_LABEL],
                self.module_env(),
                svc,
                cpu,
            ),
            self._py(
                "pyclient",
                "KeyServiceClient.sign (no PKCS#11) -> key service",
                "client",
                ["--config", str(d.client_cfg), "--key-handle", self.key_handle],
                {**token_env, **self.module_env()},
                svc,
                cpu,
            ),
            self._py(
                "pycurl",
                "the module's HTTP request via raw pycurl",
                "pycurl",
                ["--url", url, "--body-file", str(self.body_file), *tls],
                token_env,
                svc,
                cpu,
            ),
            self.libcurl_variant(svc),
            self._curl(
                "floor-libcurl",
                "libcurl from C -> minimal ASGI HMAC app",
                self.floor.port,
                self.floor,
                cpu,
            ),
        ]
        return out + self.peer_variants()

    def peer_variants(self) -> list[Variant]:
        if self.hsm is None:
            return []
        cpu = self.placement.client
        out = [
            self._p11(
                "softhsm",
                "C host -> SoftHSM2 (in process)",
                self.hsm.module,
                self.hsm.env(),
                None,
                None,
                P11_OPS,
                cpu,
            )
        ]
        if self.p11kit is not None:
            env = {**self.hsm.env(), **self.p11kit.env()}
            out.append(
                self._p11(
                    "p11kit-softhsm",
                    "C host -> p11-kit-client -> p11-kit server -> SoftHSM2",
                    self.p11kit.client_module,
                    env,
                    self.p11kit,
                    None,
                    self.p11kit_ops,
                    cpu,
                )
            )
        return out


def _p11kit_version() -> str:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "p11-kit"], capture_output=True, text=True
    )
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "?"
