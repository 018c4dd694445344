"""The configuration and the log, through the module (libpkcs11ws.so via ctypes, in this process).

tests/unit/test_config.py and tests/unit/test_log.py cover the parser and the writer; here the
same rules are checked where an application meets them: C_Initialize.

- An invalid configuration makes C_Initialize return CKR_GENERAL_ERROR, and the reason, naming
  the file, the line and what is wrong, goes to stderr and to the log the file names.
- PKCS11WS_<KEY> environment variables override the file; pReserved "config=PATH" picks the file.
- The WSOP log format: `[yyyy-mm-dd hh:mm:ss] pid LEVEL session libpkcs11ws: ...`, the thread ID
  after the PID at DEBUG9, the session handle of the call (0 outside a session), and LOGLEVEL
  selecting exactly the levels at or below it.
- A full session at LOGLEVEL 6 leaves no passphrase, key, plaintext or data value in the log,
  raw, hex or base64.
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import os
import re
import threading
import uuid
from ctypes import byref
from pathlib import Path

import pytest

from pkcs11ws import constants as C
from tests.support.cards import client_card
from tests.support.p11ctypes import CK_INFO, CK_ULONG, mechanism
from tests.support.queued import hmac_key
from tests.support.service import free_port

LEVELS = ("NONE", "FATAL", "ERROR", "WARNING", "DEBUG1", "DEBUG3", "DEBUG9")
STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]"
LINE_RE = re.compile(STAMP + r" (\d+) (FATAL|ERROR|WARNING|DEBUG1|DEBUG3) (\d+) libpkcs11ws: (.+)$")
LINE9_RE = re.compile(STAMP + r" (\d+) (\d+) (DEBUG9) (\d+) libpkcs11ws: (.+)$")
KEY_BASE = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]


class Line:
    def __init__(self, text: str) -> None:
        m = LINE9_RE.match(text)
        if m is not None:
            stamp, pid, tid, level, session, msg = m.groups()
            self.tid: int | None = int(tid)
        else:
            m = LINE_RE.match(text)
            assert m is not None, f"not a WSOP log line: {text!r}"
            stamp, pid, level, session, msg = m.groups()
            self.tid = None
        self.when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        self.pid, self.level, self.session, self.msg = int(pid), level, int(session), msg


def read_log(path: Path) -> list[Line]:
    if not path.exists():
        return []
    return [Line(t) for t in path.read_text().splitlines()]


def write_cfg(directory: Path, service, name: str = "p11.cfg", **settings: str) -> Path:
    """The service's client configuration with some keys replaced (appended in order given)."""
    keep = [
        line
        for line in service.client_cfg.read_text().splitlines()
        if not line.strip() or line.split()[0].upper() not in {k.upper() for k in settings}
    ]
    path = directory / name
    path.write_text("\n".join(keep + [f"{k.upper()} {v}" for k, v in settings.items()]) + "\n")
    return path


def initialized(bare_mod) -> bool:
    return bare_mod.call("C_GetInfo", byref(CK_INFO())) == C.CKR_OK


# ---- invalid configurations ------------------------------------------------------------------

INVALID = [
    ("PORT", "abc", "'abc' is not an integer"),
    ("PORT", "70000", "70000 is out of range (1..65535)"),
    ("LOGLEVEL", "9", "9 is out of range (0..6)"),
    ("MAXRETRIES", "300", "300 is out of range (0..256)"),
    ("RETRYDELAY", "-1", "'-1' is not an integer"),
    ("LOGSTDOUT", "yes", "'yes' is not 0 or 1"),
    ("HOST", "https://example.org", "is not a host name"),
    ("CERT", "missing-client.pem", "missing-client.pem does not exist"),
    ("KEY", "/nonexistent/client.key", "file /nonexistent/client.key does not exist"),
    ("AUTH", ".", "is not a regular file"),
]


