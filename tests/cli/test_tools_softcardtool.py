"""softcardtool against the real key service: options and help as the WSOP guide (5.1) shows them,
the generate/list/delete round trip with the passphrase on stdin or a terminal, and its refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pkcs11ws import constants as C
from tests.support.service import Api, free_port
from tests.support.tools_util import (
    PASSPHRASE,
    activated_card,
    card_counts,
    clean_env,
    create,
    delete_object,
    generate,
    service_env,
    tool,
)

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def sct(*args: str, env: dict[str, str], stdin: str | None = None):
    return tool("softcardtool", *args, env=env, stdin=stdin)


def test_help_layout_matches_the_guide():
    res = sct("--help", env=clean_env())
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:7] == [
        "softcardtool, 1.1.0",
        "",
        "Usage:",
        "  softcardtool [options]",
        "",
        "Options:",
        "",
    ]
    assert lines[7] == "Help options:"
    opts = [re.split(r"\s{2,}", ln.strip(), maxsplit=1) for ln in lines[8:17]]
    assert opts == [
        ["-h, --help", "Display help for 'softcardtool'."],
        ["-V, --version", "Display the version number of 'softcardtool'."],
        ["-u, --usage", "Display a brief usage summary for 'softcardtool'."],
        ["-v, --verbose", "verbose output"],
        ["-i, --id=ID", "ID of softcard to delete"],
        ["-n, --name=NAME", "name of softcard to generate"],
        ["-l, --list", "list softcards"],
        ["-d, --delete", "delete softcard by ID"],
        ["-g, --generate", "generate a new softcard"],
    ]
    assert lines[-1] == "Generates softcards and deletes them."
    assert sct("-h", env=clean_env()).stdout == res.stdout


def test_version_and_usage():
    for flag in ("-V", "--version"):
        res = sct(flag, env=clean_env())
        assert res.returncode == 0 and res.stdout.startswith("softcardtool, 1.1.0 (pkcs11ws ")
    for flag in ("-u", "--usage"):
        res = sct(flag, env=clean_env())
        assert res.returncode == 0 and res.stdout.startswith("Usage: softcardtool ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "unknown option -x"),
        (["--passphrase=secret", "-g", "--name=a"], "unknown option --passphrase"),
        (["-g", "-l"], "choose one of -g, -l, -d"),
        ([], "Usage: softcardtool [-hVuvldg]"),
        (["-d"], "--id=ID) is required"),
        (["--list=yes"], "--list takes no value"),
        (["-n"], "-n needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_usage_errors_exit_2(args, message):
    # No configuration exists: none of these may get as far as reading one.
    res = sct(*args, env=clean_env(PKCS11WS_CONFIG="/nonexistent/pkcs11webservices.cfg"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr


@pytest.mark.parametrize("name", ["a b", "caf\u00e9", "x;rm", "a-b", "<b>", "a/b", "n" * 65, ""])
def test_special_character_names_are_refused(name):
    res = sct(
        "-g", f"--name={name}", env=clean_env(PKCS11WS_CONFIG="/nonexistent.cfg"), stdin="pw\n"
    )
    assert res.returncode == 2
    assert "special characters are not supported" in res.stderr
    assert "Softcard generated" not in res.stdout


def test_round_trip_generate_list_delete(service):
    env = service_env(service)
    name = "rt" + os.urandom(6).hex()
    # The console script itself, as installed by pip.
    script = Path(sys.executable).with_name("softcardtool")
    res = subprocess.run(
        [str(script), "-g", f"--name={name}"],
        input=PASSPHRASE + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    m = re.fullmatch(rf"Softcard generated: ID ({UUID}) name {name}\n", res.stdout)
    assert m, res.stdout
    card_id = m.group(1)
    assert PASSPHRASE not in res.stdout + res.stderr

    listed = sct("-l", env=env)
    assert listed.returncode == 0, listed.stderr
    header, *rows, total = listed.stdout.splitlines()
    assert header.split() == ["ID", "Name", "Keys", "Certs", "Data"]
    mine = [r.split() for r in rows if r.startswith(card_id)]
    assert mine == [[card_id, name, "0", "0", "0"]]
    assert total == f"{len(rows)} softcard(s)"

    # The passphrase from stdin is the card's passphrase.
    api = Api(service)
    try:
        api.activate(card_id, PASSPHRASE.encode())
        r = api.post(f"/km/v1/softcards/{card_id}/activate", {"passphrase": "d3Jvbmc="})
        assert r.code == "PASSPHRASE_INCORRECT"
    finally:
        api.close()

    res = sct("-d", f"--id={card_id}", env=env)
    assert (res.returncode, res.stdout) == (0, f"Softcard deleted: ID {card_id}\n"), res.stderr
    assert card_id not in sct("-l", env=env).stdout
    assert card_counts(service, card_id) is None


def test_list_shows_object_counts(service):
    card = activated_card(service)
    generate(service, card, "CKM_AES_KEY_GEN", CKA_LABEL=b"k", CKA_VALUE_LEN=16)
    generate(service, card, "CKM_SHA256_KEY_GEN", CKA_LABEL=b"h", CKA_VALUE_LEN=32)
    create(service, card, CKA_CLASS=C.CKO_DATA, CKA_LABEL=b"d", CKA_VALUE=b"x")
    res = sct("--list", env=service_env(service))
    row = [r.split() for r in res.stdout.splitlines() if r.startswith(card.id)]
    assert row == [[card.id, card.name, "2", "0", "1"]]


def test_delete_refused_while_keys_remain(service):
    env = service_env(service)
    card = activated_card(service)
    key = generate(service, card, "CKM_AES_KEY_GEN", CKA_LABEL=b"keep", CKA_VALUE_LEN=32)
    res = sct("-d", f"--ID={card.id}", env=env)
    assert res.returncode == 1
    assert res.stderr == (
        f"softcardtool: softcard {card.id} still holds keys; remove all keys "
        "associated with the softcard first\n"
    )
    counts = card_counts(service, card.id)
    assert counts is not None and counts["keys"] == 1
    delete_object(service, card, key)
    res = sct("-d", "-i", card.id, env=env)
    assert res.returncode == 0, res.stderr
    assert card_counts(service, card.id) is None


def test_delete_unknown_and_malformed_ids(service):
    env = service_env(service)
    res = sct("-d", "--id=00000000-0000-0000-0000-000000000000", env=env)
    assert res.returncode == 1
    assert "no softcard has the ID 00000000-0000-0000-0000-000000000000" in res.stderr
    res = sct("-d", "--id=../../etc", env=env)
    assert res.returncode == 1 and "invalid card identifier" in res.stderr


def test_duplicate_name_is_refused(service):
    card = activated_card(service)
    res = sct("-g", f"--name={card.name}", env=service_env(service), stdin="another passphrase\n")
    assert res.returncode == 1
    assert "SOFTCARD_EXISTS" in res.stderr and "Softcard generated" not in res.stdout


def test_missing_or_empty_passphrase(service):
    env = service_env(service)
    res = sct("-g", "--name=nopass" + os.urandom(4).hex(), env=env, stdin="")
    assert res.returncode == 2 and "no passphrase on standard input" in res.stderr
    res = sct("-g", "--name=nopass" + os.urandom(4).hex(), env=env, stdin="\n")
    assert res.returncode == 2 and "the passphrase must be 1 to 256 bytes" in res.stderr


def test_short_passphrase_is_refused_with_the_rule(service):
    name = "short" + os.urandom(4).hex()
    res = sct("-g", f"--name={name}", env=service_env(service), stdin="7 bytes\n")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "the passphrase must be at least 8 bytes" in res.stderr
    assert "Softcard generated" not in res.stdout and "7 bytes" not in res.stderr
    assert name not in sct("-l", env=service_env(service)).stdout


def test_verbose_alone_verifies_the_connection(service):
    env = service_env(service)
    expect = (
        f"Connected to key service https://127.0.0.1:{service.port} (pkcs11ws-server "
        f"0.1.0, protocol 1.0) using {service.client_cfg}"
    )
    for args in (["-v"], ["-v1"], ["--verbose"]):
        res = sct(*args, env=env)
        assert (res.returncode, res.stdout) == (0, expect + "\n"), res.stderr
    res = sct("-v", "-l", env=env)
    assert res.returncode == 0 and res.stdout.startswith(expect + "\nID ")


def test_missing_config():
    res = sct("-l", env=clean_env(PKCS11WS_CONFIG="/nonexistent/x.cfg"))
    assert res.returncode == 1
    assert res.stderr.startswith("softcardtool: /nonexistent/x.cfg: configuration file not found")
    assert "PKCS11WS_CONFIG" in res.stderr


def test_server_down(service):
    env = service_env(service, PKCS11WS_PORT=str(free_port()), PKCS11WS_MAXRETRIES="0")
    t0 = time.monotonic()
    res = sct("-v", env=env)
    assert res.returncode == 1
    assert "no answer from the key service" in res.stderr and "connect" in res.stderr.lower()
    assert time.monotonic() - t0 < 20


def test_no_logging_even_at_the_highest_level(service, tmp_path):
    log = tmp_path / "tool.log"
    env = service_env(
        service, PKCS11WS_LOGLEVEL="6", PKCS11WS_LOGSTDOUT="1", PKCS11WS_LOGFILEPATH=str(log)
    )
    name = "nolog" + os.urandom(4).hex()
    res = sct("-v", "-g", f"--name={name}", env=env, stdin="pw no log\n")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2 and res.stderr == ""
    res = sct("-l", env=env)
    assert res.returncode == 0 and "libpkcs11ws" not in res.stdout + res.stderr
    assert not log.exists()


def _pty_run(args: list[str], env: dict[str, str], answers: list[str]) -> tuple[int, str]:
    """Run a tool on a new pseudo-terminal, answer its prompts; (exit status, transcript)."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the tool, with the terminal as its controlling tty
        os.execve(sys.executable, [sys.executable, "-m", *args], env)
    out = b""
    deadline = time.monotonic() + 20
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
                # A prompt is the last thing written (getpass prints a newline after reading).
                if pending and out.endswith(b": "):
                    os.write(fd, pending.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_terminal_prompts_twice_without_echo(service):
    env = service_env(service)
    name = "tty" + os.urandom(4).hex()
    rc, text = _pty_run(
        ["pkcs11ws.cli.softcardtool", "-g", f"--name={name}"],
        env,
        ["tty secret 1", "tty secret 1"],
    )
    assert rc == 0, text
    assert "Enter new passphrase:" in text and "Confirm passphrase:" in text
    assert "tty secret" not in text  # no echo
    card_id = re.search(rf"Softcard generated: ID ({UUID})", text)
    assert card_id, text
    api = Api(service)
    try:
        api.activate(card_id.group(1), b"tty secret 1")
    finally:
        api.close()
    rc, text = _pty_run(["pkcs11ws.cli.softcardtool", "-g", f"--name={name}x"], env, ["one", "two"])
    assert rc == 2 and "the passphrases do not match" in text
