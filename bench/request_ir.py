"""The key service's instructions per single request, in process, split at the answer's send:
`python -m bench.request_ir [--keep DIR]` (runs itself under valgrind's callgrind).

The service's ASGI app is called as uvicorn calls it (the scope uvicorn builds, the module's
headers, one request per event-loop turn, the answer's bytes taken at `http.response.body`),
next to bench/floor_app.py's app; no TLS and no HTTP parsing (they cost the same for both:
bench/service_ir.py measures the whole server). Callgrind counts between markers: a call of
os.getppid() zeroes the counters (--zero-before), a call of os.getgid() dumps them
(--dump-before). Per request two dumps: from the app's call to the answer's body send
("before": what the 1-thread latency waits for) and from there to the app's return ("after":
CPU only). Pieces of the path are timed alone the same way (a loop of calls between markers).

The markers are named by the C library's functions those two calls end in (`getppid`,
`getgid`: glibc exports them, so callgrind sees their names in any build), not by the
interpreter's wrappers (`os_getppid`, `os_getgid`: static functions whose names a stripped
interpreter such as Debian's /usr/bin/python3.11 does not carry; with those names callgrind
never zeroed nor dumped and the tool ended without a figure). The count of dumps is checked:
a marker callgrind did not see, or one something else also calls, is an error that says so.
Before each case and piece one uncounted dump empties every thread's counters (the zeroing
marker clears only its own thread's: the first request's figure held the worker threads'
earlier work, ~53M Ir, which the median of 3 or more requests had hidden).

Cases: floor (the floor app), hmac (HMAC-SHA256 sign of 64 B in the module's spelling: the
request id and the token in the body, client/wire.py and client/request_ids.py), hmac-header
(the token in an Authorization header, as bench/service_ir.py's hmac case), the refusals
bad-token, no-key, bad-json (generic path), and batch-1/4/16 (the batch endpoint in the
module's spelling, 1, 4 or 16 such signs: (batch-16 - batch-1) / 15 is an item's cost).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)
# glibc's exported functions that os.getppid() and os.getgid() call (see the docstring).
ZERO_AT, DUMP_AT = "getppid", "getgid"
CASES = ("floor", "hmac", "hmac-header", "bad-token", "no-key", "bad-json", "batch-1",
         "batch-4", "batch-16")  # fmt: skip
PASSPHRASE = b"bench-request-passphrase"  # not a secret: a throw-away card


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Caller:
    """One kept connection's requests, as uvicorn hands them to the app."""

    def __init__(self, app: Any, client_pem: bytes, port: int) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        from pkcs11ws.server.identity import Peer
        from pkcs11ws.server.peer import PEER_KEY

        self.app = app
        der = x509.load_pem_x509_certificate(client_pem).public_bytes(Encoding.DER)
        self.state = {PEER_KEY: Peer(der)}
        self.port = port
        self.marks = False  # call the markers around the answer's send

    def scope(self, method: str, path: str, raw: bytes, extra: list[tuple[bytes, bytes]]) -> Any:
        headers = [
            (b"host", b"127.0.0.1:%d" % self.port),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            *extra,
        ]
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", self.port),
            "client": ("127.0.0.1", 40000),
            "scheme": "https",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "state": self.state.copy(),
        }

    async def call(
        self, method: str, path: str, raw: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> tuple[int, bytes]:
        scope = self.scope(method, path, raw, extra or [])
        out: list[Any] = []
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        marks = self.marks

        async def send(msg: dict[str, Any]) -> None:
            out.append(msg)
            if marks and msg["type"] == "http.response.body":
                os.getgid()  # dump: the "before" part ends here

        if marks:
            os.getppid()  # zero
        await self.app(scope, receive, send)
        if marks:
            os.getgid()  # dump: the "after" part
        return out[0]["status"], out[1]["body"]


class MarkerError(RuntimeError):
    """Callgrind's dumps do not match the markers the tool called."""


def _expect(got: int, want: int, what: str) -> None:
    if got == want:
        return
    if got == 0:
        why = (
            f"callgrind wrote no dump: it did not see the marker functions {ZERO_AT}() and "
            f"{DUMP_AT}() (run under `valgrind --tool=callgrind --zero-before={ZERO_AT} "
            f"--dump-before={DUMP_AT}`, as `python -m bench.request_ir` does)"
        )
    else:
        why = f"callgrind wrote {got} dumps, not {want}: something else calls {DUMP_AT}()"
    raise MarkerError(f"{what}: {why}")


def _flush(out: Path, seen: int, what: str) -> int:
    """One dump, not counted, just before a measured run: it empties every thread's counters.
    The zeroing marker clears only the calling thread's, while a dump writes (and clears) all
    threads' (no --separate-threads): the first measured dump held the kdf and to_thread
    workers' whole lives so far (~53M Ir: the card's creation and activation)."""
    os.getgid()
    new = len(_dumps(out)) - seen
    _expect(new, 1, what + " (the dump before it)")
    return seen + new


def _dumps(prefix: Path) -> list[int]:
    """Ir of each dump callgrind wrote so far, in order."""
    files = sorted(
        (p for p in prefix.parent.glob(prefix.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
    )
    out = []
    for p in files:
        m = _TOTALS.search(p.read_text(errors="replace"))
        out.append(int(m.group(1)) if m else 0)
    return out


async def _inner(work: Path, n: int, out: Path, pieces: bool, only: list[str]) -> None:
    from bench import floor_app
    from pkcs11ws.server import pki, settings
    from pkcs11ws.server.app import App
    from pkcs11ws.server.worker import configure_logging

    res = pki.init(work, port=18001, scrypt_n=2**10)
    s = settings.load(res.server_yaml)
    s = type(s)(**{**s.__dict__, "log_file": work / "service.log", "access_log": True})
    configure_logging(s)
    app = App(s)
    c = Caller(app, (work / "pki" / "client.pem").read_bytes(), 18001)

    async def js(method: str, path: str, body: Any, extra: Any = None) -> Any:
        st, raw = await c.call(method, path, json.dumps(body).encode(), extra)
        assert st < 300, raw
        return json.loads(raw)

    idem = [(b"idempotency-key", uuid.uuid4().hex.encode())]
    card = await js(
        "POST", "/km/v1/softcards", {"name": "rq", "passphrase": _b64(PASSPHRASE)}, idem
    )
    act = await js(
        "POST", f"/km/v1/softcards/{card['id']}/activate", {"passphrase": _b64(PASSPHRASE)}
    )
    token = act["token"]
    key = await js(
        "POST",
        f"/km/v1/softcards/{card['id']}/objects",
        {
            "attrs": {
                "CKA_CLASS": 4,
                "CKA_KEY_TYPE": 0x2B,
                "CKA_VALUE": _b64(b"k" * 32),
                "CKA_SIGN": True,
            }
        },
        [
            (b"authorization", f"Bearer {token}".encode()),
            (b"idempotency-key", uuid.uuid4().hex.encode()),
        ],
    )
    data = _b64(bytes(range(64)))
    head = f'{{"request_id":"0a1b2c3d4e-{{}}","token":"{token}","key":"{key["handle"]}",'
    module = (head + f'"mechanism":"CKM_SHA256_HMAC","data":"{data}"}}').encode()
    plain = json.dumps(
        {"key": key["handle"], "mechanism": "CKM_SHA256_HMAC", "data": data},
        separators=(",", ":"),
    ).encode()
    auth = [(b"authorization", f"Bearer {token}".encode())]
    # A batch in the module's spelling (client/wire.py batch_body: its request id the body's
    # first field, each item's token in its request).
    one = module.replace(b'"request_id":"0a1b2c3d4e-{}",', b"")
    items = {n: b",".join([b'{"op":"sign","request":' + one + b"}"] * n) for n in (1, 4, 16)}

    def batch(n: int, i: int) -> Any:
        raw = b'{"request_id":"0a1b2c3d4e-%d","items":[%s]}' % (i, items[n])
        return c.call("POST", "/crypto/v1/batch", raw)

    bad_token = module.replace(token[-12:].encode(), b"A" * 12)
    no_key = module.replace(key["handle"].encode(), b"0" * len(key["handle"]))
    cases: dict[str, Callable[[int], Any]] = {
        "floor": lambda i: c.call("POST", "/crypto/v1/sign", b"x" * 64),
        "hmac": lambda i: c.call("POST", "/crypto/v1/sign", module.replace(b"{}", b"%d" % i, 1)),
        "hmac-header": lambda i: c.call("POST", "/crypto/v1/sign", plain, auth),
        "bad-token": lambda i: c.call("POST", "/crypto/v1/sign", bad_token.replace(b"{}", b"1")),
        "no-key": lambda i: c.call("POST", "/crypto/v1/sign", no_key.replace(b"{}", b"1")),
        "bad-json": lambda i: c.call("POST", "/crypto/v1/sign", b'{"key":1}', auth),
        "batch-1": lambda i: batch(1, i),
        "batch-4": lambda i: batch(4, i),
        "batch-16": lambda i: batch(16, i),
    }
    assert tuple(cases) == CASES, "CASES lists the cases"
    if only:
        cases = {k: v for k, v in cases.items() if k in only}
    results: dict[str, tuple[float, float]] = {}
    seen = 0
    for name, fn in cases.items():
        c.app = floor_app.app if name == "floor" else app
        for i in range(30):  # warm: caches, first-use imports, the verdict cache
            await fn(i)
            await asyncio.sleep(0)
        seen = _flush(out, seen, f"case {name}")
        c.marks = True
        for i in range(n):
            st, body = await fn(1000 + i)
            await asyncio.sleep(0)  # each request in its own event-loop turn, as at 1 thread
        c.marks = False
        ir = _dumps(out)
        new = ir[seen:]
        seen = len(ir)
        _expect(len(new), 2 * n, f"case {name}")
        before, after = new[0::2], new[1::2]
        results[name] = (statistics.median(before), statistics.median(after))
        print(
            f"{name:12s} before send {results[name][0]:9,.0f}  after {results[name][1]:8,.0f}"
            f"  total {sum(results[name]):9,.0f}  (status {st}: {body[:60]!r})",
            flush=True,
        )
    if pieces:
        await _pieces(app, c, module, plain, items, out, seen, n)
    app.store.close()


async def _pieces(
    app: Any,
    c: Caller,
    module: bytes,
    plain: bytes,
    items: dict[int, bytes],
    out: Path,
    seen: int,
    n: int,
) -> None:
    """Parts of the hmac case's path, each called n times in a row between the markers."""
    import hmac as hmac_mod
    import time

    from pkcs11ws.server import app as app_mod
    from pkcs11ws.server import fastjson, metrics

    raw = module.replace(b"{}", b"7", 1)
    scope = c.scope("POST", "/crypto/v1/sign", raw, [])
    body = app_mod._decode("Sign", raw)
    app_mod._request_id(dict(body))
    token = body.pop("token")
    auth = app_mod._bearer(token)
    ident = scope["state"]["pkcs11ws.peer"].identity
    svc = app.service
    claims = svc.authenticate(auth, None, ident)
    key = b"k" * 32
    from pkcs11ws import protocol
    from pkcs11ws.server.pipeline import Request

    b1 = b'{"request_id":"r-1","items":[%s]}' % items[1]
    b16 = b'{"items":[%s]}' % items[16]
    batch_ep = protocol.ENDPOINT_BY_OP["batch"]

    def batch_handler(raw: bytes) -> Any:
        """App._batch of a decoded body, driven to its end (no await suspends it here)."""
        req = Request(batch_ep, {}, {}, app_mod._decode("Batch", raw), None, None, ident)
        try:
            app._batch(req).send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("the batch handler waited")

    parts: dict[str, Callable[[], Any]] = {
        "decode (fastjson Sign)": lambda: app_mod._decode("Sign", raw),
        "decode (fastjson.batch, 16 items)": lambda: fastjson.batch(b16),
        "decode (Batch, 1 item, body request id)": lambda: app_mod._decode("Batch", b1),
        "decode + App._batch (1 item)": lambda: batch_handler(b1),
        "decode + App._batch (16 items)": lambda: batch_handler(b16),
        "_request_id": lambda: app_mod._request_id({"request_id": "0a1b2c3d4e-7"}),
        "_bearer": lambda: app_mod._bearer(token),
        "authenticate": lambda: svc.authenticate(auth, None, ident),
        "crypto_now (HMAC, verdict hit)": lambda: svc.crypto_now(claims, dict(body), "sign"),
        "hmac.digest (floor's)": lambda: hmac_mod.digest(key, raw[:64], "sha256"),
        "_route": lambda: app._route("POST", "/crypto/v1/sign"),
        "request_done": lambda: metrics.request_done("sign", 200, 0.0001, None),
        "access line": lambda: app._access_log.write("POST", "/crypto/v1/sign", 200, 0.1),
        "change mark": lambda: app.store.change_mark(),
        "time.time": time.time,
    }
    for name, fn in parts.items():
        for _ in range(5):
            fn()
        seen = _flush(out, seen, f"piece {name}")
        os.getppid()
        for _ in range(n):
            fn()
        os.getgid()
        ir = _dumps(out)[seen:]
        seen += len(ir)
        _expect(len(ir), 1, f"piece {name}")
        print(f"  piece {name:32s} {ir[-1] / n:8,.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="measured requests per case")
    ap.add_argument("--keep", help="a folder to keep the callgrind dumps in")
    ap.add_argument("--pieces", action="store_true", help="also parts of the hmac path alone")
    ap.add_argument("--cases", default="", help="comma-separated cases (default: all)")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        only = [c for c in args.cases.split(",") if c]
        try:
            asyncio.run(
                _inner(Path(args.inner), args.n, Path(args.inner) / "cg.out", args.pieces, only)
            )
        except MarkerError as err:
            print(f"bench.request_ir: {err}", file=sys.stderr)
            return 2
        return 0
    unknown = [c for c in args.cases.split(",") if c and c not in CASES]
    if unknown:
        print(f"bench.request_ir: unknown cases {unknown}; the cases: {', '.join(CASES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if shutil.which("valgrind") is None:
        print("bench.request_ir: valgrind is not installed", file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pkcs11ws-rq-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "valgrind.log"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--zero-before={ZERO_AT}",
        f"--dump-before={DUMP_AT}",
        "--collect-atstart=yes",
        f"--log-file={log}",
        f"--callgrind-out-file={work / 'cg.out'}",
        sys.executable,
        "-m",
        "bench.request_ir",
        "-n",
        str(args.n),
        "--inner",
        str(work),
        *(["--pieces"] if args.pieces else []),
        *(["--cases", args.cases] if args.cases else []),
    ]
    # valgrind's own messages go to its log; the measured program's errors reach stderr.
    r = subprocess.run(cmd, check=False)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
        print(
            f"bench.request_ir: the run under callgrind ended with exit code {r.returncode}"
            f" (its errors are above; valgrind's log {log} ends):\n{tail}",
            file=sys.stderr,
        )
    return r.returncode


if __name__ == "__main__":
    raise SystemExit(main())
