"""The python-pkcs11 snippet of README.md, run as written in its own process against the
real key service (the consumer test suites for python-pkcs11 itself live elsewhere: this keeps
the documented example working)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.dropin_util import consumer_env, snippet


def test_python_pkcs11_snippet(service, tmp_path):
    if importlib.util.find_spec("pkcs11") is None:
        pytest.skip("CONSUMER NOT INSTALLED: python-pkcs11 (PyPI; `make setup` installs it)")
    name, pin = client_card(service.client_cfg, "y")
    script = tmp_path / "example.py"
    script.write_text(snippet("python-pkcs11") + "print('snippet ok', len(ct), len(tag))\n")
    env = consumer_env(
        service.client_cfg, PKCS11WS_MODULE=module_path(), PKCS11WS_TOKEN=name, PKCS11WS_PIN=pin
    )
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "snippet ok 16 32" in r.stdout
