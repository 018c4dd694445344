"""Benchmarks of pkcs11ws against its transport floor and peers: `python -m bench` (`make bench`).

Modules: build (compiles the C hosts p11bench.c and curlbench.c), procs (processes, CPU
accounting, TCP connection counting), services (the key service, the ASGI floor, SoftHSM2 and
p11-kit's server), floor_app (the minimal ASGI HMAC handler), pyhosts (Python-side load
generators), lab (servers, tokens, keys and the variants over them), runner (one measured
point), plan (what runs, in which order), extras (start-up and request counting), report
(latest.md and latest.png), profile (py-spy and perf, by hand). See bench/README_SECTION.md.
"""
