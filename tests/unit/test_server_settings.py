"""server.yaml: the KEYS table drives loading, and docs/server-yaml.md is generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pkcs11ws.server import settings
from tests.support.service import init_dir

ROOT = Path(__file__).resolve().parents[2]
TLS = "tls: {cert: s.pem, key: s.key, ca: ca.pem}\n"


def test_docs_server_yaml_md_is_generated_from_keys() -> None:
    committed = (ROOT / "docs" / "server-yaml.md").read_text(encoding="utf-8")
    assert committed == settings.markdown(), (
        "run: python -m pkcs11ws.server.settings > docs/server-yaml.md"
    )


def test_defaults_come_from_the_table(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text(TLS)
    s = settings.load(tmp_path / "server.yaml")
    by_name = {k.name: k.default for k in settings.KEYS}
    assert s.port == by_name["port"]
    assert s.admin_port is None
    assert s.lockout_threshold == by_name["lockout.threshold"]
    assert s.scrypt.n == by_name["scrypt.n"]
    assert s.access_log is by_name["log.access"]
    assert s.database_synchronous == by_name["database.synchronous"]


def test_init_writes_every_key_of_the_table(tmp_path: Path) -> None:
    # init's server.yaml is the commented example of the table: it names every key.
    assert init_dir(tmp_path / "kit", 18130).returncode == 0
    raw = yaml.safe_load((tmp_path / "kit" / "server.yaml").read_text())
    written = {f"{k}.{leaf}" for k, v in raw.items() if isinstance(v, dict) for leaf in v}
    written |= {k for k, v in raw.items() if not isinstance(v, dict)}
    assert written == {k.name for k in settings.KEYS}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lockout: {treshold: 3}\n", "lockout.treshold"),
        ("surprise: 1\n", "surprise"),
        ("lockout: 3\n", "lockout: expected a mapping"),
        ("admin_port: 70000\n", "admin_port"),
        ("log: {access: 'yes'}\n", "log.access"),
    ],
)
def test_misspelt_or_mistyped_keys_are_errors(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "server.yaml").write_text(TLS + text)
    with pytest.raises(settings.SettingsError, match=match):
        settings.load(tmp_path / "server.yaml")
