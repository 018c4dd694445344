"""Key service CPU per operation by store backend, in process: `python -m bench.store_cpu`.

The key service's ASGI app is driven directly (no TLS, no HTTP parsing, no client: those cost
the same whatever the store) on uvloop, for SQLite and for PostgreSQL (a throw-away cluster
started like the tests do, tests/support/pg_util.py). Per operation it reports the service process's
CPU (all its threads: the event loop and the store's worker threads) and, for PostgreSQL, the
database server's CPU (every process of the cluster, from /proc), and the wall time per
request with one request at a time.

Operations: HMAC-SHA256 sign (the hot path: one store read), create a data object (one write
transaction with its idempotency record), search a card of 20 objects; issue 14's private-key
signatures (ECDSA P-256 on the event loop, RSA-2048 through the thread pool) next to the same
signature made by the family's function alone (ops.ec.sign / ops.rsa.sign in this process):
the difference is what the request path (and for RSA the thread hand-off) adds per signature.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

# A softcard passphrase the service accepts (it refuses ones under 8 bytes); not a secret.
PASSPHRASE = b"bench-store-passphrase"
P256 = bytes.fromhex("06082a8648ce3d030107")
SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")  # DigestInfo prefix

TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    return total


def _cluster_pids(data_dir: Path) -> list[int]:
    """The postmaster and its children (backends, checkpointer, walwriter...)."""
    head = int((data_dir / "postmaster.pid").read_text().split()[0])
    pids = [head]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == head:
                pids.append(int(entry.name))
    return pids


class Driver:
    """Calls into one App as uvicorn would, one request at a time, on one kept connection
    whose client certificate is `client_pem` (server/peer.py puts it in the scope's state)."""

    def __init__(self, app: Any, client_pem: bytes) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        from pkcs11ws.server.identity import Peer
        from pkcs11ws.server.peer import PEER_KEY

        self.app = app
        der = x509.load_pem_x509_certificate(client_pem).public_bytes(Encoding.DER)
        self.state = {PEER_KEY: Peer(der)}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        idem: str | None = None,
    ) -> tuple[int, Any]:
        raw = b"" if body is None else json.dumps(body).encode()
        headers = [(b"content-length", str(len(raw)).encode())]
        if token:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        if idem:
            headers.append((b"idempotency-key", idem.encode()))
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": headers,
            "query_string": b"",
            "state": self.state,
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        await self.app(scope, receive, send)
        status = sent[0]["status"]
        return status, json.loads(sent[1]["body"] or b"null")


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


async def _measure(
    n: int, op: Callable[[int], Awaitable[None]], data_dir: Path | None
) -> dict[str, float]:
    for i in range(min(50, n)):  # warm caches and prepared statements
        await op(i)
    db_pids = _cluster_pids(data_dir) if data_dir else []  # now that the backends exist
    cpu0, db0, t0 = time.process_time(), _proc_cpu(db_pids), time.perf_counter()
    loop0 = time.thread_time()  # the event loop's thread alone (not the thread pool's)
    for i in range(n):
        await op(i)
    cpu1, db1, t1 = time.process_time(), _proc_cpu(db_pids), time.perf_counter()
    loop1 = time.thread_time()
    return {
        "service_us": (cpu1 - cpu0) / n * 1e6,
        "db_us": (db1 - db0) / n * 1e6,
        "wall_us": (t1 - t0) / n * 1e6,
        "loop_us": (loop1 - loop0) / n * 1e6,
    }


