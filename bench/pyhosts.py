"""Python-side load generators, with p11bench's loop, markers and JSON result line:

  pycurl   the module's sign request straight through pycurl (the system libcurl), one handle
           per thread kept alive, the module's TLS options: the Python transport floor
  client   pkcs11ws.client.KeyServiceClient.sign (protocol encode/decode, retry policy,
           transport) without PKCS#11: the module minus the Cython core and the provider
  pkcs11   python-pkcs11 (PyPI) signing through a PKCS#11 module (ours in the benchmarks):
           a Python host of the module

--churn N (pkcs11 mode): thread churn, as hosts with elastic thread pools make it: each of the
--threads slots runs its signatures on short-lived threads, a new one (with its own session:
C_OpenSession, C_FindObjects, then N x C_Sign, C_CloseSession) every N signatures. The result
adds the threads started and the TLS connections the module opened in the measured window.

Secrets come from the environment: BENCH_TOKEN (activation token), P11BENCH_PIN (the PIN).
Run: python -m bench.pyhosts MODE [options]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Op = Callable[[], None]


def _pct(sorted_ns: list[int], pct: float) -> float:
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, int(len(sorted_ns) * pct / 100.0))
    return sorted_ns[i] / 1e3


def _marker(what: str, sync: bool) -> None:
    print(f"#{what}", flush=True)
    if sync:
        sys.stdin.readline()


def run_loop(
    make_op: Callable[[int], Op],
    threads: int,
    seconds: float,
    warmup: float,
    count: int,
    sync: bool = False,
) -> dict[str, Any]:
    """Each thread builds its op (own handle/session), then loops; only ops that complete
    inside the measured window count (or exactly `count` ops in all when count > 0)."""
    phase = [0]  # 0 warm-up, 1 measuring, 2 stop
    lat: list[list[int]] = [[] for _ in range(threads)]
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)
    clock = time.perf_counter_ns

    def worker(i: int) -> None:
        try:
            op = make_op(i)
            if not count:
                op()  # connect outside the measured window, as the module's first call does
        except Exception as e:
            errors.append(f"setup: {e!r}")
            barrier.wait()
            return
        mine = lat[i]
        barrier.wait()
        if count:
            n = count // threads + (i < count % threads)
            try:
                for _ in range(n):
                    t0 = clock()
                    op()
                    mine.append(clock() - t0)
            except Exception as e:
                errors.append(f"{e!r}")
            return
        try:
            while phase[0] != 2:
                t0 = clock()
                op()
                t1 = clock()
                if phase[0] == 1:
                    mine.append(t1 - t0)
        except Exception as e:
            errors.append(f"{e!r}")

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    if not count:
        time.sleep(warmup)
    _marker("measure-start", sync)
    c0 = module_connects()
    b0 = batch_sizes()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    phase[0] = 1
    if count:
        for t in ts:
            t.join()
    else:
        time.sleep(seconds)
        phase[0] = 2
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = module_connects()
    b1 = batch_sizes()
    _marker("measure-stop", sync)
    for t in ts:
        t.join()
    every = sorted(x for per in lat for x in per)
    ops = len(every)
    secs = t1 - t0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "threads": threads,
        "seconds": round(secs, 4),
        "ops": ops,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "ops_per_s": ops / secs if secs > 0 else 0.0,
        "mean_us": sum(every) / ops / 1e3 if ops else 0.0,
        "p50_us": _pct(every, 50),
        "p90_us": _pct(every, 90),
        "p99_us": _pct(every, 99),
        "max_us": every[-1] / 1e3 if every else 0.0,
        "cpu_us_per_op": cpu * 1e6 / ops if ops else 0.0,
        "user_s": ru1.ru_utime - ru0.ru_utime,
        "sys_s": ru1.ru_stime - ru0.ru_stime,
        "module_connects": c1 - c0 if c0 >= 0 else -1,  # TLS connections in the window
        # Requests the client sent in the window, by the number of calls each carried.
        "batch_sizes": {n: k - b0.get(n, 0) for n, k in sorted(b1.items()) if k > b0.get(n, 0)},
    }


_CLIENTS: list[Any] = []  # KeyServiceClients made here (client mode)


def batch_sizes() -> dict[int, int]:
    """The group commit's requests so far, by the number of calls each carried (client/group.py);
    empty when batching is off or no client of ours is in this process."""
    core = sys.modules.get("pkcs11ws._native.core")
    provider = core.current_provider() if core is not None else None
    clients = [*_CLIENTS, *([provider.client] if provider is not None else [])]
    out: dict[int, int] = {}
    for c in clients:
        group = getattr(c, "group", None)
        for n, k in dict(group.sizes if group is not None else {}).items():
            out[n] = out.get(n, 0) + k
    return out


def module_connects() -> int:
    """TLS connections our module made in this process so far (-1: not loaded here)."""
    core = sys.modules.get("pkcs11ws._native.core")
    provider = core.current_provider() if core is not None else None
    if provider is None:
        return -1
    return int(provider.client.stats()["connects"])


def run_churn(
    make_op: Callable[[int], Op], threads: int, seconds: float, warmup: float, per_thread: int
) -> dict[str, Any]:
    """run_loop's measurement with thread churn: slot i runs make_op(i) and then per_thread
    ops on a new thread, again and again (the op's `close` attribute, if any, ends its session)."""
    phase = [0]  # 0 warm-up, 1 measuring, 2 stop
    lat: list[list[int]] = [[] for _ in range(threads)]
    errors: list[str] = []
    started = [0] * threads
    clock = time.perf_counter_ns

    def life(i: int) -> None:
        try:
            op = make_op(i)
            try:
                mine = lat[i]
                for _ in range(per_thread):
                    if phase[0] == 2:
                        return
                    t0 = clock()
                    op()
                    t1 = clock()
                    if phase[0] == 1:
                        mine.append(t1 - t0)
            finally:
                close = getattr(op, "close", None)
                if close is not None:
                    close()
        except Exception as e:
            errors.append(f"{e!r}")

    def slot(i: int) -> None:
        while phase[0] != 2 and not errors:
            t = threading.Thread(target=life, args=(i,))
            t.start()
            t.join()
            if phase[0] == 1:
                started[i] += 1

    slots = [threading.Thread(target=slot, args=(i,), daemon=True) for i in range(threads)]
    for t in slots:
        t.start()
    time.sleep(warmup)
    c0 = module_connects()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    phase[0] = 1
    time.sleep(seconds)
    phase[0] = 2
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = module_connects()
    for t in slots:
        t.join()
    every = sorted(x for per in lat for x in per)
    ops = len(every)
    secs = t1 - t0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "threads": threads,
        "churn": per_thread,
        "seconds": round(secs, 4),
        "ops": ops,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "ops_per_s": ops / secs if secs > 0 else 0.0,
        "p50_us": _pct(every, 50),
        "p99_us": _pct(every, 99),
        "cpu_us_per_op": cpu * 1e6 / ops if ops else 0.0,
        "threads_started": sum(started),
        "module_connects": c1 - c0 if c0 >= 0 else -1,
    }


