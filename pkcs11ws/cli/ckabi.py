"""The utilities' binding to any PKCS#11 module through its C ABI (ctypes).

dlopen() the library (RTLD_LOCAL, as hosts do), call C_GetFunctionList, and call every function
through the returned CK_FUNCTION_LIST. Every structure and the function list come from the one
ctypes binding (pkcs11ws/abi_ctypes.py, generated from the rows of pkcs11ws/abi.py).
Nothing here knows about pkcs11ws: the same code drives SoftHSM2 or any other module. Every
failure is a CKError carrying the function name and the CKR; secrets passed in are not kept.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Sequence
from ctypes import POINTER, byref, c_void_p
from typing import Any, Final

from pkcs11ws import constants as C
from pkcs11ws._lite import dataclass
from pkcs11ws.abi_ctypes import (
    CK_ATTRIBUTE,
    CK_BBOOL,
    CK_C_INITIALIZE_ARGS,
    CK_FUNCTION_LIST,
    CK_INFO,
    CK_MECHANISM,
    CK_MECHANISM_INFO,
    CK_SLOT_INFO,
    CK_TOKEN_INFO,
    CK_ULONG,
)

ULONG_SIZE: Final = ctypes.sizeof(CK_ULONG)


class LoadError(Exception):
    """The file cannot be loaded or is not a PKCS#11 module."""


class CKError(Exception):
    """A PKCS#11 function returned something other than CKR_OK."""

    def __init__(self, fn: str, rv: int) -> None:
        super().__init__(f"{fn} returned {C.ckr_name(rv)}")
        self.fn = fn
        self.rv = rv
        self.name = C.ckr_name(rv)


def text(field: Any) -> str:
    """A blank-padded CK_UTF8CHAR array as a str."""
    return bytes(field).decode("utf-8", "replace").rstrip(" \x00")


def version(v: Any) -> str:
    return f"{v.major}.{v.minor}"


def ulong_bytes(value: int) -> bytes:
    return value.to_bytes(ULONG_SIZE, sys.byteorder)


def bytes_ulong(raw: bytes) -> int:
    return int.from_bytes(raw, sys.byteorder)


@dataclass(frozen=True)
class Info:
    cryptoki_version: str
    manufacturer: str
    flags: int
    description: str
    library_version: str


@dataclass(frozen=True)
class SlotInfo:
    description: str
    manufacturer: str
    flags: int
    hardware_version: str
    firmware_version: str

    @property
    def token_present(self) -> bool:
        return bool(self.flags & C.CKF_TOKEN_PRESENT)


@dataclass(frozen=True)
class TokenInfo:
    label: str
    manufacturer: str
    model: str
    serial: str
    flags: int
    max_sessions: int
    sessions: int
    max_rw_sessions: int
    rw_sessions: int
    max_pin: int
    min_pin: int
    total_public: int
    free_public: int
    total_private: int
    free_private: int
    hardware_version: str
    firmware_version: str
    utc_time: str


@dataclass(frozen=True)
class MechanismInfo:
    min_key: int
    max_key: int
    flags: int


class Sensitive:
    """The value of an attribute the module will not reveal (CKR_ATTRIBUTE_SENSITIVE)."""

    def __repr__(self) -> str:
        return "<sensitive>"


SENSITIVE: Final = Sensitive()

AttrIn = bool | int | bytes


class Template:
    """A CK_ATTRIBUTE array built from (type, value) pairs; keeps the value buffers alive.
    bool -> CK_BBOOL, int -> CK_ULONG, bytes as they are."""

    def __init__(self, items: Sequence[tuple[int, AttrIn]]) -> None:
        self.count = len(items)
        self.array = (CK_ATTRIBUTE * max(1, self.count))()
        self._buffers: list[Any] = []
        for i, (kind, value) in enumerate(items):
            if isinstance(value, bool):
                raw = b"\x01" if value else b"\x00"
            elif isinstance(value, int):
                raw = ulong_bytes(value)
            else:
                raw = bytes(value)
            buf = ctypes.create_string_buffer(raw, max(1, len(raw)))
            self._buffers.append(buf)
            self.array[i].type = kind
            self.array[i].pValue = ctypes.addressof(buf)
            self.array[i].ulValueLen = len(raw)


class Mechanism:
    """A CK_MECHANISM with its parameter (bytes, or an int sent as a CK_ULONG)."""

    def __init__(self, mech: int, param: bytes | int | None = None) -> None:
        self._buf: Any = None
        if param is None:
            self.struct = CK_MECHANISM(mech, None, 0)
        else:
            raw = ulong_bytes(param) if isinstance(param, int) else param
            self._buf = ctypes.create_string_buffer(raw, max(1, len(raw)))
            self.struct = CK_MECHANISM(mech, ctypes.addressof(self._buf), len(raw))


