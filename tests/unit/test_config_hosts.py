"""HOST with several key services (issue 12 item 4): `HOST a.example:18001, b.example` -- each
entry a name, IPv4 or [IPv6] literal with an optional :PORT (a bare entry takes PORT)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkcs11ws.config import load_config, parse_servers
from pkcs11ws.errors import ConfigError


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("client.crt", "client.key", "ca.crt"):
        (tmp_path / name).write_text("x\n")
    return tmp_path


def cfg_with(d: Path, host: str, port: str | None = None) -> Path:
    p = d / "p11.cfg"
    extra = f"PORT {port}\n" if port else ""
    p.write_text(f"HOST {host}\n{extra}CERT client.crt\nKEY client.key\nAUTH ca.crt\n")
    return p


@pytest.mark.parametrize(
    ("host", "servers"),
    [
        ("ws.example", [("ws.example", 18001)]),
        ("a.example:18001,b.example:18002", [("a.example", 18001), ("b.example", 18002)]),
        (
            "a.example , b.example:443,10.0.0.7",
            [("a.example", 18001), ("b.example", 443), ("10.0.0.7", 18001)],
        ),
        ("10.0.0.1:1,10.0.0.1:2", [("10.0.0.1", 1), ("10.0.0.1", 2)]),
        ("[2001:db8::1]:9000, [::1]", [("2001:db8::1", 9000), ("::1", 18001)]),
        ("::1", [("::1", 18001)]),  # a bare IPv6 literal (no port: use brackets for one)
    ],
)
def test_server_lists(files: Path, host: str, servers: list[tuple[str, int]]) -> None:
    c = load_config(str(cfg_with(files, host)), environ={})
    assert list(c.servers) == servers
    assert list(parse_servers(host, 18001)) == servers


def test_bare_names_take_port_and_where_names_them_all(files: Path) -> None:
    c = load_config(str(cfg_with(files, "a.example, [::1]:5, b.example", "7000")), environ={})
    assert c.servers == (("a.example", 7000), ("::1", 5), ("b.example", 7000))
    assert c.where() == "a.example:7000, [::1]:5, b.example:7000"


def test_environment_override_lists_servers(files: Path) -> None:
    env = {"PKCS11WS_HOST": "x.example:1, y.example:2"}
    c = load_config(str(cfg_with(files, "ws.example")), environ=env)
    assert c.servers == (("x.example", 1), ("y.example", 2))


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("a.example,,b.example", "empty entry"),
        ("a.example,", "empty entry"),
        ("a.example b.example", "contains a blank"),
        ("a.example:0", "port must be 1..65535"),
        ("a.example:65536", "port must be 1..65535"),
        ("a.example:http", "port must be 1..65535"),
        ("a.example:", "port must be 1..65535"),
        ("https://a.example:18001", "no scheme or path"),
        ("a.example:18001/km", "no scheme or path"),
        ("bad_host!", "not a valid host name"),
        ("[2001:db8::1", "not a valid [IPv6] address"),
        ("[a.example]:1", "not a valid [IPv6] address"),
        ("[::1]18001", "expected :PORT"),
        ("a.example:1,a.example:1", "listed twice"),
        ("A.example:18001, a.example", "listed twice"),  # the bare one takes PORT 18001
        (",".join(f"h{i}.example" for i in range(17)), "at most 16"),
    ],
)
def test_junk_is_refused_with_the_line(files: Path, host: str, reason: str) -> None:
    path = cfg_with(files, host)
    with pytest.raises(ConfigError) as ei:
        load_config(str(path), environ={})
    assert reason in ei.value.message
    assert str(path) in ei.value.message
