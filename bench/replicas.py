"""Key service replicas on PostgreSQL against one service on SQLite: `python -m bench.replicas`.

HMAC-SHA256 over 64 bytes (sign64) with the C load generator (curlbench: libcurl, real mutual
TLS, one kept-alive connection per thread), for: one service on SQLite (the default), one replica
on PostgreSQL, two replicas on PostgreSQL (the threads split between them, one curlbench per
replica, ops/s summed). Per configuration: ops/s, the replicas' CPU per operation, the database
cluster's CPU per operation (all its processes, /proc).

On a 2-core machine the load generator, the replicas and PostgreSQL share the same two cores, so a
second replica cannot add throughput: this shows the overhead of the database and of a second
replica, not the gain. The gain on real hardware is estimated from the per-request CPU: with R
replicas on R machines, about R x (1 s / service CPU per op) until the database server's CPU per op
saturates it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.build import BENCH_DIR, build_curlbench
from bench.procs import free_port, tree_cpu
from bench.services import KeyService, KeyServiceDir
from bench.store_cpu import PASSPHRASE, _cluster_pids, _proc_cpu

ROOT = BENCH_DIR.parent
SCRYPT_N = 1024


def _init(directory: Path, store: str | None) -> KeyServiceDir:
    cmd = [
        sys.executable,
        "-m",
        "pkcs11ws.server.cli",
        "init",
        str(directory),
        "--port",
        str(free_port()),
        "--scrypt-n",
        str(SCRYPT_N),
    ]
    if store:
        cmd += ["--store", store]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"pkcs11ws-server init failed: {r.stderr.strip()}")
    # Access log off: it costs the same on every store and is not what is compared here.
    y = directory / "server.yaml"
    y.write_text(y.read_text().replace("access: true", "access: false"))
    return KeyServiceDir(directory)


def _prepare(d: KeyServiceDir, port: int) -> tuple[str, str]:
    """A softcard, an activation and an HMAC key, through the service: (token, sign body)."""
    import base64
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=str(d.ca))
    ctx.load_cert_chain(str(d.cert), str(d.key))
    con = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)

    def call(path: str, body: Any, token: str | None = None) -> Any:
        h = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        if token:
            h["Authorization"] = f"Bearer {token}"
        con.request("POST", path, json.dumps(body), h)
        r = con.getresponse()
        data = json.loads(r.read())
        if r.status >= 300:
            raise RuntimeError(f"{path}: {r.status} {data}")
        return data

    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    card = call("/km/v1/softcards", {"name": uuid.uuid4().hex[:16], "passphrase": b64(PASSPHRASE)})
    token = call(f"/km/v1/softcards/{card['id']}/activate", {"passphrase": b64(PASSPHRASE)})[
        "token"
    ]
    key = call(
        f"/km/v1/softcards/{card['id']}/objects",
        {
            "attrs": {
                "CKA_CLASS": 4,
                "CKA_KEY_TYPE": 0x2B,
                "CKA_VALUE": b64(b"k" * 32),
                "CKA_SIGN": True,
            }
        },
        token,
    )["handle"]
    con.close()
    body = json.dumps({"mechanism": "CKM_SHA256_HMAC", "key": key, "data": b64(b"x" * 64)})
    return token, body


def _load(
    curlbench: Path,
    d: KeyServiceDir,
    ports: list[int],
    token: str,
    body_file: Path,
    threads: int,
    seconds: float,
) -> list[dict[str, Any]]:
    procs = []
    per = max(1, threads // len(ports))
    for port in ports:
        cmd = [
            *d.curlbench(curlbench, f"https://127.0.0.1:{port}/crypto/v1/sign", body_file),
            "--token-env",
            "BENCH_TOKEN",
            "--threads",
            str(per),
            "--seconds",
            str(seconds),
            "--warmup",
            "0.5",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "BENCH_TOKEN": token},
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=seconds + 120)
        lines = [ln for ln in stdout.decode().splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"curlbench failed: {stderr.decode()[-500:]}")
        out.append(json.loads(lines[-1]))
    return out


def _measure(
    name: str,
    d: KeyServiceDir,
    replicas: int,
    threads: int,
    seconds: float,
    curlbench: Path,
    pg_data: Path | None,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        services = [
            stack.enter_context(KeyService(d, 1, None, f"{name}-{i}", port=free_port()))
            for i in range(replicas)
        ]
        token, body = _prepare(d, services[0].port)
        body_file = d.dir / "sign64.json"
        body_file.write_text(body)
        # Warm every replica (its caches, the database connections) before measuring.
        _load(curlbench, d, [s.port for s in services], token, body_file, replicas, 0.5)
        svc0 = [sum(tree_cpu(s.pid).values(), 0.0) for s in services]
        db_pids = _cluster_pids(pg_data) if pg_data else []
        db0, t0 = _proc_cpu(db_pids), time.monotonic()
        results = _load(
            curlbench, d, [s.port for s in services], token, body_file, threads, seconds
        )
        wall = time.monotonic() - t0
        svc_cpu = sum(
            sum(tree_cpu(s.pid).values(), 0.0) - c0 for s, c0 in zip(services, svc0, strict=True)
        )
        db_cpu = _proc_cpu(_cluster_pids(pg_data)) - db0 if pg_data else 0.0
    errors = sum(r["errors"] for r in results)
    # The CPU was read around the whole run (warm-up included), the ops count the measured
    # window only: spread the CPU over the ops of the whole run at the measured rate.
    ops_all = sum(r["ops"] for r in results) * max(wall, 1e-9) / seconds
    return {
        "config": name,
        "replicas": replicas,
        "threads": threads,
        "ops_per_s": sum(r["ops_per_s"] for r in results),
        "errors": errors,
        "p50_us": max(r["p50_us"] for r in results),
        "service_cpu_us_per_op": svc_cpu / max(1.0, ops_all) * 1e6,
        "db_cpu_us_per_op": db_cpu / max(1.0, ops_all) * 1e6,
    }


def run(threads: int = 8, seconds: float = 3.0) -> list[dict[str, Any]]:
    from tests.support.pg_util import PgServer

    curlbench = build_curlbench()
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pkcs11ws-replicas-") as tmp:
        sq = _init(Path(tmp) / "sqlite", None)
        out.append(_measure("sqlite x1", sq, 1, threads, seconds, curlbench, None))
        pg = PgServer()
        try:
            d = _init(Path(tmp) / "pg", pg.new_database())
            out.append(_measure("postgresql x1", d, 1, threads, seconds, curlbench, pg.data))
            out.append(_measure("postgresql x2", d, 2, threads, seconds, curlbench, pg.data))
        finally:
            pg.destroy()
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | client threads | ops/s | p50 us | service CPU us/op | "
        "database CPU us/op | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['threads']} | {r['ops_per_s']:.0f} | {r['p50_us']:.0f}"
            f" | {r['service_cpu_us_per_op']:.0f} | {r['db_cpu_us_per_op']:.0f}"
            f" | {r['errors']} |"
        )
    pg = [r for r in rows if r["config"].startswith("postgresql")]
    if pg:
        per = pg[0]["service_cpu_us_per_op"] + pg[0]["db_cpu_us_per_op"]
        lines.append("")
        lines.append(
            f"On this machine every process shares {os.cpu_count()} cores, so a second replica "
            "shows its overhead, not a gain. Estimate for replicas on their own machines: one "
            f"replica core serves about {1e6 / max(pg[0]['service_cpu_us_per_op'], 1):.0f} "
            f"signs/s; the database needs about {pg[0]['db_cpu_us_per_op']:.0f} us of CPU per "
            f"sign, so one database core carries about "
            f"{1e6 / max(pg[0]['db_cpu_us_per_op'], 1):.0f} signs/s (of {per:.0f} us in all)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.replicas", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args(argv)
    print(table(run(a.threads, a.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
