"""The cli layer: what an operator runs: the utilities (ck*, softcardtool, install; helpers in
tests/support/tools_util.py), the server's command line and systemd unit, the packaging (sdist,
wheel), `make demo`, the documentation's snippets and references, the bench harness smoke test.

No fixtures of its own yet: a fixture two cli files share goes here, once.
"""
