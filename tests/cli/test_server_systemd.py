"""conf/pkcs11ws-server.service: systemd accepts it, its hardening is there, and the command it
runs is this project's `serve` (systemd-analyze verify and security, offline)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "conf" / "pkcs11ws-server.service"
INSTALLED = "/opt/pkcs11ws-server/venv/bin/pkcs11ws-server"


def _unit_here(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this venv's pkcs11ws-server.
    server = Path(sys.executable).parent / "pkcs11ws-server"
    assert server.is_file()
    text = UNIT.read_text(encoding="utf-8")
    assert INSTALLED in text
    out = tmp_path / UNIT.name
    out.write_text(text.replace(INSTALLED, str(server)), encoding="utf-8")
    return out


def _service_section() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            k, _, v = line.partition("=")
            values.setdefault(k, []).append(v)
    return values


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd, in the Makefile)"
    unit = _unit_here(tmp_path)
    res = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    # verify exits 0 even when it ignores a bad line: any message is a failure.
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stderr
    # Exposure 0-10 (systemd's scale x10 for --threshold): below 2.0 is what the hardening gives.
    res = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr


def test_unit_hardening_and_commands() -> None:
    svc = _service_section()
    one = {k: v[-1] for k, v in svc.items()}
    assert one["User"] not in ("", "root") and one["Group"] not in ("", "root")
    assert one["ProtectSystem"] == "strict"
    assert one["ReadWritePaths"] == "/var/lib/pkcs11ws"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "RestrictSUIDSGID",
        "ProtectKernelTunables",
    ):
        assert one[key] == "yes", key
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["UMask"] == "0077"
    assert one["ExecStart"].split()[1:] == ["serve", "--config", "/var/lib/pkcs11ws/server.yaml"]
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["KillSignal"] == "SIGTERM"
    # Longer than the service's own graceful drain (timeout_graceful_shutdown, 10 s).
    assert int(one["TimeoutStopSec"]) > 10
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert parser["Install"]["WantedBy"] == "multi-user.target"
