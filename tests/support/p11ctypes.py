"""A small ctypes binding to a PKCS#11 module, for the module's own tests.

Structures and function lists come from the one ctypes binding (pkcs11ws/abi_ctypes.py,
generated with the module's C declarations from pkcs11ws/abi.py), so the tests call through the
CK_FUNCTION_LIST exactly as a C host does; attribute templates are the utilities' Template
(pkcs11ws/cli/ckabi.py).
`Module(path)` calls with the GIL released (like python-pkcs11); `Module(path, hold_gil=True)`
keeps the GIL across every call (like PyKCS11).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from ctypes import POINTER, byref
from typing import Any

from pkcs11ws import abi
from pkcs11ws import constants as C
from pkcs11ws.abi_ctypes import (
    CK_ATTRIBUTE,
    CK_BBOOL,
    CK_C_INITIALIZE_ARGS,
    CK_FUNCTION_LIST,
    CK_FUNCTION_LIST_3_0,
    CK_INFO,
    CK_INTERFACE,
    CK_MECHANISM,
    CK_MECHANISM_INFO,
    CK_SESSION_INFO,
    CK_SLOT_INFO,
    CK_TOKEN_INFO,
    CK_ULONG,
    CK_VERSION,
    function_list,
)
from pkcs11ws.cli import ckabi
from pkcs11ws.cli.ckabi import ulong_bytes

__all__ = [
    "CK_ATTRIBUTE",
    "CK_BBOOL",
    "CK_C_INITIALIZE_ARGS",
    "CK_INFO",
    "CK_INTERFACE",
    "CK_MECHANISM",
    "CK_MECHANISM_INFO",
    "CK_SESSION_INFO",
    "CK_SLOT_INFO",
    "CK_TOKEN_INFO",
    "CK_ULONG",
    "CK_VERSION",
    "CKError",
    "Module",
    "Template",
    "mechanism",
    "text",
    "ulong_bytes",
]

GEN = abi  # the one ABI table (also behind tools/gen_native.py and abi_ctypes)
FunctionList = CK_FUNCTION_LIST
FunctionList30 = CK_FUNCTION_LIST_3_0
FunctionListGil = function_list(abi.V240, ctypes.PYFUNCTYPE, "FunctionListGil")


class CKError(Exception):
    def __init__(self, fn: str, rv: int) -> None:
        super().__init__(f"{fn}: {C.ckr_name(rv)}")
        self.fn = fn
        self.rv = rv


def text(arr: Any) -> str:
    return bytes(arr).decode("utf-8").rstrip(" ")


class Template(ckabi.Template):
    """The utilities' CK_ATTRIBUTE array (.array, .count), typed loosely: tests build templates
    from mixed lists, wrong values included on purpose."""

    def __init__(self, items: Sequence[tuple[int, Any]]) -> None:
        super().__init__(items)


class Module:
    """A loaded module and its function list; call(name, *args) returns the CK_RV."""

    def __init__(self, path: str, hold_gil: bool = False) -> None:
        self.lib = ctypes.PyDLL(path) if hold_gil else ctypes.CDLL(path)
        fl = POINTER(FunctionListGil if hold_gil else FunctionList)()
        rv = self.lib.C_GetFunctionList(byref(fl))
        if rv != C.CKR_OK:
            raise CKError("C_GetFunctionList", rv)
        self.fl = fl.contents

    def call(self, name: str, *args: Any) -> int:
        rv: int = getattr(self.fl, name)(*args)
        return rv

    def ok(self, name: str, *args: Any) -> None:
        rv = self.call(name, *args)
        if rv != C.CKR_OK:
            raise CKError(name, rv)

    # -- conveniences ---------------------------------------------------------------------

    def initialize(self, config: str | None = None, flags: int = C.CKF_OS_LOCKING_OK) -> int:
        if config is None:
            return self.call("C_Initialize", None)
        self._reserved = ctypes.create_string_buffer(f"config={config}".encode())
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, flags, ctypes.addressof(self._reserved))
        return self.call("C_Initialize", byref(args))

    def slots(self, present: bool = True) -> list[int]:
        n = CK_ULONG()
        self.ok("C_GetSlotList", CK_BBOOL(present), None, byref(n))
        arr = (CK_ULONG * max(1, n.value))()
        self.ok("C_GetSlotList", CK_BBOOL(present), arr, byref(n))
        return list(arr[: n.value])

    def token_info(self, slot: int) -> CK_TOKEN_INFO:
        info = CK_TOKEN_INFO()
        self.ok("C_GetTokenInfo", slot, byref(info))
        return info

    def slot_by_label(self, label: str) -> int:
        for s in self.slots():
            if text(self.token_info(s).label) == label:
                return s
        raise LookupError(label)

    def open(self, slot: int, rw: bool = True) -> int:
        h = CK_ULONG()
        flags = C.CKF_SERIAL_SESSION | (C.CKF_RW_SESSION if rw else 0)
        self.ok("C_OpenSession", slot, flags, None, None, byref(h))
        return h.value

    def login(self, session: int, pin: bytes) -> int:
        buf = ctypes.create_string_buffer(pin, len(pin))
        return self.call("C_Login", session, C.CKU_USER, buf, len(pin))

    def create(
        self,
        session: int,
        items: list[tuple[int, Any]],
        fn: str = "C_CreateObject",
        mech: CK_MECHANISM | None = None,
    ) -> int:
        t = Template(items)
        h = CK_ULONG()
        if mech is not None:
            self.ok(fn, session, byref(mech), t.array, t.count, byref(h))
        else:
            self.ok(fn, session, t.array, t.count, byref(h))
        return h.value

    def generate(self, session: int, mech: int, items: list[tuple[int, Any]]) -> int:
        return self.create(session, items, "C_GenerateKey", CK_MECHANISM(mech, None, 0))

    def find(self, session: int, items: list[tuple[int, Any]]) -> list[int]:
        t = Template(items)
        self.ok("C_FindObjectsInit", session, t.array, t.count)
        out: list[int] = []
        arr = (CK_ULONG * 4)()
        n = CK_ULONG()
        while True:
            self.ok("C_FindObjects", session, arr, 4, byref(n))
            if n.value == 0:
                break
            out += arr[: n.value]
        self.ok("C_FindObjectsFinal", session)
        return out

    def attr(self, session: int, obj: int, t: int) -> bytes:
        a = CK_ATTRIBUTE(t, None, 0)
        self.ok("C_GetAttributeValue", session, obj, byref(a), 1)
        buf = ctypes.create_string_buffer(max(1, a.ulValueLen))
        a.pValue = ctypes.addressof(buf)
        self.ok("C_GetAttributeValue", session, obj, byref(a), 1)
        return buf.raw[: a.ulValueLen]

    def single(self, fn: str, session: int, data: bytes, size: int | None = None) -> bytes:
        """C_Encrypt/C_Decrypt/C_Sign with the two-call length convention."""
        n = CK_ULONG()
        if size is None:
            self.ok(fn, session, data or None, len(data), None, byref(n))
            size = n.value
        out = ctypes.create_string_buffer(max(1, size))
        n.value = size
        self.ok(fn, session, data or None, len(data), out, byref(n))
        return out.raw[: n.value]


def mechanism(mech: int, param: bytes | int | None = None) -> tuple[CK_MECHANISM, Any]:
    """A CK_MECHANISM and the buffer its parameter lives in (keep both alive)."""
    if param is None:
        return CK_MECHANISM(mech, None, 0), None
    raw = ulong_bytes(param) if isinstance(param, int) else param
    buf = ctypes.create_string_buffer(raw, len(raw))
    return CK_MECHANISM(mech, ctypes.addressof(buf), len(raw)), buf