@pytest.mark.parametrize(("key", "value", "reason"), INVALID)
def test_invalid_value_is_general_error_on_stderr_and_in_the_log(
    bare_mod, service, tmp_path, capfd, key, value, reason
):
    log = tmp_path / "module.log"
    settings = {"LOGFILEPATH": str(log)}
    if key != "LOGLEVEL":
        # (An invalid LOGLEVEL reads as the default, 4, for reporting: errors still go out.)
        settings["LOGLEVEL"] = "2"
    settings[key] = value
    cfg = write_cfg(tmp_path, service, **settings)
    lineno = len(cfg.read_text().splitlines())  # the invalid line is the last one
    capfd.readouterr()
    assert bare_mod.initialize(str(cfg)) == C.CKR_GENERAL_ERROR
    assert not initialized(bare_mod)
    err = capfd.readouterr().err
    want = f"C_Initialize: {cfg}:{lineno}: {key}: "
    assert f"libpkcs11ws: {want}" in err and reason in err, err
    lines = read_log(log)
    assert [(ln.level, ln.pid) for ln in lines] == [("FATAL", os.getpid())], lines
    assert lines[0].msg.startswith(want) and reason in lines[0].msg
    # A valid configuration works right after.
    assert bare_mod.initialize(str(service.client_cfg)) == C.CKR_OK


def test_missing_required_key_and_missing_file(bare_mod, service, tmp_path, capfd):
    cfg = tmp_path / "nohost.cfg"
    log = tmp_path / "nohost.log"
    text = [ln for ln in service.client_cfg.read_text().splitlines() if not ln.startswith("HOST")]
    cfg.write_text("\n".join([*text, f"LOGFILEPATH {log}"]) + "\n")
    capfd.readouterr()
    assert bare_mod.initialize(str(cfg)) == C.CKR_GENERAL_ERROR
    err = capfd.readouterr().err
    assert f"{cfg}: HOST is required" in err, err
    assert "HOST is required" in read_log(log)[0].msg
    missing = tmp_path / "absent.cfg"
    assert bare_mod.initialize(str(missing)) == C.CKR_GENERAL_ERROR
    assert f"{missing}: configuration file not found" in capfd.readouterr().err
    assert not initialized(bare_mod)


def test_log_level_zero_keeps_the_error_off_the_log(bare_mod, service, tmp_path, capfd):
    log = tmp_path / "quiet.log"
    cfg = write_cfg(tmp_path, service, logfilepath=str(log), loglevel="0", port="abc")
    assert bare_mod.initialize(str(cfg)) == C.CKR_GENERAL_ERROR
    assert "'abc' is not an integer" in capfd.readouterr().err
    assert read_log(log) == []


# ---- environment overrides and pReserved -----------------------------------------------------


def test_environment_overrides_through_the_module(bare_mod, service, tmp_path, monkeypatch, capfd):
    name, text = client_card(service.client_cfg, "cl")
    pin = text.encode()
    log = tmp_path / "env.log"
    # The file points nowhere useful; the environment repairs it.
    cfg = write_cfg(
        tmp_path,
        service,
        host="unused.invalid",
        port="1",
        loglevel="0",
        logfilepath=str(tmp_path / "file.log"),
    )
    monkeypatch.setenv("PKCS11WS_CONFIG", str(cfg))
    monkeypatch.setenv("PKCS11WS_HOST", "127.0.0.1")
    monkeypatch.setenv("PKCS11WS_PORT", str(service.port))
    monkeypatch.setenv("PKCS11WS_LOGLEVEL", "5")
    monkeypatch.setenv("PKCS11WS_LOGFILEPATH", str(log))
    monkeypatch.setenv("PKCS11WS_LOGSTDOUT", "1")
    capfd.readouterr()
    bare_mod.ok("C_Initialize", None)  # NULL: the file comes from $PKCS11WS_CONFIG
    slot = bare_mod.slot_by_label(name)
    h = bare_mod.open(slot)
    assert bare_mod.login(h, pin) == C.CKR_OK
    bare_mod.ok("C_Finalize", None)
    lines = read_log(log)
    assert any("C_Login" in ln.msg for ln in lines)
    assert {ln.level for ln in lines} == {"DEBUG1", "DEBUG3"}
    assert not (tmp_path / "file.log").exists()
    out = capfd.readouterr().out  # LOGSTDOUT 1: the same lines on stdout
    assert [Line(t).msg for t in out.splitlines()] == [ln.msg for ln in lines]

    # An invalid value in the environment is refused and named.
    monkeypatch.setenv("PKCS11WS_PORT", "abc")
    assert bare_mod.initialize() == C.CKR_GENERAL_ERROR
    err = capfd.readouterr().err
    assert "C_Initialize: environment variable PKCS11WS_PORT: PORT: 'abc' is not an integer" in err
    monkeypatch.setenv("PKCS11WS_PORT", str(service.port))
    monkeypatch.setenv("PKCS11WS_CERT", str(tmp_path / "nothing.pem"))
    assert bare_mod.initialize() == C.CKR_GENERAL_ERROR
    assert f"PKCS11WS_CERT: CERT: file {tmp_path / 'nothing.pem'} does not exist" in (
        capfd.readouterr().err
    )


