"""The WSOP guide's rules (sections 5 and 6) and the conformance points of issue 10, one test each,
through the built module (ctypes, in this process) or the tools (own processes), against the
real key service over mutual TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from ctypes import byref
from pathlib import Path

import pytest

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.fault_util import setup_card, write_cfg
from tests.support.p11ctypes import CK_MECHANISM, CK_ULONG, Module, Template
from tests.support.tools_util import service_env, tool

BASE = [(C.CKA_TOKEN, True), (C.CKA_PRIVATE, True)]
AES_GEN = CK_MECHANISM(C.CKM_AES_KEY_GEN, None, 0)


@pytest.fixture
def logged(bare_mod, service, tmp_path):
    """(session, log path): a logged-in session on a new card, the log at DEBUG1."""
    log = tmp_path / "module.log"
    cfg = write_cfg(service, tmp_path / "p11.cfg", loglevel="4", logfilepath=str(log))
    h, _ = setup_card(service, bare_mod, cfg)
    return h, log


def rv_generate(bare_mod: Module, h: int, items: Sequence[tuple[int, object]]) -> int:
    t = Template(items)
    out = CK_ULONG()
    return bare_mod.call("C_GenerateKey", h, byref(AES_GEN), t.array, t.count, byref(out))


def rv_create(bare_mod: Module, h: int, items: list[tuple[int, object]]) -> int:
    t = Template(items)
    out = CK_ULONG()
    return bare_mod.call("C_CreateObject", h, t.array, t.count, byref(out))


def test_key_template_requires_class_and_value_len(bare_mod, logged):
    h, _ = logged
    full = [
        *BASE,
        (C.CKA_CLASS, C.CKO_SECRET_KEY),
        (C.CKA_KEY_TYPE, C.CKK_AES),
        (C.CKA_VALUE_LEN, 16),
        (C.CKA_LABEL, b"seed"),
    ]
    assert rv_generate(bare_mod, h, full) == C.CKR_OK
    for missing in (C.CKA_CLASS, C.CKA_VALUE_LEN):
        t = [a for a in full if a[0] != missing]
        assert rv_generate(bare_mod, h, t) == C.CKR_TEMPLATE_INCOMPLETE, hex(missing)
    # The documented exception: Java SunPKCS11's KeyGenerator sends CKA_CLASS and CKA_VALUE_LEN
    # only (the mechanism implies the key type), pkcs11-tool --keygen no label without --label.
    java = [*BASE, (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_VALUE_LEN, 16)]
    assert rv_generate(bare_mod, h, java) == C.CKR_OK


def test_imported_secret_key_is_not_local_nor_always_sensitive(bare_mod, logged):
    h, _ = logged
    imported = bare_mod.create(
        h,
        [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_VALUE, os.urandom(16)),
            (C.CKA_ENCRYPT, True),
        ],
    )
    for attr in (C.CKA_LOCAL, C.CKA_ALWAYS_SENSITIVE, C.CKA_NEVER_EXTRACTABLE):
        assert bare_mod.attr(h, imported, attr) == b"\x00", hex(attr)
    assert bare_mod.attr(h, imported, C.CKA_SENSITIVE) == b"\x01"
    # Claiming otherwise on import is inconsistent; false may be given.
    for attr in (C.CKA_LOCAL, C.CKA_ALWAYS_SENSITIVE, C.CKA_NEVER_EXTRACTABLE):
        t = [
            *BASE,
            (C.CKA_CLASS, C.CKO_SECRET_KEY),
            (C.CKA_KEY_TYPE, C.CKK_AES),
            (C.CKA_VALUE, os.urandom(16)),
        ]
        assert rv_create(bare_mod, h, [*t, (attr, True)]) == C.CKR_TEMPLATE_INCONSISTENT
        assert rv_create(bare_mod, h, [*t, (attr, False)]) == C.CKR_OK
    generated = bare_mod.generate(
        h, C.CKM_AES_KEY_GEN, [*BASE, (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_VALUE_LEN, 16)]
    )
    for attr in (C.CKA_LOCAL, C.CKA_ALWAYS_SENSITIVE, C.CKA_NEVER_EXTRACTABLE):
        assert bare_mod.attr(h, generated, attr) == b"\x01", hex(attr)


def _copy(bare_mod: Module, h: int, obj: int, label: bytes) -> int:
    t = Template([(C.CKA_LABEL, label)])
    out = CK_ULONG()
    return bare_mod.call("C_CopyObject", h, obj, t.array, t.count, byref(out))


def _rename(bare_mod: Module, h: int, obj: int, label: bytes) -> int:
    t = Template([(C.CKA_LABEL, label)])
    return bare_mod.call("C_SetAttributeValue", h, obj, t.array, t.count)


def test_copyable_and_modifiable_read_back_is_enforced(bare_mod, logged):
    h, _ = logged
    data = [*BASE, (C.CKA_CLASS, C.CKO_DATA), (C.CKA_VALUE, b"v")]
    for given in (None, True, False):
        extra = [] if given is None else [(C.CKA_COPYABLE, given), (C.CKA_MODIFIABLE, given)]
        obj = bare_mod.create(h, [*data, *extra])
        want = given is not False
        assert bare_mod.attr(h, obj, C.CKA_COPYABLE) == (b"\x01" if want else b"\x00")
        assert bare_mod.attr(h, obj, C.CKA_MODIFIABLE) == (b"\x01" if want else b"\x00")
        ok = C.CKR_OK if want else C.CKR_ACTION_PROHIBITED
        assert _copy(bare_mod, h, obj, b"copy") == ok, given
        assert _rename(bare_mod, h, obj, b"renamed") == ok, given


def test_create_object_invalid_template_before_login(bare_mod, service, tmp_path):
    """pkcs11test ReadWriteSessionTest.CreateObjectInvalid: a template naming no class is a
    template error, also when nobody is logged in."""
    cfg = write_cfg(service, tmp_path / "p11.cfg")
    name = "r" + uuid.uuid4().hex[:12]
    # The card's slot by its label: the shared service holds other tests' cards, in any order.
    logged, _ = setup_card(service, bare_mod, cfg, name=name)  # logs in on one card ...
    bare_mod.ok("C_Logout", logged)  # ... and out again
    h = bare_mod.open(bare_mod.slot_by_label(name))
    assert rv_create(bare_mod, h, [(C.CKA_LABEL, b"no class")]) == C.CKR_TEMPLATE_INCOMPLETE
    assert rv_create(bare_mod, h, [*BASE, (C.CKA_LABEL, b"no class")]) == C.CKR_TEMPLATE_INCOMPLETE
    # A complete template still needs the login.
    assert rv_create(bare_mod, h, [*BASE, (C.CKA_CLASS, C.CKO_DATA)]) == C.CKR_USER_NOT_LOGGED_IN


def test_refused_template_logged_at_debug1_without_value(bare_mod, logged):
    h, log = logged
    secret = os.urandom(16)
    t = [
        *BASE,
        (C.CKA_CLASS, C.CKO_SECRET_KEY),
        (C.CKA_KEY_TYPE, C.CKK_AES),
        (C.CKA_VALUE, secret),
        (C.CKA_DERIVE, True),
    ]
    assert rv_create(bare_mod, h, t) == C.CKR_TEMPLATE_INCONSISTENT
    lines = [ln for ln in log.read_text().splitlines() if "template refused" in ln]
    assert len(lines) == 1 and " DEBUG1 " in lines[0] and "CKA_DERIVE" in lines[0], lines
    text = log.read_bytes()
    assert secret not in text and secret.hex().encode() not in text


def test_wrong_passphrase_logged_at_warning(bare_mod, service, tmp_path):
    log = tmp_path / "module.log"
    cfg = write_cfg(service, tmp_path / "p11.cfg", loglevel="3", logfilepath=str(log))
    name = "w" + uuid.uuid4().hex[:12]
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    client.create_softcard(name, b"the right passphrase")
    client.close()
    assert bare_mod.initialize(str(cfg)) == C.CKR_OK
    h = bare_mod.open(bare_mod.slot_by_label(name))
    wrong = b"a wrong passphrase"
    assert bare_mod.login(h, wrong) == C.CKR_PIN_INCORRECT
    lines = [ln for ln in log.read_text().splitlines() if "C_Login" in ln]
    assert len(lines) == 1 and " WARNING " in lines[0] and name in lines[0], lines
    assert wrong not in log.read_bytes()


def test_log_names_the_loaded_file_and_fatal_is_not_silent(tmp_path):
    """Loaded as libpkcs11webservices.so (a symlink, as `install` makes it), the log says so;
    a configuration the module cannot work with is logged at FATAL, so LOGLEVEL 1 shows it."""
    link = tmp_path / "libpkcs11webservices.so"
    link.symlink_to(module_path())
    log = tmp_path / "module.log"
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"LOGLEVEL 1\nLOGFILEPATH {log}\nPORT not-a-port\n")
    code = (
        "import ctypes, sys; from tests.support.p11ctypes import Module; "
        f"m = Module({str(link)!r}); sys.exit(0 if m.initialize({str(cfg)!r}) == 5 else 1)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKCS11WS_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and " FATAL 0 libpkcs11webservices: C_Initialize:" in lines[0], lines


def test_ckmechinfo_lists_mechanisms_without_softcards(fresh_service):
    svc = fresh_service()
    r = tool("ckmechinfo", env=service_env(svc))
    assert r.returncode == 0, r.stderr
    assert "no softcard" in r.stdout
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if ln.startswith("CKM_")}
    assert rows["CKM_AES_CBC_PAD"][2:4] == ["16", "32"]
    assert rows["CKM_SHA256_HMAC"][2:4] == ["1", "1024"] or "CKM_SHA256_HMAC" in rows
    assert "CKM_SHA512_KEY_GEN" in rows


def test_utilities_quiet_when_piped_into_head(fresh_service):
    svc = fresh_service()
    env = service_env(svc)
    for reader in ("head -n 1", "true"):  # `true` has gone before the tool writes a byte
        cmd = f"{sys.executable} -m pkcs11ws.cli.ckmechinfo | {reader}"
        r = subprocess.run(
            ["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        if reader != "true":
            assert r.stdout.startswith("Mechanisms of"), r.stdout
        assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr


def test_token_labels_unique_when_names_share_32_characters(bare_mod, service, tmp_path):
    from pkcs11ws.provider import token_label
    from tests.support.p11ctypes import CK_SLOT_INFO, text

    stem = "L" + uuid.uuid4().hex  # 33 characters: both names share more than 32
    names = [stem + "a" * 31, stem + "b" * 31]  # 64 characters, the longest allowed
    short = "s" + uuid.uuid4().hex[:12]
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    for name in (*names, short):
        client.create_softcard(name, b"a passphrase")
    client.close()
    assert bare_mod.initialize(str(write_cfg(service, tmp_path / "p11.cfg"))) == C.CKR_OK
    by_label = {text(bare_mod.token_info(s).label): s for s in bare_mod.slots()}
    labels = [token_label(n).decode() for n in names]
    assert labels[0] != labels[1] and all(len(lb) == 32 for lb in labels)
    assert labels[0].startswith(stem[:23] + "~")
    for name, label in zip(names, labels, strict=True):
        info = CK_SLOT_INFO()
        bare_mod.ok("C_GetSlotInfo", by_label[label], byref(info))
        assert text(info.slotDescription) == name  # the whole name
    assert short in by_label  # names that fit are the label as they are


def test_cklist_says_private_objects_need_login(fresh_service):
    from tests.support.tools_util import PASSPHRASE, activated_card, generate

    svc = fresh_service()
    card = activated_card(svc)
    generate(svc, card, "CKM_AES_KEY_GEN", CKA_VALUE_LEN=16, CKA_LABEL=b"hidden")
    env = service_env(svc)
    r = tool("cklist", "--library", module_path(), "--token-label", card.name, env=env)
    assert r.returncode == 0, r.stderr
    assert "0 object(s)" in r.stdout and "--login" in r.stdout and "hidden" not in r.stdout
    r = tool(
        "cklist",
        "--library",
        module_path(),
        "--token-label",
        card.name,
        "--login",
        env=env,
        stdin=PASSPHRASE + "\n",
    )
    assert r.returncode == 0, r.stderr
    assert "1 object(s)" in r.stdout and "hidden" in r.stdout
