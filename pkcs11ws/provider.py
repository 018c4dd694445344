"""The Python provider behind the Cython core: slots, login, the object directory, requests.

The core (pkcs11ws/_native/core.pyx) calls a Provider with the GIL, at most once per PKCS#11
operation, and only for what needs the key service or a policy decision. Everything here raises
PKCS11Error (with the CKR to return); the core's one funnel maps any other exception.

- Slots: one per softcard (token label: token_label(), unique even for long names), numbered
  1, 2, ... in the order the process first sees each card and stable for the life of the
  process (the WSOP guide: slot IDs are not the service's numbers). A card deleted on the
  service keeps its slot with no token present.
- Login: per slot, shared by every session of the process (the standard's model). The token's
  CKF_USER_PIN_COUNT_LOW / FINAL_TRY / LOCKED flags come from the service's count of wrong
  passphrases, as of this process's last C_GetSlotList or C_Login on the slot (C_GetTokenInfo
  costs no round trip; another process's wrong passphrases show after the next C_GetSlotList).
  The state is an activation token from the service; its presence is mirrored into the core so
  that C_*Init and C_GetSessionInfo need no Python. An answer NOT_ACTIVATED (expired or
  revoked) logs out. A login in use never meets the activation lifetime: a token past half its
  life is renewed (the service's `renew`) by the next operation that uses it, and swapped in
  for every session.
- Objects: handles are the core's (1, 2, ...), stable within the process, mapped here to the
  service's UUIDs with each object's attributes cached from the answer that produced them, so
  C_GetAttributeValue after C_FindObjects costs no round trip.
- A create, copy or destroy that got no answer keeps its idempotency key (PENDING) for the
  application's retry with the same template, which then returns the object the service may have
  made instead of a second one.
- No lock is held across a request: threads overlap on the network (pycurl drops the GIL).
"""

from __future__ import annotations

import _thread  # not threading (start-up: pkcs11ws/_lite.py)
import time

from pkcs11ws import _lite, mechanisms
from pkcs11ws import constants as C
from pkcs11ws._lite import dataclass
from pkcs11ws._native.core import ProviderFields
from pkcs11ws.client import transport
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.client.idempotency import PendingKeys
from pkcs11ws.client.transport import Transport
from pkcs11ws.config import Config, load_config
from pkcs11ws.errors import PKCS11Error, ServiceError
from pkcs11ws.log import LOG
from pkcs11ws.protocol import Attrs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    import threading  # its Lock type only: the locks come from _thread (start-up)
    from collections.abc import Callable
    from typing import Any, Protocol, TypeVar

    from pkcs11ws import params, templates

    T = TypeVar("T")

    # The core's hooks, for type checkers only (a class costs every start-up ~0.1 M
    # instructions to make; the annotations that name it are strings at run time).
    class Native(Protocol):
        """The core's hooks (pkcs11ws._native.core)."""

        def slot_update(
            self, slot_id: int, present: bool, label: bytes, description: bytes, serial: bytes
        ) -> None: ...

        def slot_set_login(self, slot_id: int, logged_in: bool) -> None: ...

        def slot_set_pin_flags(self, slot_id: int, flags: int) -> None: ...

        def object_put(
            self,
            handle: int,
            slot_id: int,
            cls: int,
            key_type: int,
            encrypt: bool,
            decrypt: bool,
            sign: bool,
            verify: bool,
            size: int = 0,
            private: bool = True,
        ) -> int: ...

        def object_drop(self, handle: int) -> None: ...
else:  # typing is too heavy for the module's start-up
    # Object templates and mechanism parameters: imported by the first call that needs them
    # (pkcs11-tool -L, a C_Sign of HMAC, need neither; ~1.5 M instructions of every start-up).
    templates = _lite.LazyModule("pkcs11ws.templates", globals(), "templates")
    params = _lite.LazyModule("pkcs11ws.params", globals(), "params")

RANDOM_CHUNK = 65536  # the service's largest random request
_NEVER = float("inf")
_MAX_FAST = 1024  # keys the core's fast path remembers (a bound, not a tuning)
RENEW_RETRY = 30.0  # seconds before retrying a renewal that got no answer
_VERIFY = 3  # the core's OP_VERIFY
# The protocol's operation for each of the core's OP_ENCRYPT, OP_DECRYPT, OP_SIGN, OP_VERIFY.
_OP_NAMES = ("encrypt", "decrypt", "sign", "verify")
_monotonic = time.monotonic