def test_maxretries_and_retrydelay_overrides(bare_mod, service, tmp_path, monkeypatch):
    log = tmp_path / "retries.log"
    cfg = write_cfg(
        tmp_path,
        service,
        port=str(free_port()),
        maxretries="9",
        retrydelay="30",
        loglevel="3",
        logfilepath=str(log),
    )
    monkeypatch.setenv("PKCS11WS_MAXRETRIES", "2")
    monkeypatch.setenv("PKCS11WS_RETRYDELAY", "0")
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    n = CK_ULONG()
    # Nothing listens on that port: 1 attempt + 2 retries without delay, then DEVICE_ERROR.
    assert bare_mod.call("C_GetSlotList", 0, None, byref(n)) == C.CKR_DEVICE_ERROR
    lines = read_log(log)
    assert [ln.level for ln in lines] == ["WARNING", "WARNING", "ERROR"], [ln.msg for ln in lines]
    assert "retry 1/2 in 0s" in lines[0].msg and "retry 2/2 in 0s" in lines[1].msg
    assert "failed after 3 attempt(s)" in lines[2].msg
    assert "Couldn't connect to server" in lines[2].msg


def test_preserved_config_beats_the_environment(bare_mod, service, tmp_path, monkeypatch, capfd):
    broken = tmp_path / "broken.cfg"
    broken.write_text("HOST 127.0.0.1\nPORT abc\n")
    monkeypatch.setenv("PKCS11WS_CONFIG", str(broken))
    assert bare_mod.initialize() == C.CKR_GENERAL_ERROR
    assert f"{broken}:2: PORT" in capfd.readouterr().err
    assert bare_mod.initialize(str(service.client_cfg)) == C.CKR_OK  # pReserved "config=PATH"
    assert len(bare_mod.slots()) >= 0
    bare_mod.ok("C_Finalize", None)
    # pReserved without the "config=" prefix is someone else's text (OpenSSL's
    # pkcs11-provider passes its own): ignored, so $PKCS11WS_CONFIG (broken) applies.
    buf = ctypes.create_string_buffer(f"{service.client_cfg}".encode())
    from tests.support.p11ctypes import CK_C_INITIALIZE_ARGS

    args = CK_C_INITIALIZE_ARGS(None, None, None, None, C.CKF_OS_LOCKING_OK, ctypes.addressof(buf))
    assert (
        bare_mod.call("C_Initialize", byref(args)) == C.CKR_GENERAL_ERROR
    )  # $PKCS11WS_CONFIG used


# ---- the log format and levels ---------------------------------------------------------------


def session_work(bare_mod, service, name: str, pin: bytes) -> dict[str, int]:
    """Slot list, login, an imported key, a sign from this thread and one from another."""
    slot = bare_mod.slot_by_label(name)
    h = bare_mod.open(slot)
    assert bare_mod.login(h, pin) == C.CKR_OK
    key = hmac_key(bare_mod, h, os.urandom(32))
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    bare_mod.ok("C_SignInit", h, byref(m), key)
    bare_mod.single("C_Sign", h, b"message")
    other: dict[str, int] = {}

    def in_thread() -> None:
        s = bare_mod.open(slot)
        bare_mod.ok("C_SignInit", s, byref(m), key)
        bare_mod.single("C_Sign", s, b"other")
        other["session"] = s
        other["tid"] = threading.get_native_id()

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    return {"session": h, "other": other["session"], "tid": other["tid"]}


