"""The module's whole per-C_Sign path without the network, warm and cold (issue 15): what
bench/coldpath.py measures for the client's pieces, for C_SignInit + C_Sign through the built
libpkcs11ws.so loaded in this process (ctypes), the core, the provider or the core's fast path,
the group commit, the client and the transport down to pycurl's perform, which is replaced by
a canned answer on the pooled handle (so no request leaves and no wait hides in the figure).

Pieces: the core's fast path (pkcs11ws/_native/fastpath.pxi), the same with no group commit
(BATCHINFLIGHT=0's single request, no lane), the same call with the fast path
kept from being used (the provider's path: Provider.crypto and client.crypto), and `nothing`
(the clock read and the ctypes call of C_GetInfo, which never enters Python). Each piece runs
back to back (warm), after a 300 us sleep each (about the answer's round trip at 1 thread) and
after the sleep plus an 8 MiB memory sweep; CPU per call from the thread's CPU clock, pieces in
a new random order each round (cold: each call), medians over the rounds.

Run: taskset -c 0 python -m bench.coldmodule [--calls 2000] [--rounds 5]
Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lab import Lab
from bench.procs import default_placement
from bench.services import TOKEN_LABEL
from pkcs11ws import constants as C

SLEEP = 0.0003
SWEEP = 8 << 20
ANSWER = b'{"signature":"' + base64.b64encode(bytes(range(32))) + b'"}'


def _can(provider: Any) -> None:
    """Answer on the pooled handle(s) without the network: perform() appends the canned body."""
    for server in provider.client.transport.servers:
        for conn in server.idle:
            chunks = conn.chunks
            conn.perform = lambda chunks=chunks: chunks.append(ANSWER)
            conn.getinfo = lambda opt: 200


def _without_group(entry: tuple[Any, ...]) -> tuple[Any, ...]:
    """A fast-path entry (Provider.fast) whose group commit, and lane, are None."""
    return tuple(None if i == 6 or i > 7 else v for i, v in enumerate(entry))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from pkcs11ws.cli.ckabi import Library, Mechanism

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pkcs11ws-cold-")))
        lab = Lab(work, default_placement(), stack)
        lab.start_service_only(lambda m: print(m, file=sys.stderr))
        os.environ.update(lab.module_env(lab.service.port if lab.service else None))
        lib = Library(lab.module)
        lib.initialize()
        slot = next(s for s in lib.slots(True) if lib.token_info(s).label == TOKEN_LABEL)
        session = lib.open_session(slot, rw=True)
        session.login(lab.passphrase.encode())
        key = session.find([(C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_LABEL, b"p11bench-hmac")])[0]
        mech = Mechanism(C.CKM_SHA256_HMAC)
        data = ctypes.create_string_buffer(bytes(64), 64)
        out = ctypes.create_string_buffer(64)
        n = ctypes.c_ulong()
        fl = lib.fl
        sign_init, sign, get_info = fl.C_SignInit, fl.C_Sign, fl.C_GetInfo
        info = ctypes.create_string_buffer(256)
        h = session.handle
        mref = ctypes.byref(mech.struct)
        nref = ctypes.byref(n)

        def one() -> None:
            sign_init(h, mref, key)
            n.value = 64
            rv = sign(h, data, 64, out, nref)
            if rv != C.CKR_OK:
                raise RuntimeError(f"C_Sign failed: {C.ckr_name(rv)}")

        one()  # a real request: the handle is pooled, the provider's path made the entry
        core = sys.modules["pkcs11ws._native.core"]
        provider = core.current_provider()
        _can(provider)
        kept = provider.fast
        # The same entries with no group commit (what BATCHINFLIGHT=0 gives): the fast path's
        # single request without the lane (issue 15: group commit on vs off at 1 thread).
        ungrouped = {k: _without_group(e) for k, e in kept.items()}
        no_entries: dict[int, Any] = {}
        provider._remember_fast = lambda *a: None  # the provider's path keeps no entry

        def fast() -> None:
            provider.fast = kept
            one()

        def fast_off() -> None:
            provider.fast = ungrouped
            one()

        def provider_path() -> None:
            provider.fast = no_entries
            one()

        pieces: dict[str, Callable[[], object]] = {
            "nothing (ctypes C_GetInfo)": lambda: get_info(info),
            "C_SignInit + C_Sign, core fast path": fast,
            "C_SignInit + C_Sign, core fast path, group commit off": fast_off,
            "C_SignInit + C_Sign, provider path": provider_path,
        }
        clock = time.thread_time
        memory = bytearray(SWEEP)
        ones = b"\1" * (SWEEP // 64)
        results: dict[str, dict[str, list[float]]] = {k: {} for k in pieces}
        names = list(pieces)
        for _ in range(args.rounds):
            random.shuffle(names)
            for name in names:
                fn = pieces[name]
                for _ in range(200):
                    fn()
                t0 = clock()
                for _ in range(args.calls):
                    fn()
                warm = (clock() - t0) / args.calls
                results[name].setdefault("warm", []).append(warm * 1e6)
            # Cold: the pieces take turns call by call (a new order each time), so the VM's
            # drift over seconds falls on all of them alike.
            cold = dict.fromkeys(names, 0.0)
            sweep = dict.fromkeys(names, 0.0)
            for i in range(args.calls // 4):
                random.shuffle(names)
                for name in names:
                    fn = pieces[name]
                    time.sleep(SLEEP)
                    if i % 2:
                        memory[::64] = ones
                        t0 = clock()
                        fn()
                        sweep[name] += clock() - t0
                    else:
                        t0 = clock()
                        fn()
                        cold[name] += clock() - t0
            k = args.calls // 8
            for name in names:
                results[name].setdefault("cold", []).append(cold[name] / k * 1e6)
                results[name].setdefault("sweep", []).append(sweep[name] / k * 1e6)
        provider.fast = kept
        del provider._remember_fast
        session.close()
        lib.finalize()
    print(f"| piece (us of CPU per call, medians of {args.rounds}) | warm | after a 300 us sleep "
          "| after a sleep and an 8 MiB sweep |")  # fmt: skip
    print("|---|---|---|---|")
    for name, ways in results.items():
        row = " | ".join(f"{statistics.median(ways[w]):.2f}" for w in ("warm", "cold", "sweep"))
        print(f"| {name} | {row} |")


if __name__ == "__main__":
    main()
