"""The generated glue (C headers, Cython declarations, stubs, trampolines, the ctypes binding) is
current with pkcs11ws/abi.py and constants.py, and include/pkcs11ws_ck.h lays every structure of
the table out as the ctypes binding does (natural alignment, CK_ULONG = unsigned long), checked by
compiling it."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import tests.support.p11ctypes as P
from pkcs11ws import abi, abi_ctypes
from pkcs11ws import constants as C

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_are_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_native.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_function_table_matches_the_standard_order():
    names = [f.name for f in P.GEN.V240]
    assert len(names) == 68 and names[0] == "C_Initialize" and names[-1] == "C_WaitForSlotEvent"
    assert names.index("C_GetFunctionList") == 3 and names.index("C_Login") == 18
    assert names.index("C_GenerateRandom") == 64
    assert [f.name for f in P.GEN.V30[:4]] == [
        "C_GetInterfaceList",
        "C_GetInterface",
        "C_LoginUser",
        "C_SessionCancel",
    ]
    assert P.GEN.V30[-1].name == "C_MessageVerifyFinal"


def test_struct_table_makes_every_binding():
    """Adding a structure is one row: the header, the .pxd and the ctypes binding all carry it."""
    header = (ROOT / "include" / "pkcs11ws_ck.h").read_text()
    pxd = (ROOT / "pkcs11ws" / "_native" / "ck.pxd").read_text()
    for s in abi.STRUCT_TYPES:
        assert f"typedef struct {s.name} {{" in header, s.name
        assert f"    ctypedef struct {s.name}:" in pxd, s.name
        cls = getattr(abi_ctypes, s.name)
        assert [n for n, *_ in cls._fields_] == [f.name for f in s.fields], s.name
    names = {s.name for s in abi.STRUCT_TYPES}
    assert {"CK_RSA_PKCS_PSS_PARAMS", "CK_RSA_PKCS_OAEP_PARAMS", "CK_GCM_PARAMS"} <= names
    assert {"CK_ECDH1_DERIVE_PARAMS", "CK_INTERFACE", "CK_C_INITIALIZE_ARGS"} <= names


def test_header_layout_and_constants(tmp_path):
    """Every structure of the table, compiled from the C header, has the size and field offsets
    of the ctypes binding."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "pkcs11ws_ck.h"',
        "int main(void) {",
    ]
    for s in abi.STRUCT_TYPES:
        lines.append(f'printf("{s.name} %zu\\n", sizeof({s.name}));')
        for f in s.fields:
            lines.append(f'printf("{s.name}.{f.name} %zu\\n", offsetof({s.name}, {f.name}));')
    lines.append(
        'printf("list %zu %zu\\n", sizeof(CK_FUNCTION_LIST), sizeof(CK_FUNCTION_LIST_3_0));'
    )
    for name in ("CKR_BUFFER_TOO_SMALL", "CKM_SHA512_KEY_GEN", "CK_UNAVAILABLE_INFORMATION"):
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines += ["return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(
        [
            "gcc",
            "-Wall",
            "-Werror",
            "-I",
            str(ROOT / "include"),
            "-o",
            str(exe),
            str(tmp_path / "layout.c"),
        ],
        check=True,
    )
    got = dict(
        line.split(" ", 1)
        for line in subprocess.run(
            [str(exe)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )
    for s in abi.STRUCT_TYPES:
        cls = getattr(abi_ctypes, s.name)
        assert int(got[s.name]) == ctypes.sizeof(cls), s.name
        for f in s.fields:
            assert int(got[f"{s.name}.{f.name}"]) == getattr(cls, f.name).offset, (s.name, f.name)
    assert P.CK_TOKEN_INFO.flags.offset == 96
    assert ctypes.sizeof(abi_ctypes.CK_GCM_PARAMS) == 48
    # CK_VERSION (2 bytes, padded to 8) then one pointer per function.
    assert got["list"].split() == [str(8 + 68 * 8), str(8 + 92 * 8)]
    assert ctypes.sizeof(abi_ctypes.CK_FUNCTION_LIST) == 8 + 68 * 8
    assert ctypes.sizeof(abi_ctypes.CK_FUNCTION_LIST_3_0) == 8 + 92 * 8
    assert int(got["CKR_BUFFER_TOO_SMALL"]) == C.CKR_BUFFER_TOO_SMALL
    assert int(got["CKM_SHA512_KEY_GEN"]) == C.CKM_SHA512_KEY_GEN
    assert int(got["CK_UNAVAILABLE_INFORMATION"]) == C.CK_UNAVAILABLE_INFORMATION


def test_mechanism_kinds_are_generated_enums():
    """The core's PARAM_/RULE_/MULTI_/FAMILY_ numbers are emitted from mechanisms.KINDS (no
    hand-written copy): every kind of the table is in mech_gen.pxd with the number the core's
    loader gives it."""
    from pkcs11ws import mechanisms

    pxd = (ROOT / "pkcs11ws" / "_native" / "mech_gen.pxd").read_text()
    numbers = mechanisms.kind_numbers()
    for prefix, enum in mechanisms.KINDS:
        for kind in enum:
            assert f"    {prefix}_{kind.name} = {numbers[kind]}\n" in pxd, kind
    tables = (ROOT / "pkcs11ws" / "_native" / "tables.pxd").read_text()
    assert "PARAM_NONE =" not in tables and "RULE_NONE =" not in tables
