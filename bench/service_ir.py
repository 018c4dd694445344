"""The key service's cost per request, next to the ASGI floor's (bench/floor_app.py): the same
libcurl client (curlbench) drives both, so what differs is the server's own path.

Two measures:
- instructions (default): the server runs under valgrind's callgrind with instrumentation off
  until it is ready; for each case, N1 and then N2 requests are counted between a zeroing and a
  dump of callgrind's counters (callgrind_control), and (Ir(N2) - Ir(N1)) / (N2 - N1) is the
  server's instructions per request: each run's connection set-up and TLS handshake cancel out.
  Load-robust: a busy machine changes the time, not the count.
- --cpu: the servers run normally, pinned as `make bench` pins them; each case runs for a fixed
  time with --threads clients and the server's CPU per operation comes from /proc (runner.py);
  cases alternate, --runs times. Noisy on a shared machine.

Cases: floor (the floor app), hmac (HMAC-SHA256 sign of 64 B, the token in an Authorization
header), hmac-m (the same in the module's spelling: request id and token in the body), ec (ECDSA
P-256 over a 32-byte hash), hmac-b1 / hmac-b4 / hmac-b16 / ec-b16 (the batch endpoint with 1, 4
or 16 items, each item the single request's; Ir per request, so an item costs (b16 - b1) / 15;
hmac-b4 is the batch the module's group commit sends at 8 threads, in its spelling: each
item's token in its request; hmac-vb4 the same with 4 HMAC verifies, each its own data and
MAC), rsa and
rsa-b8 (RSA-2048 PKCS#1 v1.5 with SHA-256: work that goes to the thread pool).

Run: python -m bench.service_ir [--cases floor,hmac,...] [--n1 100] [--n2 400] [--runs 2]
     python -m bench.service_ir --cpu [--threads 1] [--seconds 3] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.lab import Lab
from bench.procs import default_placement, free_port
from bench.runner import Point, Variant, run_point
from bench.services import TOKEN_LABEL, FloorServer, KeyService

CASES = (
    "floor",
    "hmac",
    "hmac-m",
    "hmac-b1",
    "hmac-b4",
    "hmac-b16",
    "hmac-vb4",
    "ec",
    "ec-b16",
    "rsa",
    "rsa-b8",
)
_VALGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no")
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def _bodies(lab: Lab, work: Path) -> dict[str, tuple[str, Path]]:
    """Per case: the URL path and the request body file."""
    from pkcs11ws.protocol import STRUCTS, encode

    def sign(handle: str, mech: str, data: bytes) -> dict[str, object]:
        return encode(STRUCTS["Sign"], {"key": handle, "mechanism": mech, "data": data})

    hmac = sign(lab.key_handle, "CKM_SHA256_HMAC", bytes(range(64)))
    ec = sign(_private_key(lab, b"p11bench-ec"), "CKM_ECDSA", bytes(range(32)))
    rsa = sign(_private_key(lab, b"p11bench-rsa"), "CKM_SHA256_RSA_PKCS", bytes(range(64)))

    def batch(req: dict[str, object], n: int) -> dict[str, object]:
        return {"items": [{"op": "sign", "token": lab.token, "request": req}] * n}

    # The module's own spelling (client/api.py crypto() and _send_batch): each item's token is
    # its request's first field, no item token.
    in_body = {"token": lab.token, **hmac}
    # Its request id is the body's first field (client/wire.py batch_body), no header.
    module_batch = {"request_id": "0a1b2c3d4e-1", "items": [{"op": "sign", "request": in_body}] * 4}
    # A single request as the module sends it (client/request_ids.py): its request id, then its
    # token, in the body; no Authorization header (_curl sends none for this case).
    module_single = {"request_id": "0a1b2c3d4e-1", **in_body}
    # A verify batch of 4 in the module's spelling (C_Verify at 8 threads): each item its own
    # data and its (valid) MAC, as separate callers' verifications are.
    vitems = []
    for data, mac in _macs(lab, [bytes([i]) * 64 for i in range(4)]):
        req = encode(
            STRUCTS["Verify"],
            {"key": lab.key_handle, "mechanism": "CKM_SHA256_HMAC", "data": data, "signature": mac},
        )
        vitems.append({"op": "verify", "request": {"token": lab.token, **req}})
    module_verify = {"request_id": "0a1b2c3d4e-1", "items": vitems}

    out: dict[str, tuple[str, Path]] = {}
    for name, path, body in (
        ("hmac", "/crypto/v1/sign", hmac),
        ("hmac-m", "/crypto/v1/sign", module_single),
        ("ec", "/crypto/v1/sign", ec),
        ("hmac-b1", "/crypto/v1/batch", batch(hmac, 1)),
        ("hmac-b4", "/crypto/v1/batch", module_batch),
        ("hmac-b16", "/crypto/v1/batch", batch(hmac, 16)),
        ("hmac-vb4", "/crypto/v1/batch", module_verify),
        ("ec-b16", "/crypto/v1/batch", batch(ec, 16)),
        ("rsa", "/crypto/v1/sign", rsa),
        ("rsa-b8", "/crypto/v1/batch", batch(rsa, 8)),
    ):
        f = work / f"{name}.json"
        f.write_bytes(json.dumps(body, separators=(",", ":")).encode())
        out[name] = (path, f)
    assert lab.body_file is not None
    out["floor"] = ("/crypto/v1/sign", lab.body_file)
    return out


def _macs(lab: Lab, datas: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(data, its HMAC-SHA256 under the bench key) per data, signed by the service."""
    from pkcs11ws.client.api import KeyServiceClient
    from pkcs11ws.config import load_config

    assert lab.ksd is not None
    client = KeyServiceClient(load_config(str(lab.ksd.client_cfg)))
    try:
        return [(d, client.sign(lab.token, lab.key_handle, "CKM_SHA256_HMAC", d)) for d in datas]
    finally:
        client.close()


