"""ckinfo-dynamic, cklist-dynamic and ckmechinfo through the C ABI: against our module (with the
real key service) and against SoftHSM2. (The ctypes binding's layout against the C header:
tests/unit/test_module_generated.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pkcs11ws import abi, abi_ctypes, mechanisms
from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from pkcs11ws.cli import ckabi, ckfmt
from tests.support.tools_util import (
    HSM_LABEL,
    HSM_PIN,
    SOFTHSM,
    Card,
    activated_card,
    clean_env,
    create,
    generate,
    service_env,
    tool,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stocked_card(service) -> Card:
    """A softcard holding an AES key, an HMAC key and a data object."""
    c = activated_card(service)
    generate(
        service,
        c,
        "CKM_AES_KEY_GEN",
        CKA_LABEL=b"aes-one",
        CKA_VALUE_LEN=32,
        CKA_ENCRYPT=True,
        CKA_DECRYPT=True,
    )
    generate(
        service,
        c,
        "CKM_SHA256_KEY_GEN",
        CKA_LABEL=b"hmac-one",
        CKA_VALUE_LEN=32,
        CKA_SIGN=True,
        CKA_VERIFY=True,
    )
    create(
        service,
        c,
        CKA_CLASS=C.CKO_DATA,
        CKA_LABEL=b"data-one",
        CKA_VALUE=b"\x00\x01\xfe",
        CKA_APPLICATION=b"tests",
    )
    return c


def blocks(out: str) -> dict[str, list[str]]:
    """cklist output: object header line -> its attribute lines."""
    res: dict[str, list[str]] = {}
    cur: list[str] = []
    for line in out.splitlines():
        if line.startswith("  Object "):
            cur = res.setdefault(line.split(": ", 1)[1], [])
        elif line.startswith("    "):
            cur.append(" ".join(line.split()))
    return res


# -- the binding ------------------------------------------------------------------------------


def test_function_list_order_comes_from_the_one_table():
    names = [field[0] for field in abi_ctypes.CK_FUNCTION_LIST._fields_]
    assert names == ["version"] + [f.name for f in abi.V240]
    assert len(names) == 69
    # tools/gen_native.py generates the C struct from the very same rows.
    gen = subprocess.run(
        [sys.executable, str(ROOT / "tools/gen_native.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert gen.returncode == 0, gen.stderr
    header = (ROOT / "include/pkcs11ws_funcs.h").read_text()
    body = header.split("struct CK_FUNCTION_LIST {", 1)[1].split("};", 1)[0]
    assert re.findall(r"CK_(C_\w+) C_\w+;", body) == names[1:]


def test_flag_and_value_formatting():
    assert (
        ckfmt.flags(C.CKF_ENCRYPT | C.CKF_DECRYPT, ckfmt.MECHANISM_FLAGS)
        == "CKF_ENCRYPT | CKF_DECRYPT"
    )
    assert ckfmt.flags(0, ckfmt.SLOT_FLAGS) == "none"
    assert ckfmt.flags(C.CKF_RNG | 0x20, ckfmt.TOKEN_FLAGS) == "CKF_RNG | 0x00000020"
    assert ckfmt.mechanism_name(C.CKM_AES_CBC) == "CKM_AES_CBC"
    assert ckfmt.mechanism_name(0x1234) == "CKM_0x00001234"
    ul = ckabi.ulong_bytes
    assert ckfmt.attribute_value(C.CKA_CLASS, ul(C.CKO_SECRET_KEY)) == "CKO_SECRET_KEY"
    assert ckfmt.attribute_value(C.CKA_KEY_TYPE, ul(0x99)) == "0x00000099"
    assert ckfmt.attribute_value(C.CKA_VALUE_LEN, ul(32)) == "32"
    assert ckfmt.attribute_value(C.CKA_TOKEN, b"\x01") == "true"
    assert ckfmt.attribute_value(C.CKA_LABEL, b"a b") == '"a b"'
    assert ckfmt.attribute_value(C.CKA_LABEL, b"\xff\x00") == "ff00"
    assert ckfmt.attribute_value(C.CKA_START_DATE, b"20240131") == "2024-01-31"
    assert ckfmt.attribute_value(C.CKA_VALUE, ckabi.SENSITIVE) == "<sensitive>"
    assert ckfmt.attribute_value(C.CKA_VALUE, bytes(40)).endswith("... (40 bytes)")
    mechs = ul(C.CKM_SHA256_RSA_PKCS) + ul(C.CKM_ECDSA) + ul(0x7777)
    assert ckfmt.attribute_value(C.CKA_ALLOWED_MECHANISMS, mechs) == (
        "CKM_SHA256_RSA_PKCS, CKM_ECDSA, 0x00007777"
    )
    assert ckfmt.attribute_value(C.CKA_CERTIFICATE_TYPE, ul(C.CKC_X_509)) == "CKC_X_509"
    assert ckfmt.attribute_value(C.CKA_KEY_GEN_MECHANISM, ul(C.CKM_EC_KEY_PAIR_GEN)) == (
        "CKM_EC_KEY_PAIR_GEN"
    )


def test_ckfmt_reads_the_attribute_schema():
    """ckfmt keeps no attribute list of its own: what attributes.SHOWN_AS says is what it shows,
    and every attribute so described travels (protocol.ATTRIBUTES) with a kind that fits."""
    from pkcs11ws import attributes, protocol

    src = (Path(ckfmt.__file__)).read_text()
    assert not re.findall(r"[\"']CKA_[A-Z]", src)  # no attribute named in ckfmt
    for name, shown in attributes.SHOWN_AS.items():
        kind = protocol.ATTR_BY_NAME[name].kind
        code = getattr(C, name)
        if shown in ("text", "date"):
            assert kind == protocol.BYTES, name
            assert ckfmt.attribute_value(code, b"20250102").startswith(('"', "2025-01-02"))
        else:
            assert kind in (protocol.ULONG, protocol.ULONGS), name
            first = next(n for n in dir(C) if n.startswith(shown) and n[len(shown) :].isupper())
            assert ckfmt.attribute_value(code, ckabi.ulong_bytes(getattr(C, first))).startswith(
                shown
            ), name


# -- our module -------------------------------------------------------------------------------


def test_ckinfo_our_module(service, stocked_card):
    res = tool("ckinfo", env=service_env(service))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"Library {module_path()}\n")
    assert "  Cryptoki version  2.40\n" in out and "  Manufacturer      pkcs11ws\n" in out
    assert re.search(r"^(\d+) slot\(s\)$", out, re.M)
    labels = re.findall(r"^    Label\s+(\S+)$", out, re.M)
    assert stocked_card.name in labels
    assert "CKF_LOGIN_REQUIRED" in out and "CKF_TOKEN_PRESENT" in out
    # --library with the same module gives the same report.
    again = tool("ckinfo", "--library", module_path(), env=service_env(service))
    assert again.returncode == 0 and again.stdout.splitlines()[:7] == out.splitlines()[:7]


def test_ckmechinfo_our_module_shows_the_mechanism_table(service, stocked_card):
    res = tool("ckmechinfo", env=service_env(service))
    assert res.returncode == 0, res.stderr
    rows = {ln.split()[0]: ln for ln in res.stdout.splitlines()[2:]}
    assert res.stdout.splitlines()[0].endswith(f": {len(mechanisms.MECHANISMS)}")
    assert set(rows) == {m.name for m in mechanisms.MECHANISMS}
    for m in mechanisms.MECHANISMS:
        cols = rows[m.name].split(None, 4)
        assert cols[1:4] == [f"0x{m.code:08X}", str(m.min_key), str(m.max_key)], m.name
        assert cols[4] == ckfmt.flags(m.flags, ckfmt.MECHANISM_FLAGS)


def test_ckmechinfo_bad_slot(service, stocked_card):
    res = tool("ckmechinfo", "--slot", "987654", env=service_env(service))
    assert res.returncode == 1
    assert "CKR_SLOT_ID_INVALID" in res.stderr


def test_cklist_our_module_without_login_sees_no_private_objects(service, stocked_card):
    res = tool("cklist", "--token-label", stocked_card.name, env=service_env(service))
    assert res.returncode == 0, res.stderr
    assert (
        f"token {stocked_card.name!r} (not logged in: public objects only; "
        "private objects need --login)" in res.stdout
    )
    assert res.stdout.rstrip().endswith("0 object(s)")


def test_cklist_our_module_with_login(service, stocked_card):
    res = tool(
        "cklist",
        "--token-label",
        stocked_card.name,
        "--login",
        env=service_env(service),
        stdin=stocked_card.passphrase + "\n",
    )
    assert res.returncode == 0, res.stderr
    assert stocked_card.passphrase not in res.stdout + res.stderr
    assert f"token {stocked_card.name!r} (logged in)" in res.stdout
    assert res.stdout.rstrip().endswith("3 object(s)")
    objs = blocks(res.stdout)
    aes = objs['CKO_SECRET_KEY "aes-one"']
    assert "CKA_KEY_TYPE CKK_AES" in aes and "CKA_VALUE_LEN 32" in aes
    assert "CKA_VALUE <sensitive>" in aes and "CKA_ENCRYPT true" in aes
    assert "CKA_TOKEN true" in aes and "CKA_PRIVATE true" in aes
    hmac = objs['CKO_SECRET_KEY "hmac-one"']
    assert "CKA_KEY_TYPE CKK_SHA256_HMAC" in hmac and "CKA_VALUE <sensitive>" in hmac
    assert "CKA_KEY_GEN_MECHANISM CKM_SHA256_KEY_GEN" in hmac
    data = objs['CKO_DATA "data-one"']
    assert "CKA_VALUE 0001fe" in data and 'CKA_APPLICATION "tests"' in data
    assert not any(a.startswith("CKA_KEY_TYPE") for a in data)  # not an attribute of data


def test_cklist_our_module_by_slot(service, stocked_card):
    info = tool("ckinfo", env=service_env(service)).stdout
    slot = re.search(rf"^Slot (\d+)\n(?:  .*\n)*?    Label\s+{stocked_card.name}$", info, re.M)
    assert slot, info
    res = tool(
        "cklist",
        "--slot",
        slot.group(1),
        "--login",
        env=service_env(service),
        stdin=stocked_card.passphrase + "\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"Slot {slot.group(1)} token {stocked_card.name!r} (logged in)")


def test_cklist_wrong_passphrase(service):
    c = activated_card(service)
    res = tool(
        "cklist",
        "--token-label",
        c.name,
        "--login",
        env=service_env(service),
        stdin="not the passphrase\n",
    )
    assert res.returncode == 1
    assert "C_Login returned CKR_PIN_INCORRECT" in res.stderr


def test_cklist_usage_errors(service, stocked_card):
    env = service_env(service)
    res = tool("cklist", "--token-label", "nosuchtoken", env=env)
    assert res.returncode == 2 and "no token labelled 'nosuchtoken'" in res.stderr
    res = tool("cklist", "--token-label", stocked_card.name, "--login", env=env, stdin="")
    assert res.returncode == 2 and "no passphrase on standard input" in res.stderr
    res = tool("cklist", "--slot", "1", "--token-label", "x", env=env)
    assert res.returncode == 2 and "not allowed with" in res.stderr


def test_load_errors(tmp_path):
    env = clean_env()
    res = tool("ckinfo", "--library", str(tmp_path / "missing.so"), env=env)
    assert res.returncode == 2 and "cannot load" in res.stderr
    notp11 = next((ROOT / "pkcs11ws/_native").glob("core.cpython-*.so"))
    for t in ("ckinfo", "cklist", "ckmechinfo"):
        res = tool(t, "--library", str(notp11), env=env)
        assert res.returncode == 2, t
        assert "does not export C_GetFunctionList: not a PKCS#11 module" in res.stderr


def test_our_module_without_config_reports_the_ckr():
    res = tool("ckinfo", env=clean_env(PKCS11WS_CONFIG="/nonexistent/x.cfg"))
    assert res.returncode == 1
    assert "ckinfo-dynamic: C_Initialize returned CKR_GENERAL_ERROR" in res.stderr


# -- SoftHSM2 ---------------------------------------------------------------------------------


def test_ckinfo_softhsm(hsm):
    res = tool("ckinfo", "--library", SOFTHSM, env=hsm.env())
    assert res.returncode == 0, res.stderr
    assert "  Manufacturer      SoftHSM\n" in res.stdout
    assert re.search(rf"^    Label\s+{HSM_LABEL}$", res.stdout, re.M)
    assert "CKF_USER_PIN_INITIALIZED" in res.stdout


def test_ckmechinfo_softhsm(hsm):
    res = tool("ckmechinfo", "--library", SOFTHSM, env=hsm.env())
    assert res.returncode == 0, res.stderr
    rows = {ln.split()[0]: ln for ln in res.stdout.splitlines()[2:]}
    assert "CKF_GENERATE" in rows["CKM_AES_KEY_GEN"]
    assert rows["CKM_AES_CBC"].split()[2:4] == ["16", "32"]
    assert "CKF_SIGN | CKF_VERIFY" in rows["CKM_SHA256_HMAC"]
    assert len(rows) > 30  # SoftHSM has many, most without a name here (shown in hex)


def test_cklist_softhsm_with_login(hsm):
    res = tool(
        "cklist",
        "--library",
        SOFTHSM,
        "--token-label",
        HSM_LABEL,
        "--login",
        env=hsm.env(),
        stdin=HSM_PIN + "\n",
    )
    assert res.returncode == 0, res.stderr
    objs = blocks(res.stdout)
    aes = objs['CKO_SECRET_KEY "hsm-aes"']
    assert "CKA_VALUE <sensitive>" in aes and "CKA_SENSITIVE true" in aes
    assert "CKA_KEY_TYPE CKK_AES" in aes and "CKA_VALUE_LEN 32" in aes
    assert "CKA_VALUE 010264617461" in objs['CKO_DATA "hsm-data"']
    assert res.stdout.rstrip().endswith("2 object(s)")
    # Without a login the private objects stay hidden.
    res = tool("cklist", "--library", SOFTHSM, "--token-label", HSM_LABEL, env=hsm.env())
    assert res.returncode == 0 and res.stdout.rstrip().endswith("0 object(s)")


def test_cklist_softhsm_wrong_pin(hsm):
    res = tool(
        "cklist",
        "--library",
        SOFTHSM,
        "--token-label",
        HSM_LABEL,
        "--login",
        env=hsm.env(),
        stdin="0000\n",
    )
    assert res.returncode == 1 and "CKR_PIN_INCORRECT" in res.stderr