@dataclass()
class Slot:
    slot_id: int
    card: str  # the softcard's UUID on the service
    name: str
    present: bool = True
    pin_flags: int = 0


@dataclass()
class Obj:
    handle: int
    slot_id: int
    uuid: str
    attrs: Attrs
    public_key: Any = None  # a public key half, loaded for local verify/encrypt
    public: bool = False  # a CKO_PUBLIC_KEY: verify/encrypt run here


class Directory:
    """Slots and objects: lives for the process (across C_Finalize/C_Initialize)."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.slots: dict[int, Slot] = {}
        self.slot_by_card: dict[str, int] = {}
        self.objects: dict[int, Obj] = {}
        self.by_uuid: dict[tuple[int, str], int] = {}


DIRECTORY = Directory()
# Idempotency keys of creates (and destroys) that got no answer: kept across C_Finalize/
# C_Initialize so that the application's retry of the same call returns the object the service
# may have made (client/api.py).
PENDING = PendingKeys()


class _refusal:
    """Logs a template the module refuses at DEBUG1: the call and the reason, which names the
    offending attribute (templates.py never puts a value that could be secret in a message)."""

    def __init__(self, fn: str) -> None:
        self.fn = fn

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, e: BaseException | None, tb: object) -> None:
        if isinstance(e, PKCS11Error):
            LOG.debug1(f"{self.fn}: template refused, {C.ckr_name(e.ckr)}: {e.message}")


LABEL_LEN = 32  # CK_TOKEN_INFO.label
_LONG_PREFIX = 23


def token_label(name: str) -> bytes:
    """The token label of a softcard: its name when it fits the 32 bytes, else the first 23
    characters, "~" and 8 hex digits of the SHA-256 of the whole name. Names are letters and
    digits, so a shortened label never equals a name, and two names sharing their first 32
    characters get different labels (the same in every process, as it depends on the name only).
    The slot description carries the whole name."""
    raw = name.encode("utf-8", "replace")
    if len(raw) <= LABEL_LEN:
        return raw
    import hashlib  # names over 32 characters only: kept out of start-up

    return raw[:_LONG_PREFIX] + b"~" + hashlib.sha256(raw).hexdigest()[:8].encode("ascii")


def pin_flags(card: dict[str, Any]) -> int:
    """The token's CKF_USER_PIN_* flags from a softcard as the service describes it."""
    failures: int = card.get("failures", 0)
    threshold: int = card.get("failure_threshold", 0)
    flags = 0
    if failures > 0:
        flags |= C.CKF_USER_PIN_COUNT_LOW
    if card.get("locked_for", 0) > 0:
        flags |= C.CKF_USER_PIN_LOCKED
    elif threshold and failures >= threshold - 1:
        flags |= C.CKF_USER_PIN_FINAL_TRY  # the next wrong passphrase locks the card
    return flags


def _usage(attrs: Attrs) -> tuple[bool, bool, bool, bool]:
    return (
        attrs.get("CKA_ENCRYPT") is True,
        attrs.get("CKA_DECRYPT") is True,
        attrs.get("CKA_SIGN") is True,
        attrs.get("CKA_VERIFY") is True,
    )