def _private_key(lab: Lab, label: bytes) -> str:
    from pkcs11ws.client.api import KeyServiceClient
    from pkcs11ws.config import load_config

    assert lab.ksd is not None
    client = KeyServiceClient(load_config(str(lab.ksd.client_cfg)))
    try:
        cards = client.list_softcards()
        card = next(c for c in cards if c["name"] == TOKEN_LABEL)
        found = client.search_objects(card["id"], lab.token, {"CKA_LABEL": label, "CKA_CLASS": 3})
        return str(found[0]["handle"])
    finally:
        client.close()


def _curl(
    lab: Lab, port: int, path: str, body: Path, threads: int, count: int, secs: float
) -> tuple[list[str], dict[str, str]]:
    assert lab.ksd is not None
    d = lab.ksd
    cmd = [
        *d.curlbench(lab.bins["curlbench"], f"https://127.0.0.1:{port}{path}", body),
        "--threads",
        str(threads),
        "--warmup",
        "0",
    ]
    cmd += ["--count", str(count)] if count else ["--seconds", str(secs)]
    if body.name == "hmac-vb4.json":
        cmd += ["--expect", '"valid":true']  # (curlbench's default: a signature)
    # The module's spelling carries its token in the body: no Authorization header then.
    return cmd, {"BENCH_TOKEN": "" if body.name == "hmac-m.json" else lab.token}


def _run(cmd: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800, check=False
    )
    try:
        result = json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        result = {}
    if r.returncode != 0 or not result or result.get("errors"):
        raise RuntimeError(f"curlbench failed: {r.stdout[-500:]} {r.stderr[-1500:]}")


def _ctl(pid: int, *args: str) -> None:
    r = subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"callgrind_control {' '.join(args)} {pid} failed (exit {r.returncode}; is the "
            f"process still running under callgrind?): {(r.stdout + r.stderr)[-1000:]}"
        )


