"""Helpers for the drop-in consumer tests (tests/consumers/test_dropin_*.py): README snippets,
the module's environment for a consumer process, and the one loud way to skip when a consumer
truly cannot be installed on this machine (certificates: tests/support/certs.py)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

PIN_ENV = "PKCS11WS_TEST_PIN"
DOC = Path(__file__).resolve().parents[2] / "README.md"
MODULE_PLACEHOLDER = "/path/to/libpkcs11ws.so"
CONFIG_PLACEHOLDER = "/path/to/pkcs11webservices.cfg"


def snippet(name: str, replace: dict[str, str] | None = None) -> str:
    """The code block after `<!-- snippet: NAME -->` in README.md, each key of
    `replace` (e.g. MODULE_PLACEHOLDER) replaced by its value; the placeholder must be there."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert m is not None, f"README.md has no snippet {name!r}"
    body = m.group(1)
    for old, new in (replace or {}).items():
        assert old in body, f"snippet {name!r} does not mention {old}"
        body = body.replace(old, new)
    return body


def consumer_env(cfg: Path, pin: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a consumer process: our client config, the PIN (never in argv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKCS11WS_")}
    env["PKCS11WS_CONFIG"] = str(cfg)
    env["PKCS11WS_RETRYDELAY"] = "0"
    if pin is not None:
        env[PIN_ENV] = pin
    env.update(extra)
    return env


def require(path: str | None, what: str, package: str) -> str:
    """The tool's path, or a loud skip naming the Debian package (`make setup` installs it)."""
    if path is None or not (os.path.exists(path) or shutil.which(path)):
        pytest.skip(f"CONSUMER NOT INSTALLED: {what} (Debian package {package}; run make setup)")
    assert path is not None
    return path