class Provider(ProviderFields):
    """One C_Initialize .. C_Finalize: the configuration, the client, the login state. (`fast`,
    `dir`, `tokens` and `renew_at` are the core's ProviderFields, read by its fast path:
    pkcs11ws/_native/fastpath.pxi.)"""

    def __init__(self, config_path: str | None, native: Native, no_threads: bool = False) -> None:
        cfg = load_config(config_path)
        LOG.configure(cfg)
        for warning in cfg.warnings:
            LOG.warning(warning)
        LOG.debug1(f"C_Initialize: configuration {cfg.path}, key service {cfg.where()}")
        self._check_cert(cfg)
        self.cfg = cfg
        self.native = native
        self.dir = DIRECTORY
        # no_threads: the host forbade new threads (CKF_LIBRARY_CANT_CREATE_OS_THREADS).
        self.no_threads = no_threads
        self.client = KeyServiceClient(cfg, transport=Transport(cfg, no_threads), pending=PENDING)
        # Logging out is best effort and must not wait through MAXRETRIES x RETRYDELAY: a
        # no-retry client over the same transport (the thread's connection, no new handshake).
        self._quick: KeyServiceClient | None = None
        self._lock = _thread.allocate_lock()
        self.tokens: dict[int, str] = {}  # slot ID -> activation token
        # slot ID -> time.monotonic() at which its token is past half its life: renew then.
        self.renew_at: dict[int, float] = {}
        self._login_locks: dict[int, threading.Lock] = {}
        # The core's fast path (pkcs11ws/_native/fastpath.pxi): key handle -> what crypto()
        # found for its last request with no IV or parameter: (mechanism, slot ID, the Obj,
        # the token, the request head, the client, its group commit, the mechanism's
        # _GENERAL flag, the group commit's lane). The core uses an entry only while the
        # directory still holds that Obj, self.tokens that token (by identity), and renew_at
        # is not reached: so nothing here needs invalidating; any other case calls crypto().
        self.fast: dict[int, tuple[Any, ...]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    def _check_cert(cfg: Config) -> None:
        """Warn when CERT has expired or expires soon: the service would refuse it (issue 10)."""
        from pkcs11ws.client.certinfo import expiry_warning

        warning = expiry_warning(cfg.cert, time.time())
        if warning is not None:
            LOG.warning(f"C_Initialize: {warning}")

    def abort(self) -> None:
        """End the requests other threads are waiting on (for C_Finalize during calls): their
        calls fail with CKR_CRYPTOKI_NOT_INITIALIZED at once, and so does every later request;
        finalize() (whose client.close() does this too, then waits for them) must follow. Safe
        to call from any thread, more than once."""
        self.client.abort()

    def finalize(self) -> None:
        with self._lock:
            tokens, self.tokens = dict(self.tokens), {}
        for slot_id, token in tokens.items():
            self.native.slot_set_login(slot_id, False)
            self._deactivate(slot_id, token)
        self.client.close()  # also the transport of self._quick
        LOG.debug1("C_Finalize")
        LOG.close()

    def after_fork_child(self) -> None:
        """In a forked child: never reuse nor close the parent's connections."""
        self.tokens = {}
        self.client.reset_after_fork()  # also the transport of self._quick

    @staticmethod
    def in_request() -> bool:
        """True when this thread is inside one of our key service requests: a call nested in
        libcurl's start-up (OpenSSL loading pkcs11-provider early). The core asks before
        C_Finalize; the transport is the layer that knows."""
        return transport.nested()

    # -- slots --------------------------------------------------------------------------------

    def refresh_slots(self) -> None:
        if self.in_request():
            # Called back from inside libcurl's start-up (OpenSSL loading pkcs11-provider
            # early, which lists slots): the slots known so far must do, as a request from
            # here cannot be made; failing would make that provider C_Finalize us.
            LOG.debug1("C_GetSlotList: nested in a request, slot list not refreshed")
            return
        cards = self.client.list_softcards()
        seen = set()
        with self.dir.lock:
            for card in cards:
                seen.add(card["id"])
                sid = self.dir.slot_by_card.get(card["id"])
                if sid is None:
                    sid = len(self.dir.slots) + 1
                    self.dir.slot_by_card[card["id"]] = sid
                    self.dir.slots[sid] = Slot(sid, card["id"], card["name"])
                slot = self.dir.slots[sid]
                slot.name = card["name"]
                slot.present = True
                slot.pin_flags = pin_flags(card)
            for slot in self.dir.slots.values():
                if slot.card not in seen:
                    slot.present = False
            rows = [_lite.replace(s) for s in self.dir.slots.values()]
        for slot in rows:
            if not slot.present:
                self._forget_login(slot.slot_id)
            name = slot.name.encode("utf-8", "replace")
            self.native.slot_update(
                slot.slot_id,
                slot.present,
                token_label(slot.name),
                b"pkcs11ws softcard " + name if len(name) <= 46 else name,
                slot.card.replace("-", "").encode("ascii")[:16],
            )
            self.native.slot_set_pin_flags(slot.slot_id, slot.pin_flags)
        LOG.debug3(f"C_GetSlotList: {len(cards)} softcards")

    def _slot(self, slot_id: int) -> Slot:
        with self.dir.lock:
            slot = self.dir.slots.get(slot_id)
        if slot is None:
            raise PKCS11Error(C.CKR_SLOT_ID_INVALID)
        if not slot.present:
            raise PKCS11Error(C.CKR_TOKEN_NOT_PRESENT, f"softcard {slot.name} is gone")
        return slot

    # -- login --------------------------------------------------------------------------------

    def login(self, slot_id: int, pin: bytes) -> None:
        slot = self._slot(slot_id)
        with self._lock:
            lock = self._login_locks.setdefault(slot_id, _thread.allocate_lock())
        with lock:
            if slot_id in self.tokens:
                raise PKCS11Error(C.CKR_USER_ALREADY_LOGGED_IN)
            try:
                token, expires = self.client.activate(slot.card, pin)
            except ServiceError as e:
                if e.ckr in (C.CKR_PIN_INCORRECT, C.CKR_PIN_LOCKED):
                    LOG.warning(f"C_Login: softcard {slot.name}: {e.message}")
                    self._update_pin_flags(slot)
                raise
            with self._lock:
                self.tokens[slot_id] = token
                self.renew_at[slot_id] = time.monotonic() + expires / 2
        if slot.pin_flags:
            slot.pin_flags = 0  # a good passphrase resets the service's count
            self.native.slot_set_pin_flags(slot_id, 0)
        LOG.debug1(f"C_Login: softcard {slot.name} activated for {expires} s")

    def _update_pin_flags(self, slot: Slot) -> None:
        """After a wrong passphrase: the count as the service now has it, for C_GetTokenInfo
        (one request on this failure path only; C_GetTokenInfo itself never asks)."""
        try:
            card = self._quick_client().get_softcard(slot.card)
        except PKCS11Error as e:
            LOG.debug1(f"C_Login: softcard {slot.name}: passphrase count not read ({e})")
            return
        slot.pin_flags = pin_flags(card)
        self.native.slot_set_pin_flags(slot.slot_id, slot.pin_flags)

    def _renew(self, slot_id: int, token: str) -> str:
        """Renew-while-in-use: a token past half its life is swapped for a fresh one, so a
        long-running application never meets the activation lifetime while it keeps working.
        On no answer the old token is kept (it is still valid) and renewal is tried later."""
        with self._lock:
            lock = self._login_locks.setdefault(slot_id, _thread.allocate_lock())
        with lock:
            current = self.tokens.get(slot_id)
            if current is None:
                raise PKCS11Error(C.CKR_USER_NOT_LOGGED_IN)
            if current != token or time.monotonic() < self.renew_at.get(slot_id, _NEVER):
                return current  # another thread renewed it meanwhile
            slot = self._slot(slot_id)
            try:
                fresh, expires = self.client.renew(slot.card, token)
            except ServiceError as e:
                if e.code == "NOT_ACTIVATED" or e.code == "SOFTCARD_NOT_FOUND":
                    self._forget_login(slot_id)
                    raise PKCS11Error(C.CKR_USER_NOT_LOGGED_IN, e.message) from None
                LOG.warning(f"slot {slot_id}: renewing the login failed ({e}); retrying later")
                self.renew_at[slot_id] = time.monotonic() + RENEW_RETRY
                return token
            except PKCS11Error as e:
                LOG.warning(f"slot {slot_id}: renewing the login failed ({e}); retrying later")
                self.renew_at[slot_id] = time.monotonic() + RENEW_RETRY
                return token
            with self._lock:
                self.tokens[slot_id] = fresh
                self.renew_at[slot_id] = time.monotonic() + expires / 2
        LOG.debug1(f"slot {slot_id}: login renewed for {expires} s")
        return fresh

    def logout(self, slot_id: int) -> None:
        with self._lock:
            token = self.tokens.pop(slot_id, None)
        if token is not None:
            self._deactivate(slot_id, token)
            LOG.debug1(f"C_Logout: slot {slot_id}")

    def _deactivate(self, slot_id: int, token: str) -> None:
        with self.dir.lock:
            slot = self.dir.slots.get(slot_id)
        if slot is None:
            return
        try:
            self._quick_client().deactivate(slot.card, token)
        except PKCS11Error as e:
            # The token expires on its own; the local state is logged out either way.
            LOG.warning(f"logout of softcard {slot.name}: {e}")

    def _quick_client(self) -> KeyServiceClient:
        if self._quick is None:
            quick = _lite.replace(self.cfg, maxretries=0)
            self._quick = KeyServiceClient(quick, transport=self.client.transport, pending=PENDING)
        return self._quick

    def _forget_login(self, slot_id: int) -> None:
        with self._lock:
            self.tokens.pop(slot_id, None)
        self.native.slot_set_login(slot_id, False)

    def _token(self, slot_id: int) -> str:
        token = self.tokens.get(slot_id)
        if token is None:
            raise PKCS11Error(C.CKR_USER_NOT_LOGGED_IN)
        if time.monotonic() >= self.renew_at.get(slot_id, _NEVER):
            return self._renew(slot_id, token)
        return token

    def _call(self, slot_id: int, fn: Callable[..., T], *args: Any, obj: Obj | None = None) -> T:
        """One request for a slot; keeps the login state and the directory in step with it."""
        try:
            return fn(*args)
        except ServiceError as e:
            self._failed(slot_id, e, obj)
            raise

    def _failed(self, slot_id: int, e: ServiceError, obj: Obj | None) -> None:
        if e.code == "NOT_ACTIVATED":
            LOG.warning(f"slot {slot_id}: the service ended the login ({e.message})")
            self._forget_login(slot_id)
        elif obj is not None and e.code in ("OBJECT_NOT_FOUND", "KEY_NOT_FOUND"):
            self._drop(obj)

    # -- objects ------------------------------------------------------------------------------

    def _remember(self, slot_id: int, found: dict[str, Any]) -> int:
        uuid: str = found["handle"]
        attrs: Attrs = found["attrs"]
        cls = attrs.get("CKA_CLASS", C.CK_UNAVAILABLE_INFORMATION)
        kt = attrs.get("CKA_KEY_TYPE", C.CK_UNAVAILABLE_INFORMATION)
        assert isinstance(cls, int) and isinstance(kt, int)
        with self.dir.lock:
            handle = self.dir.by_uuid.get((slot_id, uuid), 0)
            private = attrs.get("CKA_PRIVATE", True) is not False
            size = mechanisms.signature_size(attrs)
            handle = self.native.object_put(handle, slot_id, cls, kt, *_usage(attrs), size, private)
            self.dir.by_uuid[(slot_id, uuid)] = handle
            self.dir.objects[handle] = Obj(
                handle, slot_id, uuid, attrs, public=cls == C.CKO_PUBLIC_KEY
            )
        return handle

    def _drop(self, obj: Obj) -> None:
        with self.dir.lock:
            self.dir.objects.pop(obj.handle, None)
            self.dir.by_uuid.pop((obj.slot_id, obj.uuid), None)
        self.native.object_drop(obj.handle)

    def _object(self, slot_id: int, handle: int, ckr: int = C.CKR_OBJECT_HANDLE_INVALID) -> Obj:
        with self.dir.lock:
            obj = self.dir.objects.get(handle)
        if obj is None or obj.slot_id != slot_id:
            raise PKCS11Error(ckr)
        return obj

    def find(self, slot_id: int, template: templates.RawTemplate) -> list[int]:
        slot = self._slot(slot_id)
        attrs = templates.decode_search(template)
        if attrs is None:
            return []
        token = self.tokens.get(slot_id)
        if token is None:
            # Before C_Login only public objects (certificates, public keys) are visible.
            if attrs.get("CKA_PRIVATE", False) is not False:
                return []
            found = self.client.search_public(slot.card, attrs)
        else:
            if time.monotonic() >= self.renew_at.get(slot_id, _NEVER):
                token = self._renew(slot_id, token)
            found = self._call(slot_id, self.client.search_objects, slot.card, token, attrs)
        handles = [self._remember(slot_id, item) for item in found]
        LOG.debug3(f"C_FindObjectsInit: {len(handles)} objects on slot {slot_id}")
        return handles

    def _visible(self, slot_id: int, handle: int) -> Obj:
        obj = self._object(slot_id, handle)
        if obj.attrs.get("CKA_PRIVATE", True) and slot_id not in self.tokens:
            raise PKCS11Error(C.CKR_OBJECT_HANDLE_INVALID, "private object, not logged in")
        return obj

    def get_attributes(self, slot_id: int, handle: int, types: list[int]) -> list[bytes | int]:
        return templates.attribute_values(self._visible(slot_id, handle).attrs, types)

    def object_size(self, slot_id: int, handle: int) -> int:
        return templates.object_size(self._visible(slot_id, handle).attrs)

    def copy_object(self, slot_id: int, handle: int, template: templates.RawTemplate) -> int:
        slot = self._slot(slot_id)
        obj = self._visible(slot_id, handle)
        token = self._token(slot_id)
        with _refusal("C_CopyObject"):
            attrs = templates.decode_template(template)
            templates.check_copy(obj.attrs, attrs)
        made = self._call(
            slot_id, self.client.copy_object, slot.card, token, obj.uuid, attrs, obj=obj
        )
        new = self._remember(slot_id, made)
        LOG.debug1(f"C_CopyObject: object {handle} copied to {new} on slot {slot_id}")
        return new

    def set_attributes(self, slot_id: int, handle: int, template: templates.RawTemplate) -> None:
        slot = self._slot(slot_id)
        obj = self._visible(slot_id, handle)
        with _refusal("C_SetAttributeValue"):
            attrs = templates.decode_template(template)
            templates.check_rename(obj.attrs, attrs)
        token = self._token(slot_id)
        if not attrs:
            return
        made = self._call(
            slot_id, self.client.update_object, slot.card, token, obj.uuid, attrs, obj=obj
        )
        self._remember(slot_id, made)
        LOG.debug1(f"C_SetAttributeValue: object {handle} on slot {slot_id} renamed")

    def create_object(self, slot_id: int, template: templates.RawTemplate) -> int:
        slot = self._slot(slot_id)
        # The template before the login: an invalid one is a template error either way
        # (pkcs11test's CreateObjectInvalid), and it costs no round trip.
        with _refusal("C_CreateObject"):
            attrs = templates.decode_template(template)
            templates.check_create(attrs)
        token = self._token(slot_id)
        made = self._call(slot_id, self.client.create_object, slot.card, token, attrs)
        handle = self._remember(slot_id, made)
        LOG.debug1(f"C_CreateObject: object {handle} on slot {slot_id}")
        return handle

    def generate_key(self, slot_id: int, mechanism: int, template: templates.RawTemplate) -> int:
        slot = self._slot(slot_id)
        mech = mechanisms.by_code(mechanism)
        if mech is None or mech.action is not mechanisms.Action.KEYGEN:
            raise PKCS11Error(C.CKR_MECHANISM_INVALID)
        with _refusal("C_GenerateKey"):
            attrs = templates.decode_template(template)
            templates.check_generate(mech, attrs)
        token = self._token(slot_id)
        made = self._call(slot_id, self.client.generate_key, slot.card, token, mech.name, attrs)
        handle = self._remember(slot_id, made)
        LOG.debug1(f"C_GenerateKey: {mech.name} key {handle} on slot {slot_id}")
        return handle

    def generate_key_pair(
        self,
        slot_id: int,
        mechanism: int,
        public: templates.RawTemplate,
        private: templates.RawTemplate,
    ) -> tuple[int, int]:
        slot = self._slot(slot_id)
        mech = mechanisms.by_code(mechanism)
        if mech is None or mech.action is not mechanisms.Action.KEYPAIR:
            raise PKCS11Error(C.CKR_MECHANISM_INVALID)
        with _refusal("C_GenerateKeyPair"):
            pub = templates.decode_template(public)
            priv = templates.decode_template(private)
            templates.check_generate_pair(mech, pub, priv)
        token = self._token(slot_id)
        made = self._call(
            slot_id, self.client.generate_key_pair, slot.card, token, mech.name, pub, priv
        )
        handles = (
            self._remember(slot_id, made["public"]),
            self._remember(slot_id, made["private"]),
        )
        LOG.debug1(f"C_GenerateKeyPair: {mech.name} keys {handles} on slot {slot_id}")
        return handles

    def destroy_object(self, slot_id: int, handle: int) -> None:
        slot = self._slot(slot_id)
        token = self._token(slot_id)
        obj = self._object(slot_id, handle)
        self._call(slot_id, self.client.delete_object, slot.card, token, obj.uuid, obj=obj)
        self._drop(obj)
        LOG.debug1(f"C_DestroyObject: object {handle} on slot {slot_id}")

    # -- cryptography -------------------------------------------------------------------------

    def crypto(
        self,
        which: int,
        slot_id: int,
        key: int,
        mech: int,
        data: bytes,
        iv: bytes,
        mac_len: int,
        param: bytes,
        signature: bytes | None,
    ) -> bytes | None:
        """Every encrypt, decrypt, sign and verify the core hands over (which: the core's
        OP_ENCRYPT .. OP_VERIFY): single-part, final, and each request of a multi-part
        cipher. iv: the CBC IV or chaining value (b"" for none); mac_len: the output length
        (sent for the _GENERAL mechanisms); param: a serialised struct parameter (PSS, OAEP,
        GCM); signature: what verify checks. A public key's work is done here; the rest is
        one request to the key service. Returns the output, None for a verified signature.

        The per-operation path: _token(), _object() and _call() are inlined (each Python frame
        between the core and pycurl costs). A request with no IV or parameter leaves its key's
        entry in self.fast: the core's fast path makes the next such request without this."""
        obj = self.dir.objects.get(key)  # one dict read is atomic: no lock
        if obj is None or obj.slot_id != slot_id:
            raise PKCS11Error(C.CKR_KEY_HANDLE_INVALID)
        m = mechanisms.BY_CODE[mech]
        extra = params.decode(m.param, param) if param else None
        if obj.public:
            # No request, so no token: a public (not CKA_PRIVATE) public key works before
            # C_Login (PKCS#11 public session); the core refused a private one already.
            if obj.attrs.get("CKA_PRIVATE", True) is not False and slot_id not in self.tokens:
                raise PKCS11Error(C.CKR_USER_NOT_LOGGED_IN)
            return self._public(which, obj, m, data, signature, extra or {})
        token = self.tokens.get(slot_id)
        if token is None:
            raise PKCS11Error(C.CKR_USER_NOT_LOGGED_IN)
        if _monotonic() >= self.renew_at.get(slot_id, _NEVER):
            token = self._renew(slot_id, token)
        if not iv and extra is None:
            e = self.fast.get(key)
            if e is None or e[3] is not token or e[2] is not obj or e[0] != mech:
                self._remember_fast(key, mech, slot_id, obj, token, m)
        try:
            return self.client.crypto(
                _OP_NAMES[which],
                token,
                obj.uuid,
                m.name,
                data,
                iv or None,
                signature,
                mac_len if m.general else None,
                extra,
            )
        except ServiceError as e:
            self._failed(slot_id, e, obj)
            raise

    def _remember_fast(
        self, key: int, mech: int, slot_id: int, obj: Obj, token: str, m: mechanisms.Mechanism
    ) -> None:
        """Keep what the core's fast path needs for the next request on this key (see fast)."""
        fast = self.fast
        if key not in fast and len(fast) >= _MAX_FAST:
            fast.clear()
        client = self.client
        head = client.head(token, obj.uuid, m.name)
        group = client.group
        lane = group.lane if group is not None else None
        fast[key] = (mech, slot_id, obj, token, head, client, group, m.general, lane)

    def failed(self, slot_id: int, key: int, e: ServiceError) -> None:
        """A crypto request on key failed (the core's fast path): as crypto() does."""
        self._failed(slot_id, e, self.dir.objects.get(key))

    @staticmethod
    def _public(
        which: int,
        obj: Obj,
        m: mechanisms.Mechanism,
        data: bytes,
        signature: bytes | None,
        extra: dict[str, Any],
    ) -> bytes | None:
        """Verify or encrypt with a public key, in the module (no round trip)."""
        from pkcs11ws import pubkey  # public-key work only: cryptography stays out of start-up

        if obj.public_key is None:
            spki = obj.attrs.get("CKA_PUBLIC_KEY_INFO")
            assert isinstance(spki, bytes)
            obj.public_key = pubkey.load(spki)
        if which == _VERIFY:
            assert signature is not None
            pubkey.verify(m, obj.public_key, data, signature, extra)
            return None
        return pubkey.encrypt(m, obj.public_key, data, extra)

    def random(self, length: int) -> bytes:
        parts = []
        while length > 0:
            n = min(length, RANDOM_CHUNK)
            parts.append(self.client.random(n))
            length -= n
        return b"".join(parts)