def failing_work(bare_mod, service, tmp_path, level: int, log: Path) -> None:
    """A configuration whose service is down: WARNING (retry) and ERROR (gave up) lines."""
    cfg = write_cfg(
        tmp_path,
        service,
        "down.cfg",
        port=str(free_port()),
        maxretries="1",
        retrydelay="0",
        loglevel=str(level),
        logfilepath=str(log),
    )
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    n = CK_ULONG()
    assert bare_mod.call("C_GetSlotList", 0, None, byref(n)) == C.CKR_DEVICE_ERROR
    bare_mod.ok("C_Finalize", None)


@pytest.mark.parametrize("level", range(7))
def test_log_levels_and_format(bare_mod, service, tmp_path, level):
    name, text = client_card(service.client_cfg, "cl")
    pin = text.encode()
    log = tmp_path / "levels.log"
    cfg = write_cfg(tmp_path, service, loglevel=str(level), logfilepath=str(log))
    before = datetime.datetime.now().replace(microsecond=0)
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    ids = session_work(bare_mod, service, name, pin)
    bare_mod.ok("C_Finalize", None)
    failing_work(bare_mod, service, tmp_path, level, log)
    after = datetime.datetime.now()
    lines = read_log(log)
    produced = {ln.level for ln in lines}
    # Every level at or below LOGLEVEL that this work produces, and nothing above it.
    # (Nothing in this work is FATAL.)
    assert produced == {"ERROR", "WARNING", "DEBUG1", "DEBUG3", "DEBUG9"} & set(
        LEVELS[1 : level + 1]
    )
    for ln in lines:
        assert ln.pid == os.getpid()
        # One second of slack: this VM's clock has been seen stepping back by a second.
        assert before - datetime.timedelta(seconds=1) <= ln.when <= after
        assert (ln.tid is not None) == (ln.level == "DEBUG9")
    if level >= 5:
        signs = [ln for ln in lines if ln.msg.startswith("sign POST /crypto/v1/sign")]
        # The session handle of the call that caused the line; 0 outside any session.
        assert {ln.session for ln in signs} == {ids["session"], ids["other"]}
        assert all(ln.session == 0 for ln in lines if "list_softcards" in ln.msg)
    if level == 6:
        nine = [ln for ln in lines if ln.level == "DEBUG9" and ln.msg.startswith("sign ")]
        assert {ln.tid for ln in nine if ln.session == ids["other"]} == {ids["tid"]}
        assert {ln.tid for ln in nine if ln.session == ids["session"]} == {
            threading.get_native_id()
        }
    if level == 0:
        assert not log.exists() or log.read_text() == ""


def test_one_thread_switching_sessions_logs_each_calls_session(bare_mod, service, tmp_path):
    # The core gives the log's thread-local session only when it changes (a C copy per
    # thread): one thread going back and forth between two sessions, and to calls outside any
    # session, must still name the session of each call.
    name, text = client_card(service.client_cfg, "sw")
    log = tmp_path / "switch.log"
    cfg = write_cfg(tmp_path, service, loglevel="5", logfilepath=str(log))
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    slot = bare_mod.slot_by_label(name)
    a, b = bare_mod.open(slot), bare_mod.open(slot)
    assert bare_mod.login(a, text.encode()) == C.CKR_OK
    key = hmac_key(bare_mod, a, os.urandom(32))
    m, _ = mechanism(C.CKM_SHA256_HMAC)
    order = [a, b, b, a, 0, a, b, 0, b]
    n = CK_ULONG()
    for h in order:
        if h:
            bare_mod.ok("C_SignInit", h, byref(m), key)
            bare_mod.single("C_Sign", h, b"switch")
        else:
            bare_mod.ok("C_GetSlotList", 0, None, byref(n))  # no session: a listing request
    bare_mod.ok("C_Finalize", None)
    lines = read_log(log)
    signs = [ln.session for ln in lines if ln.msg.startswith("sign POST /crypto/v1/sign")]
    assert signs == [h for h in order if h]
    listings = [ln.session for ln in lines if "list_softcards" in ln.msg]
    assert listings and set(listings) == {0}


# ---- no secret in the log --------------------------------------------------------------------