class Library:
    """A loaded PKCS#11 module and its CK_FUNCTION_LIST."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.dll = ctypes.CDLL(path)
        except OSError as e:
            raise LoadError(f"cannot load {path}: {e}") from None
        try:
            get = self.dll.C_GetFunctionList
        except AttributeError:
            raise LoadError(
                f"{path} does not export C_GetFunctionList: not a PKCS#11 module"
            ) from None
        get.restype = CK_ULONG
        get.argtypes = [c_void_p]
        ptr = POINTER(CK_FUNCTION_LIST)()
        rv = int(get(byref(ptr)))
        if rv != C.CKR_OK:
            raise LoadError(f"{path}: C_GetFunctionList returned {C.ckr_name(rv)}")
        if not ptr:
            raise LoadError(f"{path}: C_GetFunctionList gave a NULL function list")
        self.fl: Any = ptr.contents
        self.interface_version = version(self.fl.version)
        self.initialized = False

    # -- raw calls ------------------------------------------------------------------------------

    def call(self, name: str, *args: Any) -> int:
        fn = getattr(self.fl, name)
        if not fn:
            # A NULL entry in the list: calling it would crash the process.
            return C.CKR_FUNCTION_NOT_SUPPORTED
        return int(fn(*args))

    def check(self, name: str, *args: Any) -> None:
        rv = self.call(name, *args)
        if rv != C.CKR_OK:
            raise CKError(name, rv)

    # -- general --------------------------------------------------------------------------------

    def initialize(self) -> None:
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, C.CKF_OS_LOCKING_OK, None)
        rv = self.call("C_Initialize", byref(args))
        if rv not in (C.CKR_OK, C.CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise CKError("C_Initialize", rv)
        self.initialized = True

    def finalize(self) -> None:
        if self.initialized:
            self.initialized = False
            self.check("C_Finalize", None)

    def __enter__(self) -> Library:
        self.initialize()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()

    def info(self) -> Info:
        i = CK_INFO()
        self.check("C_GetInfo", byref(i))
        return Info(
            version(i.cryptokiVersion),
            text(i.manufacturerID),
            int(i.flags),
            text(i.libraryDescription),
            version(i.libraryVersion),
        )

    # -- slots and tokens -----------------------------------------------------------------------

    def slots(self, token_present: bool = False) -> list[int]:
        # The count can grow between the two calls (a token appears): retry on BUFFER_TOO_SMALL.
        for _ in range(5):
            n = CK_ULONG()
            self.check("C_GetSlotList", CK_BBOOL(token_present), None, byref(n))
            arr = (CK_ULONG * max(1, n.value))()
            rv = self.call("C_GetSlotList", CK_BBOOL(token_present), arr, byref(n))
            if rv == C.CKR_BUFFER_TOO_SMALL:
                continue
            if rv != C.CKR_OK:
                raise CKError("C_GetSlotList", rv)
            return [int(s) for s in arr[: n.value]]
        raise CKError("C_GetSlotList", C.CKR_BUFFER_TOO_SMALL)

    def slot_info(self, slot: int) -> SlotInfo:
        i = CK_SLOT_INFO()
        self.check("C_GetSlotInfo", slot, byref(i))
        return SlotInfo(
            text(i.slotDescription),
            text(i.manufacturerID),
            int(i.flags),
            version(i.hardwareVersion),
            version(i.firmwareVersion),
        )

    def token_info(self, slot: int) -> TokenInfo:
        i = CK_TOKEN_INFO()
        self.check("C_GetTokenInfo", slot, byref(i))
        return TokenInfo(
            text(i.label),
            text(i.manufacturerID),
            text(i.model),
            text(i.serialNumber),
            int(i.flags),
            int(i.ulMaxSessionCount),
            int(i.ulSessionCount),
            int(i.ulMaxRwSessionCount),
            int(i.ulRwSessionCount),
            int(i.ulMaxPinLen),
            int(i.ulMinPinLen),
            int(i.ulTotalPublicMemory),
            int(i.ulFreePublicMemory),
            int(i.ulTotalPrivateMemory),
            int(i.ulFreePrivateMemory),
            version(i.hardwareVersion),
            version(i.firmwareVersion),
            text(i.utcTime),
        )

    def mechanisms(self, slot: int) -> list[int]:
        n = CK_ULONG()
        self.check("C_GetMechanismList", slot, None, byref(n))
        arr = (CK_ULONG * max(1, n.value))()
        self.check("C_GetMechanismList", slot, arr, byref(n))
        return [int(m) for m in arr[: n.value]]

    def mechanism_info(self, slot: int, mech: int) -> MechanismInfo:
        i = CK_MECHANISM_INFO()
        self.check("C_GetMechanismInfo", slot, mech, byref(i))
        return MechanismInfo(int(i.ulMinKeySize), int(i.ulMaxKeySize), int(i.flags))

    def open_session(self, slot: int, rw: bool = False) -> Session:
        h = CK_ULONG()
        flags = C.CKF_SERIAL_SESSION | (C.CKF_RW_SESSION if rw else 0)
        self.check("C_OpenSession", slot, flags, None, None, byref(h))
        return Session(self, int(h.value))


class Session:
    """One open session; close() (or `with`) ends it."""

    def __init__(self, lib: Library, handle: int) -> None:
        self.lib = lib
        self.handle = handle
        self.open = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.lib.check("C_CloseSession", self.handle)

    def login(self, pin: bytes, user: int = C.CKU_USER) -> None:
        buf = ctypes.create_string_buffer(pin, max(1, len(pin)))
        try:
            self.lib.check("C_Login", self.handle, user, buf, len(pin))
        finally:
            ctypes.memset(buf, 0, len(buf))

    def logout(self) -> None:
        self.lib.check("C_Logout", self.handle)

    def find(self, items: Sequence[tuple[int, AttrIn]] = ()) -> list[int]:
        return list(self.iter_find(items))

    def iter_find(self, items: Sequence[tuple[int, AttrIn]] = ()) -> Iterator[int]:
        t = Template(items)
        self.lib.check("C_FindObjectsInit", self.handle, t.array, t.count)
        try:
            arr = (CK_ULONG * 32)()
            n = CK_ULONG()
            while True:
                self.lib.check("C_FindObjects", self.handle, arr, 32, byref(n))
                if n.value == 0:
                    return
                yield from (int(h) for h in arr[: n.value])
        finally:
            self.lib.check("C_FindObjectsFinal", self.handle)

    def attribute(self, obj: int, kind: int) -> bytes | Sensitive | None:
        """One attribute's value; SENSITIVE when the module withholds it, None when the object
        has no such attribute."""
        a = CK_ATTRIBUTE(kind, None, 0)
        rv = self.lib.call("C_GetAttributeValue", self.handle, obj, byref(a), 1)
        if rv == C.CKR_ATTRIBUTE_SENSITIVE:
            return SENSITIVE
        if rv == C.CKR_ATTRIBUTE_TYPE_INVALID:
            return None
        if rv != C.CKR_OK:
            raise CKError("C_GetAttributeValue", rv)
        if a.ulValueLen == C.CK_UNAVAILABLE_INFORMATION:
            return None
        buf = ctypes.create_string_buffer(max(1, a.ulValueLen))
        a.pValue = ctypes.addressof(buf)
        self.lib.check("C_GetAttributeValue", self.handle, obj, byref(a), 1)
        return buf.raw[: a.ulValueLen]

    def generate_key(self, mech: Mechanism, items: Sequence[tuple[int, AttrIn]]) -> int:
        t = Template(items)
        h = CK_ULONG()
        self.lib.check("C_GenerateKey", self.handle, byref(mech.struct), t.array, t.count, byref(h))
        return int(h.value)

    def generate_key_pair(
        self,
        mech: Mechanism,
        public: Sequence[tuple[int, AttrIn]],
        private: Sequence[tuple[int, AttrIn]],
    ) -> tuple[int, int]:
        pub, priv = Template(public), Template(private)
        hp, hv = CK_ULONG(), CK_ULONG()
        self.lib.check(
            "C_GenerateKeyPair",
            self.handle,
            byref(mech.struct),
            pub.array,
            pub.count,
            priv.array,
            priv.count,
            byref(hp),
            byref(hv),
        )
        return int(hp.value), int(hv.value)

    def create_object(self, items: Sequence[tuple[int, AttrIn]]) -> int:
        t = Template(items)
        h = CK_ULONG()
        self.lib.check("C_CreateObject", self.handle, t.array, t.count, byref(h))
        return int(h.value)

    def destroy(self, obj: int) -> None:
        self.lib.check("C_DestroyObject", self.handle, obj)

    def _single(self, fn: str, data: bytes) -> bytes:
        """C_Encrypt/C_Decrypt/C_Sign/C_Digest with the two-call length convention."""
        src = ctypes.create_string_buffer(data, max(1, len(data)))
        n = CK_ULONG()
        self.lib.check(fn, self.handle, src, len(data), None, byref(n))
        out = ctypes.create_string_buffer(max(1, n.value))
        self.lib.check(fn, self.handle, src, len(data), out, byref(n))
        return out.raw[: n.value]

    def digest(self, mech: Mechanism, data: bytes) -> bytes:
        self.lib.check("C_DigestInit", self.handle, byref(mech.struct))
        return self._single("C_Digest", data)

    def encrypt(self, mech: Mechanism, key: int, data: bytes) -> bytes:
        self.lib.check("C_EncryptInit", self.handle, byref(mech.struct), key)
        return self._single("C_Encrypt", data)

    def decrypt(self, mech: Mechanism, key: int, data: bytes) -> bytes:
        self.lib.check("C_DecryptInit", self.handle, byref(mech.struct), key)
        return self._single("C_Decrypt", data)

    def sign(self, mech: Mechanism, key: int, data: bytes) -> bytes:
        self.lib.check("C_SignInit", self.handle, byref(mech.struct), key)
        return self._single("C_Sign", data)

    def verify(self, mech: Mechanism, key: int, data: bytes, signature: bytes) -> int:
        """C_VerifyInit + C_Verify; returns the CKR of C_Verify (CKR_OK when it verifies)."""
        self.lib.check("C_VerifyInit", self.handle, byref(mech.struct), key)
        src = ctypes.create_string_buffer(data, max(1, len(data)))
        sig = ctypes.create_string_buffer(signature, max(1, len(signature)))
        return self.lib.call("C_Verify", self.handle, src, len(data), sig, len(signature))