def _window(
    lab: Lab, pid: int, out: Path, port: int, case: tuple[str, Path], n: int, keep: Path | None
) -> int:
    """Ir of the server while it answers n requests (one connection)."""
    cmd, env = _curl(lab, port, case[0], case[1], 1, n, 0)
    before = set(out.parent.glob(out.name + "*"))
    _ctl(pid, "-z")
    _run(cmd, env)
    _ctl(pid, "-d")
    deadline = time.monotonic() + 120
    while True:
        new = sorted(set(out.parent.glob(out.name + "*")) - before)
        if new:
            text = new[-1].read_text(errors="replace")
            m = _TOTALS.search(text)
            if m is not None:
                if keep is not None:
                    shutil.copy(new[-1], keep)
                return int(m.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind (pid {pid}) wrote no dump {out}.N within 120 s of -d")
        time.sleep(0.5)


def instructions(
    args: argparse.Namespace, lab: Lab, work: Path, stack: contextlib.ExitStack
) -> None:
    assert lab.ksd is not None and lab.service is not None
    bodies = _bodies(lab, work)
    lab.service.stop()
    cg_svc, cg_floor = work / "cg.service", work / "cg.floor"
    svc = stack.enter_context(callgrind_service(lab, cg_svc))
    floor = None
    if "floor" in args.cases:
        floor = stack.enter_context(
            FloorServer(lab.ksd, None, (*_VALGRIND, f"--callgrind-out-file={cg_floor}"), 600)
        )
    procs = {"service": (svc.pid, cg_svc, svc.port)}
    if floor is not None:
        procs["floor"] = (floor.pid, cg_floor, floor.port)
    for pid, _, _ in procs.values():
        _ctl(pid, "-i", "on")
    results: dict[str, list[float]] = {c: [] for c in args.cases}
    for case in args.cases:
        pid, out, port = procs["floor" if case == "floor" else "service"]
        _window(lab, pid, out, port, bodies[case], 20, None)  # warm: caches, first-use imports
    for run in range(args.runs):
        for case in args.cases:
            pid, out, port = procs["floor" if case == "floor" else "service"]
            a = _window(lab, pid, out, port, bodies[case], args.n1, None)
            keep = None if args.keep is None else Path(args.keep) / f"{case}.{args.n2}.cg"
            b = _window(lab, pid, out, port, bodies[case], args.n2, keep)
            results[case].append((b - a) / (args.n2 - args.n1))
            print(f"run {run + 1} {case}: {results[case][-1]:,.0f} Ir per request", flush=True)
    for case, vals in results.items():
        print(f"{case:10s} median {statistics.median(vals):,.0f} Ir per request")


def callgrind_service(lab: Lab, out: Path) -> KeyService:
    """The lab's key service again, one worker under callgrind (collection off until _ctl turns
    it on), writing to OUT; enter it as a context manager."""
    assert lab.ksd is not None
    return KeyService(
        lab.ksd,
        1,
        None,
        "service-cg",
        free_port(),
        (*_VALGRIND, f"--callgrind-out-file={out}"),
        600,
    )


def _pid_of(server: KeyService | FloorServer) -> Callable[[], int | None]:
    return lambda: server.pid


def cpu(args: argparse.Namespace, lab: Lab, work: Path, stack: contextlib.ExitStack) -> None:
    assert lab.ksd is not None and lab.service is not None
    bodies = _bodies(lab, work)
    floor = stack.enter_context(FloorServer(lab.ksd, lab.placement.server))
    svc = lab.service
    variants: list[tuple[str, Variant, Point]] = []
    for case in args.cases:
        server = floor if case == "floor" else svc
        path, body = bodies[case]

        def command(
            p: Point, server: KeyService | FloorServer = server, path: str = path, body: Path = body
        ) -> tuple[list[str], dict[str, str]]:
            cmd, env = _curl(lab, server.port, path, body, p.threads, 0, p.seconds)
            cmd[cmd.index("--warmup") + 1] = str(p.warmup)
            cmd.append("--sync")
            return ["taskset", "-c", lab.placement.client or "0", *cmd], env

        v = Variant(case, case, command, _pid_of(server), server.port)
        variants.append((case, v, Point(case, args.threads, args.seconds, 0.5)))
    if args.module:
        variants.append(
            ("module-c", lab.module_variant(svc), Point("sign64", args.threads, args.seconds, 0.5))
        )
        variants.append(
            (
                "module-ecsign",
                lab.module_variant(svc),
                Point("ecsign", args.threads, args.seconds, 0.5),
            )
        )
    results: dict[str, list[tuple[float, float]]] = {v[0]: [] for v in variants}
    for run in range(args.runs):
        for name, v, p in variants:
            r = run_point(v, p)
            cpu_op = float(r.get("server_cpu_us_per_op", 0))
            results[name].append((cpu_op, float(r.get("ops_per_s", 0))))
            print(
                f"run {run + 1} {name} x{args.threads}: server {cpu_op:.1f} us CPU per op, "
                f"{r.get('ops_per_s', 0):,.0f} ops/s, p50 {r.get('p50_us', '?')} us, "
                f"other load {r.get('other_cpu_pct', 0):.0f}%",
                flush=True,
            )
    for name, vals in results.items():
        print(
            f"{name:14s} x{args.threads}: median server CPU "
            f"{statistics.median(c for c, _ in vals):.1f} us per op"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n1", type=int, default=100)
    ap.add_argument("--n2", type=int, default=400)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--keep", help="a folder to copy each case's last N2 dump to")
    ap.add_argument("--cpu", action="store_true", help="CPU per op from /proc, not callgrind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--module", action="store_true", help="--cpu: also module-c sign64/ecsign")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; the cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if not args.cpu and shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pkcs11ws-svc-")))
        lab = Lab(work, default_placement(), stack)
        lab.start_service_only(lambda m: print(m, file=sys.stderr))
        (cpu if args.cpu else instructions)(args, lab, work, stack)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
