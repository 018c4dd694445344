"""The client's per-call Python, warm and cold (issue 15): why module-c spends far more user CPU
per C_Sign than its instruction count says.

The module's thread sleeps in poll() for the answer (hundreds of microseconds) between sending a
request and decoding its answer; whatever runs meanwhile on that CPU (or the hypervisor, on a
VM) evicts the caches and TLB entries that the interpreter's code and objects use. A piece of
Python that takes a few microseconds in a tight loop then takes several times that. This runs
pieces of KeyServiceClient.crypto() (its transport replaced by a canned answer, so no network)
in three ways: back to back (warm), each after a 300 us sleep, and each after the sleep plus a
sweep over 8 MiB of memory (worst case: every cache cold), timing each with the thread's CPU
clock (which itself costs about `nothing`'s figure).

Run: python -m bench.coldpath [--calls 3000]   (pin it: taskset -c 0 python -m bench.coldpath)
Prints us of CPU per piece and way. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import base64
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.services import KeyServiceDir
from pkcs11ws.client import api, wire
from pkcs11ws.config import load_config

SLEEP = 0.0003  # about the answer's round trip at 1 thread
SWEEP = 8 << 20


class _Canned:
    """A transport that answers every request with a sign's answer at once."""

    answer = b'{"signature":"' + base64.b64encode(bytes(32)) + b'"}'

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Sequence[str],
        deadline: float = 0.0,
    ) -> tuple[int, bytes]:
        return 200, self.answer


def pieces(client: api.KeyServiceClient) -> dict[str, Callable[[], object]]:
    token, key, mech, data = "t" * 200, "k" * 36, "CKM_SHA256_HMAC", bytes(range(64))
    answer = _Canned.answer
    lock = threading.Lock()
    group = client.group

    def crypto() -> object:
        return client.crypto("sign", token, key, mech, data)

    def crypto_no_group() -> object:
        client.group = None
        try:
            return client.crypto("sign", token, key, mech, data)
        finally:
            client.group = group

    def locks() -> None:
        lock.acquire()
        lock.release()
        lock.acquire()
        lock.release()

    class NoOp:
        def _single(self, op: str, token: str | None, data: bytes) -> tuple[int, object]:
            return 200, None

        _send_batch = client._send_batch

    one = NoOp()

    def group_run() -> object:
        assert group is not None
        return group.run("sign", token, data, one)

    return {
        "nothing": lambda: None,
        "crypto (group commit on)": crypto,
        "crypto (group commit off)": crypto_no_group,
        "group.run around a no-op": group_run,
        "_single": lambda: client._single("sign", token, b'{"a":1}'),
        "answer: loads + canonical_b64": lambda: api._canonical_b64(
            wire.loads(answer)["signature"]
        ),
        "body: _b64 + join": lambda: b"".join([b"x", api._b64(data, newline=False), b'"}']),
        "request id in body": lambda: b'%s%d",%s'
        % (api._REQUEST_IDS.field, next(api._REQUEST_IDS.count), b'{"a":1}'[1:]),
        "lock acquire/release x2": locks,
        "time.monotonic": api._monotonic,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ksd = KeyServiceDir.init(Path(work) / "service")
        client = api.KeyServiceClient(load_config(str(ksd.client_cfg)))
    client.transport = _Canned()  # type: ignore[assignment]
    todo = pieces(client)
    clock = time.thread_time
    memory = bytearray(SWEEP)
    ones = b"\1" * (SWEEP // 64)
    warm = {}
    for name, fn in todo.items():
        for _ in range(1000):
            fn()
        t0 = clock()
        for _ in range(args.calls * 10):
            fn()
        warm[name] = (clock() - t0) / (args.calls * 10)
    ways = {"sleep": False, "sleep+sweep": True}
    cold = {way: dict.fromkeys(todo, 0.0) for way in ways}
    order = list(todo.items())
    for _ in range(args.calls):
        for way, sweep in ways.items():
            # A new order each round: a piece run right after one that shares its code would
            # find that code warm.
            random.shuffle(order)
            for name, fn in order:
                time.sleep(SLEEP)
                if sweep:
                    memory[::64] = ones
                t0 = clock()
                fn()
                cold[way][name] += clock() - t0
    print(
        f"us of CPU per piece, {args.calls} calls (cold: each after a {SLEEP * 1e6:.0f} us sleep)"
    )
    print("| piece | warm (back to back) | after a sleep | after a sleep and a memory sweep |")
    print("|---|---|---|---|")
    for name in todo:
        print(
            f"| {name} | {warm[name] * 1e6:.2f} | {cold['sleep'][name] * 1e6 / args.calls:.2f}"
            f" | {cold['sleep+sweep'][name] * 1e6 / args.calls:.2f} |"
        )


if __name__ == "__main__":
    main()