def encodings(secret: bytes) -> list[bytes]:
    """secret as it could appear in a text log: raw, hex, and base64 at any alignment."""
    found = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for offset in range(3):
        chunk = secret[offset:]
        chunk = chunk[: len(chunk) - len(chunk) % 3]
        found += [base64.b64encode(chunk), base64.urlsafe_b64encode(chunk)]
    return found


def test_full_session_at_debug9_logs_no_secret(bare_mod, service, tmp_path):
    name, text = client_card(service.client_cfg, "cl")
    pin = text.encode()
    log = tmp_path / "secrets.log"
    cfg = write_cfg(tmp_path, service, loglevel="6", logfilepath=str(log))
    aes_value, mac_value = os.urandom(32), os.urandom(48)
    plaintext, data_value = os.urandom(40), os.urandom(24)
    wrong_pin = uuid.uuid4().hex.encode()
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    slot = bare_mod.slot_by_label(name)
    h = bare_mod.open(slot)
    assert bare_mod.login(h, wrong_pin) == C.CKR_PIN_INCORRECT
    assert bare_mod.login(h, pin) == C.CKR_OK
    gen = bare_mod.generate(
        h,
        C.CKM_AES_KEY_GEN,
        [
            *KEY_BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_VALUE_LEN, 32),
            (C.CKA_ENCRYPT, True),
            (C.CKA_DECRYPT, True),
        ],
    )
    aes = bare_mod.create(
        h,
        [
            *KEY_BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_ENCRYPT, True),
            (C.CKA_DECRYPT, True),
            (C.CKA_VALUE, aes_value),
        ],
    )
    mac = bare_mod.create(
        h,
        [
            *KEY_BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_SHA384_HMAC),
            (C.CKA_SIGN, True),
            (C.CKA_VERIFY, True),
            (C.CKA_VALUE, mac_value),
        ],
    )
    data = bare_mod.create(
        h, [*KEY_BASE, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_LABEL, b"d"), (C.CKA_VALUE, data_value)]
    )
    iv = os.urandom(16)
    for key in (gen, aes):
        cm, _b = mechanism(C.CKM_AES_CBC_PAD, iv)
        bare_mod.ok("C_EncryptInit", h, byref(cm), key)
        ct = bare_mod.single("C_Encrypt", h, plaintext)
        bare_mod.ok("C_DecryptInit", h, byref(cm), key)
        assert bare_mod.single("C_Decrypt", h, ct) == plaintext
        bare_mod.ok("C_EncryptInit", h, byref(cm), key)  # multi-part too
        out = ctypes.create_string_buffer(64)
        n = CK_ULONG(64)
        bare_mod.ok("C_EncryptUpdate", h, plaintext, len(plaintext), out, byref(n))
        n.value = 64
        bare_mod.ok("C_EncryptFinal", h, out, byref(n))
    hm, _ = mechanism(C.CKM_SHA384_HMAC)
    bare_mod.ok("C_SignInit", h, byref(hm), mac)
    sig = bare_mod.single("C_Sign", h, plaintext)
    bare_mod.ok("C_VerifyInit", h, byref(hm), mac)
    bare_mod.ok("C_Verify", h, plaintext, len(plaintext), sig, len(sig))
    assert data in bare_mod.find(h, [(C.CKA_CLASS, C.CKO_DATA)])
    assert bare_mod.attr(h, data, C.CKA_VALUE) == data_value
    bare_mod.ok("C_DestroyObject", h, data)
    bare_mod.ok("C_Logout", h)
    bare_mod.ok("C_Finalize", None)

    raw = log.read_bytes()
    text = raw.decode()
    # The log did record this session (so the search below looks at something).
    for what in (
        "C_Login",
        "C_CreateObject",
        "C_GenerateKey",
        "encrypt POST",
        "decrypt POST",
        "sign POST",
        "verify POST",
        "C_DestroyObject",
        "C_Logout",
        "DEBUG9",
    ):
        assert what in text, what
    for label, secret in (
        ("passphrase", pin),
        ("wrong passphrase", wrong_pin),
        ("AES key", aes_value),
        ("HMAC key", mac_value),
        ("plaintext", plaintext),
        ("data value", data_value),
        ("signature", sig),
    ):
        for needle in encodings(secret):
            assert needle not in raw, f"the {label} is in the log as {needle!r}"