async def _run(workdir: Path, store: str | None, n: int, data_dir: Path | None) -> dict[str, Any]:
    from pkcs11ws.server import pki, settings
    from pkcs11ws.server.app import App

    kw: dict[str, Any] = {"store": store} if store else {}
    res = pki.init(workdir, port=18001, scrypt_n=2**10, **kw)
    s = settings.load(res.server_yaml)
    s = type(s)(**{**s.__dict__, "access_log": False})
    app = App(s)
    d = Driver(app, (workdir / "pki" / "client.pem").read_bytes())  # the identity "admin"
    status, card = await d.call(
        "POST",
        "/km/v1/softcards",
        {"name": uuid.uuid4().hex[:16], "passphrase": b64(PASSPHRASE)},
        idem=uuid.uuid4().hex,
    )
    assert status in (200, 201), card
    cid = card["id"]
    status, act = await d.call(
        "POST", f"/km/v1/softcards/{cid}/activate", {"passphrase": b64(PASSPHRASE)}
    )
    token = act["token"]
    key_attrs = {
        "CKA_CLASS": 4,
        "CKA_KEY_TYPE": 0x2B,
        "CKA_VALUE": b64(b"k" * 32),
        "CKA_SIGN": True,
    }
    status, key = await d.call(
        "POST",
        f"/km/v1/softcards/{cid}/objects",
        {"attrs": key_attrs},
        token=token,
        idem=uuid.uuid4().hex,
    )
    assert status in (200, 201), key
    sign = {"mechanism": "CKM_SHA256_HMAC", "key": key["handle"], "data": b64(b"x" * 64)}

    async def do_sign(i: int) -> None:
        st, _ = await d.call("POST", "/crypto/v1/sign", sign, token=token)
        assert st == 200

    async def do_create(i: int) -> None:
        body = {"attrs": {"CKA_CLASS": 0, "CKA_LABEL": b64(b"d%d" % i), "CKA_VALUE": b64(b"v")}}
        st, _ = await d.call(
            "POST", f"/km/v1/softcards/{cid}/objects", body, token=token, idem=uuid.uuid4().hex
        )
        assert st in (200, 201)

    # A second card with 20 objects to search.
    status, card2 = await d.call(
        "POST",
        "/km/v1/softcards",
        {"name": uuid.uuid4().hex[:16], "passphrase": b64(PASSPHRASE)},
        idem=uuid.uuid4().hex,
    )
    c2 = card2["id"]
    pw = b64(PASSPHRASE)
    _, act2 = await d.call("POST", f"/km/v1/softcards/{c2}/activate", {"passphrase": pw})
    for i in range(20):
        await d.call(
            "POST",
            f"/km/v1/softcards/{c2}/objects",
            {"attrs": {"CKA_CLASS": 0, "CKA_LABEL": b64(b"s%d" % i)}},
            token=act2["token"],
            idem=uuid.uuid4().hex,
        )

    async def do_search(i: int) -> None:
        st, _ = await d.call(
            "POST", f"/km/v1/softcards/{c2}/objects/search", {"attrs": {}}, token=act2["token"]
        )
        assert st == 200

    out = {
        "sign": await _measure(n, do_sign, data_dir),
        "create": await _measure(max(50, n // 10), do_create, data_dir),
        "search20": await _measure(max(50, n // 5), do_search, data_dir),
    }
    out.update(await _asym(d, cid, token, n, data_dir))
    app.store.close()
    return out


async def _asym(d: Driver, cid: str, token: str, n: int, data_dir: Path | None) -> dict[str, Any]:
    """ECDSA P-256 and RSA-2048 sign requests, and the same signatures by ops.<family>.sign alone
    (what the request path adds is the difference)."""
    from pkcs11ws import mechanisms
    from pkcs11ws.server import ops

    out: dict[str, Any] = {}
    pairs = {
        "ecsign": (
            "CKM_EC_KEY_PAIR_GEN",
            {"CKA_EC_PARAMS": b64(P256)},
            "CKM_ECDSA",
            b"h" * 32,
            max(50, n // 4),
            ops.ec,
            ec.generate_private_key(ec.SECP256R1()),
        ),
        "rsasign": (
            "CKM_RSA_PKCS_KEY_PAIR_GEN",
            {"CKA_MODULUS_BITS": 2048, "CKA_PUBLIC_EXPONENT": b64(b"\x01\x00\x01")},
            "CKM_RSA_PKCS",
            SHA256_INFO + b"h" * 32,
            max(30, n // 20),
            ops.rsa,
            rsa.generate_private_key(65537, 2048),
        ),
    }
    for name, (gen, pub, mech, data, count, family, local) in pairs.items():
        st, pair = await d.call(
            "POST",
            f"/km/v1/softcards/{cid}/keys/generate-pair",
            {
                "mechanism": gen,
                "public_attrs": pub,
                "private_attrs": {"CKA_SIGN": True, "CKA_PRIVATE": True},
            },
            token=token,
            idem=uuid.uuid4().hex,
        )
        assert st in (200, 201), pair
        body = {"mechanism": mech, "key": pair["private"]["handle"], "data": b64(data)}

        async def do(i: int, body: dict[str, Any] = body) -> None:
            st, r = await d.call("POST", "/crypto/v1/sign", body, token=token)
            assert st == 200, r

        out[name] = await _measure(count, do, None)
        m = mechanisms.by_name(mech)
        assert m is not None
        alone = {"data": data}

        async def bare(
            i: int, m: Any = m, f: Any = family, k: Any = local, b: dict[str, Any] = alone
        ) -> None:
            f.sign(m, k, b)

        out[f"{name} (ops.{family.__name__.rsplit('.', 1)[1]}.sign alone)"] = await _measure(
            count, bare, None
        )
    return out


def run(n: int = 3000, backends: tuple[str, ...] = ("sqlite", "postgresql")) -> dict[str, Any]:
    import uvloop

    results: dict[str, Any] = {}
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="pkcs11ws-storecpu-") as tmp:
            if backend == "sqlite":
                results[backend] = uvloop.run(_run(Path(tmp) / "svc", None, n, None))
                continue
            from tests.support.pg_util import PgServer

            pg = PgServer()
            try:
                url = pg.new_database()
                results[backend] = uvloop.run(_run(Path(tmp) / "svc", url, n, pg.data))
            finally:
                pg.destroy()
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| store | operation | service CPU us/op | of which the event loop's thread | "
        "database CPU us/op | wall us/op |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for backend, ops in results.items():
        for op, m in ops.items():
            db = f"{m['db_us']:.0f}" if backend != "sqlite" else "(in service)"
            loop = f"{m['loop_us']:.0f}" if "loop_us" in m else "-"
            lines.append(
                f"| {backend} | {op} | {m['service_us']:.0f} | {loop} | {db} | {m['wall_us']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.store_cpu", description=__doc__.splitlines()[0]
    )
    ap.add_argument("-n", type=int, default=3000, help="sign requests (creates: n/10)")
    ap.add_argument("--backend", action="append", choices=("sqlite", "postgresql"))
    a = ap.parse_args(argv)
    res = run(a.n, tuple(a.backend or ("sqlite", "postgresql")))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
