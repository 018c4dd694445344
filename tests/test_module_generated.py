"""The generated glue is current, and include/pkcs11ws_ck.h lays structures out as the standard's
Unix convention does (natural alignment, CK_ULONG = unsigned long), checked by compiling it."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import p11ctypes as P

from pkcs11ws import constants as C

ROOT = Path(__file__).resolve().parent.parent


def test_generated_files_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_native.py"), "--check"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_function_table_matches_the_standard_order():
    names = [f.name for f in P.GEN.V240]
    assert len(names) == 68 and names[0] == "C_Initialize" and names[-1] == "C_WaitForSlotEvent"
    assert names.index("C_GetFunctionList") == 3 and names.index("C_Login") == 18
    assert names.index("C_GenerateRandom") == 64
    assert [f.name for f in P.GEN.V30[:4]] == ["C_GetInterfaceList", "C_GetInterface",
                                               "C_LoginUser", "C_SessionCancel"]  # fmt: skip
    assert P.GEN.V30[-1].name == "C_MessageVerifyFinal"


STRUCTS = ("CK_VERSION", "CK_INFO", "CK_SLOT_INFO", "CK_TOKEN_INFO", "CK_SESSION_INFO",
           "CK_ATTRIBUTE", "CK_MECHANISM", "CK_MECHANISM_INFO", "CK_C_INITIALIZE_ARGS",
           "CK_INTERFACE")  # fmt: skip


def test_header_layout_and_constants(tmp_path):
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "pkcs11ws_ck.h"',
             "int main(void) {"]  # fmt: skip
    for s in STRUCTS:
        lines.append(f'printf("{s} %zu\\n", sizeof({s}));')
    lines.append('printf("CK_TOKEN_INFO.flags %zu\\n", offsetof(CK_TOKEN_INFO, flags));')
    lines.append('printf("CK_TOKEN_INFO.utcTime %zu\\n", offsetof(CK_TOKEN_INFO, utcTime));')
    lines.append('printf("CK_INFO.libraryVersion %zu\\n", offsetof(CK_INFO, libraryVersion));')
    lines.append(
        'printf("list %zu %zu\\n", sizeof(CK_FUNCTION_LIST), sizeof(CK_FUNCTION_LIST_3_0));'
    )
    for name in ("CKR_BUFFER_TOO_SMALL", "CKM_SHA512_KEY_GEN", "CK_UNAVAILABLE_INFORMATION"):
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines += ["return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(ROOT / "include"), "-o", str(exe),
                    str(tmp_path / "layout.c")], check=True)  # fmt: skip
    got = dict(
        line.split(" ", 1)
        for line in subprocess.run(
            [str(exe)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )
    for s in STRUCTS:
        assert int(got[s]) == ctypes.sizeof(getattr(P, s)), s
    assert int(got["CK_TOKEN_INFO.flags"]) == P.CK_TOKEN_INFO.flags.offset == 96
    assert int(got["CK_TOKEN_INFO.utcTime"]) == P.CK_TOKEN_INFO.utcTime.offset
    assert int(got["CK_INFO.libraryVersion"]) == P.CK_INFO.libraryVersion.offset
    # CK_VERSION (2 bytes, padded to 8) then one pointer per function.
    assert got["list"].split() == [str(8 + 68 * 8), str(8 + 92 * 8)]
    assert int(got["CKR_BUFFER_TOO_SMALL"]) == C.CKR_BUFFER_TOO_SMALL
    assert int(got["CKM_SHA512_KEY_GEN"]) == C.CKM_SHA512_KEY_GEN
    assert int(got["CK_UNAVAILABLE_INFORMATION"]) == C.CK_UNAVAILABLE_INFORMATION
