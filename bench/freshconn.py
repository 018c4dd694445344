"""The key service's cost per FRESH connection (what `pkcs11-tool -L` pays once), A/B.

    python -m bench.freshconn [--base-root OTHER_TREE] [--rounds 10] [--per-round 40]
                              [--path /km/v1/softcards]

Starts this tree's key service (one worker, on the server CPU, as the bench places it) and,
with --base-root, another tree's service (its own .venv's Python, the same service folder, its
own port), then opens fresh mutual-TLS connections to them in turn from this process (pinned to
the client CPU): connect, handshake, one GET, read the answer, close_notify, close. Per service
it prints the server's CPU per connection (utime + stime of its process from /proc, over each
round) and the client's median time from the handshake's start to the answer's last byte.
A round of each service alternates with the other's, so drifts of this shared box's speed fall
on both. Not a target: a tool to judge a change to the service's per-connection work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import default_placement, free_port, pinned, stop_pid, wait_for
from bench.services import TOKEN_LABEL, KeyService, KeyServiceDir, _https_ok


def _cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def _one(ctx: ssl.SSLContext, port: int, request: bytes) -> float:
    t0 = time.perf_counter()
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    took = time.perf_counter() - t0
    with contextlib.suppress(OSError, ssl.SSLError):
        s.unwrap()
    s.close()
    return took * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-root", help="another tree (with its .venv) whose service to compare")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=40)
    ap.add_argument("--path", default="/km/v1/softcards")
    ap.add_argument(
        "--pkcs11-tool",
        type=int,
        default=0,
        metavar="N",
        help="also N alternating `pkcs11-tool -L` runs (this tree's module) against each service",
    )
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="with --pkcs11-tool: one -L per service under callgrind (client instructions)",
    )
    ap.add_argument("--perf", help="perf record -g this tree's service into this file")
    args = ap.parse_args()
    placement = default_placement()
    if placement.client is not None:
        os.sched_setaffinity(0, {int(placement.client)})
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        ksd = KeyServiceDir.init(Path(work) / "service")
        services: dict[str, tuple[int, int]] = {}
        this = stack.enter_context(KeyService(ksd, 1, placement.server, "this"))
        assert this.proc is not None
        services["this"] = (this.proc.pid, this.port)
        if args.base_root:
            root = Path(args.base_root)
            port = free_port()
            log = (ksd.dir / "log" / "base.out").open("wb")
            cmd = [
                str(root / ".venv" / "bin" / "python"),
                "-m",
                "pkcs11ws.server.cli",
                "serve",
                "--config",
                str(ksd.server_yaml),
                "--port",
                str(port),
                "--workers",
                "1",
                "--admin-port",
                str(free_port()),
            ]
            proc = subprocess.Popen(
                pinned(cmd, placement.server),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=root,
            )
            stack.callback(stop_pid, proc)
            wait_for(
                lambda: _https_ok(port, ksd.ca, ksd.cert, ksd.key, "/health"),
                60,
                "the base service",
                proc,
            )
            services["base"] = (proc.pid, port)
        if args.pkcs11_tool:  # one softcard, as the bench's -L lists (its objects aside)
            from pkcs11ws.client.api import KeyServiceClient
            from pkcs11ws.config import load_config

            client = KeyServiceClient(load_config(str(ksd.client_cfg)))
            try:
                client.create_softcard(TOKEN_LABEL, b"freshconn passphrase")
            finally:
                client.close()
        ctx = ssl.create_default_context(cafile=str(ksd.ca))
        ctx.load_cert_chain(str(ksd.cert), str(ksd.key))
        request = f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        cpu: dict[str, list[float]] = {name: [] for name in services}
        walls: dict[str, list[float]] = {name: [] for name in services}
        for _name, (_, port) in services.items():  # warm-up
            for _ in range(5):
                _one(ctx, port, request)
        recorder = None
        if args.perf:
            recorder = subprocess.Popen(
                ["perf", "record", "-q", "-g", "-o", args.perf, "-p", str(services["this"][0])]
            )
            time.sleep(1)
        for _ in range(args.rounds):
            for name, (pid, port) in services.items():
                c0 = _cpu_ms(pid)
                for _ in range(args.per_round):
                    walls[name].append(_one(ctx, port, request))
                cpu[name].append((_cpu_ms(pid) - c0) / args.per_round)
        tool_walls: dict[str, list[float]] = {name: [] for name in services}
        tool_cpus: dict[str, list[float]] = {name: [] for name in services}
        if args.pkcs11_tool:
            from bench.startab import _callgrind, _run
            from pkcs11ws.paths import module_path

            tool = ["pkcs11-tool", "--module", str(module_path()), "-L"]
            for _ in range(args.pkcs11_tool):
                for name, (_, port) in services.items():
                    env = {**os.environ, "PKCS11WS_CONFIG": str(ksd.client_cfg),
                           "PKCS11WS_PORT": str(port)}  # fmt: skip
                    wall, cpu_ms, _, rc, out = _run(pinned(tool, placement.client), env)
                    if rc != 0:
                        raise RuntimeError(f"pkcs11-tool -L failed ({rc}):\n{out}")
                    tool_walls[name].append(wall)
                    tool_cpus[name].append(cpu_ms)
            for name, (_, port) in services.items() if args.callgrind else ():
                env = {**os.environ, "PKCS11WS_CONFIG": str(ksd.client_cfg),
                       "PKCS11WS_PORT": str(port)}  # fmt: skip
                print(
                    f"  {name:5s} pkcs11-tool -L instructions {_callgrind(tool, env) / 1e6:.1f} M"
                )
        if recorder is not None:
            recorder.send_signal(2)
            recorder.wait()
        print(
            f"{args.rounds} x {args.per_round} fresh connections each, GET {args.path}, "
            f"load {os.getloadavg()[0]:.1f}, {placement.describe()}"
        )
        for name in services:
            print(
                f"  {name:5s} server CPU per connection median {statistics.median(cpu[name]):.3f}"
                f" ms (min round {min(cpu[name]):.3f}); client handshake+answer median "
                f"{statistics.median(walls[name]):.2f} ms, min {min(walls[name]):.2f}"
            )
        for name in services if args.pkcs11_tool else ():
            w, c = tool_walls[name], tool_cpus[name]
            waits = [a - b for a, b in zip(w, c, strict=True)]
            print(
                f"  {name:5s} pkcs11-tool -L wall median {statistics.median(w):.1f} ms, min "
                f"{min(w):.1f}; client CPU median {statistics.median(c):.1f}, min {min(c):.1f};"
                f" wall - CPU (waits) median {statistics.median(waits):.1f}"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
