"""pkcs11ws.config: the WSOP pkcs11webservices.cfg format, defaults, validation, env overrides."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from pkcs11ws import config as cfgmod
from pkcs11ws.config import DEFAULT_LOGFILEPATH, DEFAULT_PATH, load_config
from pkcs11ws.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def pki_files(tmp_path: Path) -> Path:
    for name in ("client.crt", "client.key", "ca.crt"):
        (tmp_path / name).write_text(f"-- {name} --\n")
    return tmp_path


def write(d: Path, text: str, name: str = "pkcs11webservices.cfg") -> str:
    p = d / name
    p.write_text(text)
    return str(p)


MINIMAL = "HOST ws.example\nCERT client.crt\nKEY client.key\nAUTH ca.crt\n"


def test_minimal_file_gets_every_default(pki_files: Path) -> None:
    path = write(pki_files, MINIMAL)
    c = load_config(path, environ={})
    assert c.host == "ws.example"
    assert c.port == 18001
    assert c.cert == str(pki_files / "client.crt")
    assert c.key == str(pki_files / "client.key")
    assert c.auth == str(pki_files / "ca.crt")
    assert (c.loglevel, c.logstdout, c.logsys) == (4, False, False)
    assert c.logfilepath == DEFAULT_LOGFILEPATH
    assert (c.maxretries, c.retrydelay) == (5, 10)
    assert (c.connecttimeout, c.timeout) == (10, 30)  # TIMEOUT: the per-call deadline (issue 10)
    assert c.path == path
    assert c.overrides == () and c.warnings == ()


def test_every_key_parsed_with_comments_blanks_and_spacing(pki_files: Path) -> None:
    text = (
        "# a comment\n\n"
        "   # indented comment\n"
        "HOST\t10.1.2.3\n"
        "PORT    443\n"
        f"CERT {pki_files / 'client.crt'}\n"
        "KEY  client.key   \n"
        "auth ca.crt\n"  # keys are case-insensitive
        "LOGLEVEL 6\n"
        "LOGSTDOUT 1\n"
        "LOGSYS 1\n"
        "LOGFILEPATH logs/my file#1.log\n"  # value is the rest of the line, '#' included
        "MAXRETRIES 256\n"
        "RETRYDELAY 0\n"
        "CONNECTTIMEOUT 3\n"
        "TIMEOUT 7\r\n"
    )
    c = load_config(write(pki_files, text), environ={})
    assert c.host == "10.1.2.3" and c.port == 443
    assert c.key == str(pki_files / "client.key")
    assert c.auth == str(pki_files / "ca.crt")
    assert (c.loglevel, c.logstdout, c.logsys) == (6, True, True)
    assert c.logfilepath == str(pki_files / "logs" / "my file#1.log")
    assert (c.maxretries, c.retrydelay, c.connecttimeout, c.timeout) == (256, 0, 3, 7)
    assert c.warnings == ()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("PORT abc", "'abc' is not an integer"),
        ("PORT 0", "out of range"),
        ("PORT 65536", "out of range"),
        ("PORT -1", "not an integer"),
        ("LOGLEVEL 9", "out of range (0..6)"),
        ("LOGLEVEL 4.0", "not an integer"),
        ("LOGSTDOUT 2", "not 0 or 1"),
        ("LOGSYS yes", "not 0 or 1"),
        ("MAXRETRIES 300", "out of range (0..256)"),
        ("RETRYDELAY 1.5", "'1.5' is not an integer"),
        ("RETRYDELAY -2", "not an integer"),
        ("CONNECTTIMEOUT 0", "out of range"),
        ("TIMEOUT x", "not an integer"),
        ("CERT missing.crt", "does not exist"),
        ("KEY missing.key", "does not exist"),
        ("AUTH .", "is not a regular file"),
        ("HOST https://ws.example/", "not a host name"),
        ("HOST bad_host!", "not a valid host name"),
        ("PORT", "PORT has no value"),
    ],
)
def test_invalid_values_name_file_line_and_reason(pki_files: Path, line: str, reason: str) -> None:
    path = write(pki_files, "# header\n" + MINIMAL + line + "\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path, environ={})
    msg = ei.value.message
    assert msg.startswith(f"{path}:6: "), msg
    assert reason in msg
    assert line.split()[0] in msg


def test_unreadable_file_value_is_refused(pki_files: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read any file")
    (pki_files / "client.key").chmod(0)
    with pytest.raises(ConfigError, match=r":3: KEY: file .* is not readable"):
        load_config(write(pki_files, MINIMAL), environ={})


@pytest.mark.parametrize("missing", ["HOST", "CERT", "KEY", "AUTH"])
def test_required_keys(pki_files: Path, missing: str) -> None:
    text = "".join(line + "\n" for line in MINIMAL.splitlines() if not line.startswith(missing))
    path = write(pki_files, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, environ={})
    assert ei.value.message == (
        f"{path}: {missing} is required (no {missing} line and no $PKCS11WS_{missing})"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.cfg")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: configuration file not found")):
        load_config(path, environ={})


def test_not_utf8(pki_files: Path) -> None:
    p = pki_files / "bad.cfg"
    p.write_bytes(b"HOST \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(p), environ={})


def test_byte_order_mark_is_skipped(pki_files: Path) -> None:
    # A file saved by a Windows editor: the BOM is no part of the first key (the byte offset of
    # an error counts from after it, as the utf-8-sig codec counted).
    plain = load_config(write(pki_files, MINIMAL), environ={})
    p = pki_files / "bom.cfg"
    p.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    got = load_config(str(p), environ={})
    assert (got.host, got.cert, got.key, got.auth, got.warnings) == (
        plain.host, plain.cert, plain.key, plain.auth, plain.warnings)  # fmt: skip
    p.write_bytes(b"\xef\xbb\xbfHO\xffST x\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 2\)"):
        load_config(str(p), environ={})


def test_windows_unknown_and_duplicate_keys_warn(pki_files: Path) -> None:
    text = (
        MINIMAL
        + "CERTNAME client\nCERTSTORE My\nSTORETYPE CurrentUser\nEVENTLOG 1\n"
        + "FROBNICATE 3\n"
        + "PORT 1000\nPORT 2000\n"
    )
    path = write(pki_files, text)
    c = load_config(path, environ={})
    assert c.port == 2000  # last one wins
    w = c.warnings
    assert len(w) == 6, w
    for i, key in enumerate(("CERTNAME", "CERTSTORE", "STORETYPE", "EVENTLOG")):
        assert w[i] == f"{path}:{5 + i}: {key} is a Windows-only setting; ignored on this platform"
    assert w[4] == f"{path}:9: unknown key 'FROBNICATE' ignored"
    assert w[5] == f"{path}:11: duplicate key PORT (first at line 10); the last one wins"


def test_env_overrides_win_and_are_reported(pki_files: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("other")
    shutil.copy(pki_files / "ca.crt", other / "ca2.crt")
    path = write(pki_files, MINIMAL + "PORT 1000\nLOGLEVEL 2\n")
    env = {
        "PKCS11WS_PORT": "2000",
        "PKCS11WS_LOGLEVEL": " 6 ",
        "PKCS11WS_HOST": "other.example",
        "PKCS11WS_AUTH": str(other / "ca2.crt"),
        "PKCS11WS_MAXRETRIES": "0",
        "PKCS11WS_TIMEOUT": "5",
        "PKCS11WS_UNRELATED": "x",
    }
    c = load_config(path, environ=env)
    assert (c.port, c.loglevel, c.host, c.maxretries, c.timeout) == (2000, 6, "other.example", 0, 5)
    assert c.auth == str(other / "ca2.crt")
    assert set(c.overrides) == {
        "PKCS11WS_PORT",
        "PKCS11WS_LOGLEVEL",
        "PKCS11WS_HOST",
        "PKCS11WS_AUTH",
        "PKCS11WS_MAXRETRIES",
        "PKCS11WS_TIMEOUT",
    }


def test_env_can_supply_a_required_key(pki_files: Path) -> None:
    path = write(pki_files, "CERT client.crt\nKEY client.key\nAUTH ca.crt\n")
    c = load_config(path, environ={"PKCS11WS_HOST": "h1"})
    assert c.host == "h1" and c.overrides == ("PKCS11WS_HOST",)


@pytest.mark.parametrize(
    ("var", "value", "reason"),
    [
        ("PKCS11WS_PORT", "abc", "PORT: 'abc' is not an integer"),
        ("PKCS11WS_LOGLEVEL", "9", "LOGLEVEL: 9 is out of range"),
        ("PKCS11WS_RETRYDELAY", "1.5", "RETRYDELAY: '1.5' is not an integer"),
        ("PKCS11WS_CERT", "/nonexistent/x.crt", "CERT: file /nonexistent/x.crt does not exist"),
        ("PKCS11WS_MAXRETRIES", "", "empty value"),
    ],
)
def test_invalid_env_override_names_the_variable(
    pki_files: Path, var: str, value: str, reason: str
) -> None:
    path = write(pki_files, MINIMAL)
    with pytest.raises(ConfigError) as ei:
        load_config(path, environ={var: value})
    assert ei.value.message.startswith(f"environment variable {var}: ")
    assert reason in ei.value.message


def test_env_relative_paths_are_relative_to_cwd(pki_files: Path, monkeypatch) -> None:
    path = write(pki_files, MINIMAL)
    monkeypatch.chdir(pki_files)
    c = load_config(path, environ={"PKCS11WS_KEY": "client.key"})
    assert c.key == str(pki_files / "client.key")


def test_default_path_logic(pki_files: Path, monkeypatch) -> None:
    assert cfgmod.config_path({}) == DEFAULT_PATH
    assert DEFAULT_PATH == "/opt/nfast/webservices/pkcs11/conf/pkcs11webservices.cfg"
    assert cfgmod.config_path({"PKCS11WS_CONFIG": "/x/y.cfg"}) == "/x/y.cfg"
    assert cfgmod.config_path({"PKCS11WS_CONFIG": ""}) == DEFAULT_PATH
    monkeypatch.setenv("PKCS11WS_CONFIG", "/from/os/environ.cfg")
    assert cfgmod.config_path() == "/from/os/environ.cfg"

    path = write(pki_files, MINIMAL, "via_env.cfg")
    assert load_config(environ={"PKCS11WS_CONFIG": path}).path == path
    # An explicit path beats the environment.
    explicit = write(pki_files, MINIMAL.replace("ws.example", "explicit.example"), "explicit.cfg")
    c = load_config(explicit, environ={"PKCS11WS_CONFIG": path})
    assert (c.path, c.host) == (explicit, "explicit.example")
    # No explicit path, no variable: the WSOP default location.
    if not os.path.exists(DEFAULT_PATH):
        with pytest.raises(ConfigError, match=re.escape(DEFAULT_PATH)):
            load_config(environ={})


def test_example_config_is_valid_except_paths(pki_files: Path) -> None:
    text = (ROOT / "conf" / "example_pkcs11webservices.cfg").read_text()
    keys = {
        line.split()[0]
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert keys == set(cfgmod.KEYS), "the example documents every key"
    env = {
        "PKCS11WS_CERT": str(pki_files / "client.crt"),
        "PKCS11WS_KEY": str(pki_files / "client.key"),
        "PKCS11WS_AUTH": str(pki_files / "ca.crt"),
    }
    c = load_config(write(pki_files, text, "example.cfg"), environ=env)
    assert c.warnings == ()
    assert (c.host, c.port, c.loglevel, c.maxretries, c.retrydelay) == (
        "localhost",
        18001,
        4,
        5,
        10,
    )