# ---------------------------------------------------------------------------------- modes


def pycurl_ops(a: argparse.Namespace) -> Callable[[int], Op]:
    import pycurl

    from pkcs11ws import __version__

    body = open(a.body_file, "rb").read()  # noqa: SIM115 - read once at start-up
    token = os.environ.get("BENCH_TOKEN", "")
    headers = ["Content-Type: application/json", "Accept: application/json", "Expect:"]
    if token:
        headers.append(f"Authorization: Bearer {token}")
    share = pycurl.CurlShare()
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_SSL_SESSION)

    def make(i: int) -> Op:
        chunks: list[bytes] = []
        c = pycurl.Curl()
        for opt, val in (
            (pycurl.SHARE, share),
            (pycurl.NOSIGNAL, 1),
            (pycurl.PROTOCOLS, pycurl.PROTO_HTTPS),
            (pycurl.FOLLOWLOCATION, 0),
            (pycurl.NOPROXY, "*"),
            (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
            (pycurl.USERAGENT, f"libpkcs11ws/{__version__}"),
            (pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2),
            (pycurl.SSL_VERIFYPEER, 1),
            (pycurl.SSL_VERIFYHOST, 2),
            (pycurl.CAINFO, a.ca),
            (pycurl.CAPATH, None),
            (pycurl.SSLCERT, a.cert),
            (pycurl.SSLKEY, a.key),
            (pycurl.CONNECTTIMEOUT, 10),
            (pycurl.TIMEOUT, 30),
            (pycurl.TCP_NODELAY, 1),
            (pycurl.TCP_KEEPALIVE, 1),
            (pycurl.URL, a.url),
            (pycurl.POSTFIELDS, body),
            (pycurl.HTTPHEADER, headers),
            (pycurl.WRITEFUNCTION, chunks.append),
        ):
            c.setopt(opt, val)

        def op() -> None:
            c.perform()
            status = c.getinfo(pycurl.RESPONSE_CODE)
            data = b"".join(chunks)
            chunks.clear()
            if status != 200 or b'"signature"' not in data:
                raise RuntimeError(f"HTTP {status}")

        return op

    return make


def client_ops(a: argparse.Namespace) -> Callable[[int], Op]:
    from pkcs11ws.client.api import KeyServiceClient
    from pkcs11ws.config import load_config

    client = KeyServiceClient(load_config(a.config))
    _CLIENTS.append(client)
    token = os.environ["BENCH_TOKEN"]
    data = bytes(range(64))

    def make(i: int) -> Op:
        def op() -> None:
            if len(client.sign(token, a.key_handle, "CKM_SHA256_HMAC", data)) != 32:
                raise RuntimeError("bad MAC length")

        return op

    return make


def pkcs11_ops(a: argparse.Namespace) -> Callable[[int], Op]:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    lib = pkcs11.lib(a.module)
    token = lib.get_token(token_label=a.token)
    pin = os.environ["P11BENCH_PIN"]
    # Login is per application (shared by every session): once, on a session kept open.
    keep = token.open(user_pin=pin, rw=True)
    data = bytes(range(64))
    sessions = [keep]

    def make(i: int) -> Op:
        s = token.open(rw=True)
        if not a.churn:
            sessions.append(s)  # kept open (churn: closed by run_churn through op.close)
        key: Any = s.get_key(object_class=ObjectClass.SECRET_KEY, label="p11bench-hmac")

        def op() -> None:
            if len(key.sign(data, mechanism=Mechanism.SHA256_HMAC)) != 32:
                raise RuntimeError("bad MAC length")

        op.close = s.close  # type: ignore[attr-defined]
        return op

    return make


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("pycurl", "client", "pkcs11"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="wait for a line on stdin at markers")
    ap.add_argument("--url")
    ap.add_argument("--body-file")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--config", help="pkcs11webservices.cfg (client mode)")
    ap.add_argument("--key-handle", help="the HMAC key's service handle (client mode)")
    ap.add_argument("--module", help="PKCS#11 module (pkcs11 mode)")
    ap.add_argument("--token", default="bench", help="token label (pkcs11 mode)")
    ap.add_argument("--churn", type=int, default=0, help="a new thread every N ops (pkcs11)")
    a = ap.parse_args(argv)
    make = {"pycurl": pycurl_ops, "client": client_ops, "pkcs11": pkcs11_ops}[a.mode](a)
    if a.churn:
        result = run_churn(make, a.threads, a.seconds, a.warmup, a.churn)
    else:
        result = run_loop(make, a.threads, a.seconds, a.warmup, a.count, a.sync)
    print(json.dumps({"tool": f"pyhosts-{a.mode}", "op": "sign64", **result}), flush=True)
    sys.stdout.flush()
    # Skip interpreter teardown: a PKCS#11 module's threads and handles may still be live.
    os._exit(1 if result["errors"] and not result["ops"] else 0)


if __name__ == "__main__":
    raise SystemExit(main())
