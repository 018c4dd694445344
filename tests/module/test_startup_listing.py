"""What `pkcs11-tool -L` makes the module do (C_Initialize, C_GetSlotList, C_Finalize) imports
nothing it does not need, against the real key service (start-up time and RSS, issue 15: each
needless import costs milliseconds and memory of every process that loads the module).
tests/unit/test_startup_imports.py checks the import path itself. A C host then checks the
interpreter the loader really boots: no site, exactly the package's parent and the runtime's
site-packages on sys.path, the start-up objects frozen out of the collector, which runs again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from pkcs11ws.__main__ import module_path
from tests.support.service import Service

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("dataclasses", "inspect", "ast", "dis", "typing", "contextlib", "pycurl.async_multi")

# Not needed to list slots: the public-key code (cryptography), the group commit's batch path
# (only its queue is made), ctypes (the log finds its library name through the core), socket
# (C_Finalize with no call in progress shuts down no socket), the uuid module, datetime.py and
# importlib (pycurl loads without them: pkcs11ws/client/_curl_boot.py), syslog (without LOGSYS)
# and struct (mechanism parameters only): extension modules cost ~0.3 ms each to load. (hashlib
# may come: a softcard of the shared service with a name over 32 characters needs it for its
# label.) Nor re, enum and json (the client's JSON is json's own C codec, client/wire.py), math,
# weakref (only its WeakSet is used, _weakrefset's), object templates and mechanism parameters,
# threading and functools (locks from _thread, _lite's cached_property and Flag), _weakrefset
# and the types module it imports (_lite's WeakSet), collections and its imports (pycurl's
# namedtuple types are made on first use), os and what it imports (os.path, _collections_abc:
# pkcs11ws/_os.py), itertools (the request ids count with a range iterator).
LIST_SLOTS_NEVER = ("cryptography", "pkcs11ws.pubkey", "ctypes", "socket", "selectors", "uuid",
                    "urllib", "traceback", "datetime", "importlib", "warnings", "syslog",
                    "struct", "_struct", "encodings.utf_8_sig", "re", "enum", "json", "math",
                    "weakref", "pkcs11ws.templates", "pkcs11ws.attributes", "pkcs11ws.params",
                    "threading", "functools", "_weakrefset", "types", "collections", "keyword",
                    "operator", "reprlib", "os", "posixpath", "genericpath", "stat",
                    "_collections_abc", "itertools", *HEAVY)  # fmt: skip


def test_listing_slots_imports_only_what_it_needs(service: Service) -> None:
    # What pkcs11-tool -L makes the module do, with the log on (DEBUG1 names its library), in a
    # fresh interpreter booted as the loader boots it (no site: only what the module imports).
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "from pkcs11ws._native import core\n"
        "from pkcs11ws.provider import Provider\n"
        f"p = Provider({str(service.client_cfg)!r}, core)\n"
        "p.refresh_slots()\n"
        "p.finalize()\n"
        "mods = sorted(sys.modules)\n"
        "import json\n"
        "print(json.dumps(mods))\n"
    )
    env = {**os.environ, "PKCS11WS_LOGLEVEL": "4"}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout  # fmt: skip
    mods = json.loads(out)
    assert "pycurl._pycurl" in mods and "pkcs11ws.client.group" in mods
    leaked = [m for m in mods if m.split(".")[0] in LIST_SLOTS_NEVER or m in LIST_SLOTS_NEVER]
    assert leaked == []


# A C program like pkcs11-tool -L (dlopen RTLD_LOCAL, C_Initialize, C_GetSlotList, C_Finalize),
# which then asks the interpreter the module booted (libpython is in the process's global scope)
# what it holds: the Python code comes in argv[2].
HOST_C = r"""
#include <dlfcn.h>
#include <stdio.h>
#include "pkcs11ws_ck.h"

int main(int argc, char **argv) {
    void *lib = argc == 3 ? dlopen(argv[1], RTLD_NOW | RTLD_LOCAL) : NULL;
    if (lib == NULL) { printf("FAIL dlopen\\n"); return 1; }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    CK_FUNCTION_LIST *f;
    CK_ULONG n = 0;
    if (gfl == NULL || gfl(&f) != CKR_OK || f->C_Initialize(NULL) != CKR_OK
        || f->C_GetSlotList(CK_FALSE, NULL, &n) != CKR_OK || f->C_Finalize(NULL) != CKR_OK) {
        printf("FAIL listing\\n");
        return 1;
    }
    int (*ensure)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    void (*release)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "PyGILState_Release");
    int (*run)(const char *) = (int (*)(const char *))dlsym(RTLD_DEFAULT, "PyRun_SimpleString");
    if (ensure == NULL || release == NULL || run == NULL) {
        printf("FAIL no libpython\\n");
        return 1;
    }
    int g = ensure();
    int rc = run(argv[2]);
    release(g);
    fflush(stdout);
    return rc == 0 ? 0 : 1;
}
"""

REPORT = (
    "import sys\n"
    "mods = sorted(sys.modules)\n"
    "import gc, json\n"
    "consts = vars(sys.modules['pkcs11ws.constants'])\n"
    "proto = vars(sys.modules['pkcs11ws.protocol'])\n"
    "print(json.dumps({'modules': mods, 'path': sys.path, 'gc': gc.isenabled(),\n"
    "                  'frozen': gc.get_freeze_count(),\n"
    "                  'tables': [n for n in consts['_NAME_TABLES'] if n in consts],\n"
    "                  'protocol': [n for n in proto['_TABLES'] if n in proto]}))\n"
    "sys.stdout.flush()\n"  # the interpreter is never finalised: nothing else flushes it
)


def test_the_booted_interpreter_lists_slots_without_site(service: Service, tmp_path: Path) -> None:
    (tmp_path / "host.c").write_text(HOST_C)
    exe = tmp_path / "host"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-I", str(REPO / "include"), "-o", str(exe),
                    str(tmp_path / "host.c"), "-ldl"], check=True, timeout=120)  # fmt: skip
    env = {**os.environ, "PKCS11WS_CONFIG": str(service.client_cfg), "PKCS11WS_LOGLEVEL": "4"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(exe), module_path(), REPORT], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    mods = got["modules"]
    assert "pycurl._pycurl" in mods and "pkcs11ws.provider" in mods
    assert "site" not in mods and "sitecustomize" not in mods
    leaked = [m for m in mods if m.split(".")[0] in LIST_SLOTS_NEVER or m in LIST_SLOTS_NEVER]
    assert leaked == []
    # The package first, the runtime's site-packages last, the standard library between.
    path = got["path"]
    assert Path(path[0]) == REPO and path[-1] == sysconfig.get_paths()["purelib"]
    stdlib = sysconfig.get_paths()["stdlib"]
    assert all(p.startswith(sys.base_prefix) for p in path[1:-1]) and stdlib in path
    # The start-up's objects are frozen out of the collector, which runs again.
    assert got["gc"] is True and got["frozen"] > 5_000
    # Nor are the number -> name tables of constants.py built, nor the protocol's error and
    # attribute tables (on first use only).
    assert got["tables"] == []
    assert got["protocol"] == []
