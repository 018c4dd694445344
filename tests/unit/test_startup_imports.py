"""What loading the module imports: the provider's import path stays free of heavy stdlib modules
(dataclasses/inspect, typing, contextlib, pycurl's asyncio helper), and the light stand-ins in
pkcs11ws/_lite.py behave like the dataclasses/contextlib/enum features they replace.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pkcs11ws import _lite, config, mechanisms, protocol
from pkcs11ws import constants as C
from pkcs11ws.provider import Slot

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("dataclasses", "inspect", "ast", "dis", "typing", "contextlib", "pycurl.async_multi")
# Loading pycurl needs neither: its extension gets _datetime's capsule without datetime.py, and
# the package is found with the import system's own PathFinder (importlib imports warnings); its
# namedtuple types are made on first use, so collections (and keyword, operator, reprlib) waits.
NOT_FOR_PYCURL = ("datetime", "importlib", "warnings", "collections", "keyword", "operator",
                  "reprlib")  # fmt: skip
# re (and the enum it imports) and json cost ~13 M instructions of every start-up: the client's
# JSON is pkcs11ws/client/wire.py (json's own C codec) and the patterns that only the
# service matches are compiled on first use. math is one more extension module to load; weakref
# is only its WeakSet, which _weakrefset (loaded by threading) holds; itertools was only the
# request ids' counter (a range iterator counts as well).
NOT_AT_START = ("re", "enum", "json", "math", "weakref", "itertools")
# os builds os.environ on _collections_abc's ~25 abstract classes (~5.4 M instructions): the
# start-up path uses posix's functions and pkcs11ws/_os.py's path helpers instead.
NO_OS = ("os", "posixpath", "genericpath", "stat", "_collections_abc")


def test_module_import_path_stays_light() -> None:
    # -S as in the loader's boot (site runs without the editable install's .pth): only what
    # pkcs11ws._native.core and the provider import themselves lands in sys.modules.
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import pkcs11ws._native.core, pkcs11ws.provider, pycurl\n"
        "mods = sorted(sys.modules)\n"
        "import json\n"
        "print(json.dumps([mods, pycurl.Curl.__name__, len(pycurl.__all__)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    mods, curl, n_all = json.loads(out)
    assert [m for m in HEAVY if m in mods] == []
    assert [m for m in NOT_FOR_PYCURL if m in mods] == []
    assert [m for m in mods if m.split(".")[0] in NOT_AT_START] == []
    assert [m for m in NO_OS if m in mods] == []
    assert "pycurl._pycurl" in mods and curl == "Curl" and n_all > 100


PATHS = ("", "/", "//", "///", "a", "a/", "/a", "//a", "///a", "a//b", "a/./b", "a/../b",
         "../a", "../../a/b", "/..", "/../a", "a/b/..", "a/b/../..", "a/b/../../..", ".", "./",
         "/a/b/", "/a/b//", "a/b/c.so", "/x/./y/../z/", "..", "a/..", "/a/../..",
         ".../a")  # fmt: skip


def test_os_stand_in_matches_os() -> None:
    import os
    import posixpath

    from pkcs11ws import _os

    for p in PATHS:
        for fn in ("dirname", "basename", "normpath", "abspath", "expanduser"):
            assert getattr(_os.path, fn)(p) == getattr(posixpath, fn)(p), (fn, p)
        for q in PATHS:
            assert _os.path.join(p, q) == posixpath.join(p, q), (p, q)
    assert _os.path.join("a", "b", "/c", "d") == posixpath.join("a", "b", "/c", "d")
    assert _os.path.expanduser("~/x") == posixpath.expanduser("~/x")
    here, missing = str(REPO / "pyproject.toml"), str(REPO / "no-such-file")
    for p in (here, str(REPO), missing, "", "bad\0name"):
        for fn in ("exists", "isfile", "isdir"):
            assert getattr(_os.path, fn)(p) == getattr(posixpath, fn)(p), (fn, p)
    for name in _os.__all__:
        if name not in ("environ", "path", "fsdecode"):
            assert getattr(_os, name) is getattr(os, name), name  # posix's own objects
    for raw in (b"plain", b"caf\xc3\xa9", b"bad\xff", "str", REPO):
        assert _os.fsdecode(raw) == os.fsdecode(raw)  # type: ignore[arg-type]
    # os imported (here, by pytest): its live environ, changes included
    os.environ["PKCS11WS_TEST_OS_STAND_IN"] = "1"
    try:
        assert _os.environ.get("PKCS11WS_TEST_OS_STAND_IN") == "1"
        assert dict(_os.environ.items()) == dict(os.environ)
    finally:
        del os.environ["PKCS11WS_TEST_OS_STAND_IN"]


def test_os_stand_in_environ_without_os() -> None:
    # Before any `import os`: the start-up copy of the environment, decoded as os.environ would
    # hold it (a non-UTF-8 byte included), then the same as os.environ once os is imported.
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}]\n"
        "from pkcs11ws import _os\n"
        "before = 'os' in sys.modules\n"
        "ours = dict(_os.environ.items())\n"
        "got = [_os.environ.get('PKCS11WS_X'), 'PKCS11WS_X' in _os.environ, len(_os.environ),\n"
        "       _os.environ.get('PKCS11WS_NONE', 'dflt'), sorted(_os.environ) == sorted(ours)]\n"
        "import os, json\n"
        "print(json.dumps([before, ours == dict(os.environ), len(os.environ), got]))\n"
    )
    env = {"PKCS11WS_X": "caf\udcff", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={k.encode(): v.encode("utf-8", "surrogateescape") for k, v in env.items()},
    ).stdout
    before, same, n, got = json.loads(out)
    assert before is False and same is True
    assert got == ["caf\udcff", True, n, "dflt", True]


def test_constant_name_tables_are_built_on_first_use() -> None:
    # constants.CK*_NAMES walk the module's names: not at import, the same tables on first use.
    code = (
        "import sys, json\n"
        f"sys.path[:0] = [{str(REPO)!r}]\n"
        "from pkcs11ws import constants as C\n"
        "built = [n for n in C._NAME_TABLES if n in vars(C)]\n"
        "got = [C.ckr_name(0x30), C.ckr_name(0x12345), 'CKR_NAMES' in vars(C)]\n"
        "from pkcs11ws.constants import CKM_NAMES\n"
        "got += [CKM_NAMES[C.CKM_SHA256_HMAC], C.CKA_NAMES[C.CKA_LABEL], C.CKK_NAMES[C.CKK_EC]]\n"
        "got += [C.CKO_NAMES[C.CKO_SECRET_KEY], 'CKR_OK' in C.CKR_NAMES.values()]\n"
        "got += [CKM_NAMES is C.CKM_NAMES]\n"
        "print(json.dumps([built, got]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == [
        [],
        ["CKR_DEVICE_ERROR", "CKR_0x00012345", True, "CKM_SHA256_HMAC", "CKA_LABEL", "CKK_EC",
         "CKO_SECRET_KEY", True, True],
    ]  # fmt: skip
    with pytest.raises(AttributeError):
        C.CKX_NAMES  # noqa: B018


def test_datetime_lent_to_pycurl_only_while_it_loads() -> None:
    # After the light pycurl load, `import datetime` is the real module, and pycurl's datetime
    # types are the same classes (one capsule).
    code = (
        "import sys, json\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import pkcs11ws.client._curl_boot\n"
        "before = 'datetime' in sys.modules\n"
        "import datetime, _datetime\n"
        "real = datetime.__file__.endswith('datetime.py')\n"
        "same = datetime.datetime is _datetime.datetime\n"
        "print(json.dumps([before, real, same, 'pycurl._pycurl' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == [False, True, True, True]


def test_pycurl_extension_opened_lazily_then_flags_restored() -> None:
    """libcurl's libraries bind lazily (sys.setdlopenflags around the extension's import only):
    the interpreter's flags are back to what they were, and pycurl works."""
    code = (
        "import sys, os, json\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "before = sys.getdlopenflags()\n"
        "seen = []\n"
        "real = sys.setdlopenflags\n"
        "sys.setdlopenflags = lambda f: (seen.append(f), real(f))[1]\n"
        "import pkcs11ws.client._curl_boot\n"
        "import pycurl\n"
        "print(json.dumps([before, sys.getdlopenflags(), seen, os.RTLD_NOW, os.RTLD_LAZY,\n"
        "                  'libcurl/' in pycurl.version]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    before, after, seen, now, lazy, works = json.loads(out)
    assert before & now and after == before and works
    assert len(seen) == 2 and seen[0] & lazy and not seen[0] & now and seen[1] == before


def test_pycurl_package_namespace_is_the_real_ones() -> None:
    # The package _curl_boot builds (one dict merge, __all__ made on first read) against the
    # one pycurl's own __init__ builds, each in a fresh interpreter.
    show = (
        "import json, pycurl\n"
        "ns = vars(pycurl)\n"
        "public = sorted(n for n in ns if not n.startswith('_'))\n"
        "dunders = {n: repr(ns[n]) for n in ('__name__', '__file__', '__path__', '__package__')}\n"
        "lazy = ('AsyncCurlMulti', 'async_multi')\n"
        "same = all(ns[n] is getattr(pycurl._pycurl, n) for n in public if n not in lazy)\n"
        "tuples = {n: [getattr(pycurl, n)._fields, issubclass(getattr(pycurl, n), tuple),\n"
        "              getattr(pycurl, n) is getattr(pycurl._pycurl, n)] for n in TUPLES}\n"
        "print(json.dumps([public, dunders, pycurl.__all__, same, pycurl.__spec__.name,\n"
        "                  pycurl.__doc__, tuples]))\n"
    )
    paths = (
        f"import sys\nsys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        f"TUPLES = {PYCURL_TUPLES!r}\n"
    )
    ours, real = (
        json.loads(
            subprocess.run(
                [sys.executable, "-S", "-c", paths + boot + show],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        for boot in ("import pkcs11ws.client._curl_boot\n", "")
    )
    # pycurl's __init__ has imported async_multi at once; ours on first access, and the
    # namedtuple types the extension makes on first read (the same fields, one type in both
    # modules).
    lazy = ("AsyncCurlMulti", "async_multi", *PYCURL_TUPLES)
    assert [n for n in real[0] if n not in lazy] == ours[0]
    assert ours[1:] == real[1:] and ours[3] is True and len(ours[2]) > 700
    assert all(t[1] and t[2] for t in ours[6].values())


# The tuple types pycurl's init makes with collections.namedtuple (pycurl 7.49).
PYCURL_TUPLES = ("KhKey", "CurlSockAddr", "HstsEntry", "HstsIndex", "WsFrame")


def test_pycurl_tuples_made_on_first_use_are_the_real_namedtuples() -> None:
    # After the light load collections is not imported; the tuple pycurl's C code builds in a
    # callback (OPENSOCKETFUNCTION's address, no connection made) is an instance of the real
    # namedtuple type that pycurl.CurlSockAddr then is, in both modules.
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import pkcs11ws.client._curl_boot\n"
        "import pycurl\n"
        "before = 'collections' in sys.modules\n"
        "import json\n"
        "seen = []\n"
        "c = pycurl.Curl()\n"
        "c.setopt(pycurl.URL, 'http://127.0.0.1:9/')\n"
        "c.setopt(pycurl.OPENSOCKETFUNCTION, lambda p, a: (seen.append(a), pycurl.SOCKET_BAD)[1])\n"
        "try:\n"
        "    c.perform()\n"
        "except pycurl.error:\n"
        "    pass\n"
        "import collections\n"
        "a = seen[0]\n"
        "t = pycurl.CurlSockAddr\n"
        "print(json.dumps([before, type(a) is t, t is pycurl._pycurl.CurlSockAddr,\n"
        "    a._asdict()['family'], list(t._fields), t._make(a) == a, t.__module__,\n"
        "    repr(pycurl.KhKey(b'k', 1)), pycurl.HstsIndex._fields,\n"
        "    type(pycurl.WsFrame).__name__, hasattr(t, '_replace'),\n"
        "    sorted(set(pycurl.__all__) & set(TUPLES)) == sorted(TUPLES)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"TUPLES = {PYCURL_TUPLES!r}\n" + code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert json.loads(out) == [
        False, True, True, 2, ["family", "socktype", "protocol", "addr"], True, "pycurl",
        "KhKey(key=b'k', keytype=1)", ["idx", "total"], "type", True, True,
    ]  # fmt: skip


def test_pycurl_package_matches_the_real_one() -> None:
    import pycurl

    assert "AsyncCurlMulti" in pycurl.__all__
    assert pycurl.AsyncCurlMulti.__name__ == "AsyncCurlMulti"  # imported on first access
    assert pycurl.E_SEND_ERROR == pycurl._pycurl.E_SEND_ERROR


@_lite.dataclass(frozen=True)
class _Frozen:
    a: int
    b: str = "x"
    c: dict[str, int] = _lite.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.c["a"] = self.a


def test_lite_dataclass_frozen_semantics() -> None:
    one = _Frozen(1)
    other: object = (1, "x")
    assert one == _Frozen(1, "x") and one != _Frozen(1, "y") and one != other
    assert hash(one) == hash(_Frozen(1, c={"z": 2}))  # c is not compared
    assert repr(one) == "_Frozen(a=1, b='x')"
    assert one.c == {"a": 1} and _Frozen(2).c is not one.c
    with pytest.raises(AttributeError):
        one.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        _Frozen()  # type: ignore[call-arg]
    moved = _lite.replace(one, b="y")
    assert moved == _Frozen(1, "y") and moved.c == {"a": 1}


def test_lite_dataclass_mutable_and_dataclasses_compat() -> None:
    slot = Slot(1, "card", "name")
    assert slot.present is True and slot == Slot(1, "card", "name", True)
    slot.present = False
    assert slot != Slot(1, "card", "name")
    with pytest.raises(TypeError):
        hash(slot)  # eq without frozen: unhashable, like a dataclass
    cfg = config.Config(
        host="h",
        port=1,
        cert="c",
        key="k",
        auth="a",
        loglevel=0,
        logstdout=False,
        logsys=False,
        logfilepath="",
        maxretries=5,
        retrydelay=1,
        connecttimeout=1,
        timeout=1,
        path="x",
        overrides=(),
        warnings=(),
    )
    quick = dataclasses.replace(cfg, maxretries=0)
    assert quick.maxretries == 0 and dataclasses.replace(quick, maxretries=cfg.maxretries) == cfg
    assert dataclasses.is_dataclass(cfg)
    assert [f.name for f in dataclasses.fields(mechanisms.Mechanism)][:3] == [
        "name",
        "code",
        "flags",
    ]
    struct = protocol.STRUCTS["Error"]
    assert dataclasses.replace(struct).by_name.keys() == {"code", "message"}


def test_lite_dataclass_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A record whose instance dict is written directly shares one __init__ code (no source
    # compiled per class: ~0.4 M instructions each at start-up), yet binds like a real one.
    def no_exec(*_a: object) -> None:
        raise AssertionError("compiled source")

    monkeypatch.setattr(_lite, "exec", no_exec, raising=False)

    @_lite.dataclass(frozen=True)
    class Rec:
        a: int
        b: str = "x"
        c: list[int] = _lite.field(default_factory=list)

        def __post_init__(self) -> None:
            self.c.append(self.a)

    assert str(inspect.signature(Rec)).startswith("(a, b='x', c=")
    one, two = Rec(1), Rec(a=2, b="y")
    assert (one.a, one.b, one.c, two.b, two.c) == (1, "x", [1], "y", [2])
    assert Rec(3, c=[0]).c == [0, 3] and vars(one) == {"a": 1, "b": "x", "c": [1]}
    assert Rec.__init__.__qualname__.endswith("Rec.__init__") and Rec.__init__.__doc__ is None
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'a'"):
        Rec()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'd'"):
        Rec(1, d=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'a'"):
        Rec(1, a=1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="non-default argument 'z' follows default argument"):

        @_lite.dataclass()
        class Bad:
            y: int = 0
            z: int  # type: ignore[misc]


def test_lite_suppress() -> None:
    with _lite.suppress(OSError):
        raise FileNotFoundError
    with pytest.raises(KeyError), _lite.suppress(OSError):
        raise KeyError


class _Kind(_lite.Enum):
    """Two members and a method, like the mechanism table's kinds."""

    FIRST = "first"
    SECOND = "second"

    def shout(self) -> str:
        return self.value.upper()


class _Other(_lite.Enum):
    FIRST = "first"


def test_lite_enum_semantics() -> None:
    import copy
    import pickle

    assert list(_Kind) == [_Kind.FIRST, _Kind.SECOND] and len(_Kind) == 2
    assert _Kind.FIRST.name == "FIRST" and _Kind.FIRST.value == "first"
    assert _Kind("second") is _Kind.SECOND and _Kind.SECOND.shout() == "SECOND"
    assert isinstance(_Kind.FIRST, _Kind) and not isinstance(_Kind.FIRST, _Other)
    assert _Kind.FIRST != _Other.FIRST and _Kind.FIRST != "first"  # type: ignore[comparison-overlap]
    assert {_Kind.FIRST: 1, _Other.FIRST: 2}[_Other.FIRST] == 2
    assert repr(_Kind.FIRST) == "<_Kind.FIRST: 'first'>" and str(_Kind.SECOND) == "_Kind.SECOND"
    assert copy.deepcopy(_Kind.FIRST) is _Kind.FIRST
    assert pickle.loads(pickle.dumps(_Kind.SECOND)) is _Kind.SECOND
    with pytest.raises(ValueError):
        _Kind("third")
    with pytest.raises(AttributeError):
        _Kind.FIRST = _Kind.SECOND  # type: ignore[misc, assignment]
    with pytest.raises(AttributeError):
        _Kind.FIRST.value = "x"  # type: ignore[misc]
    # The mechanism table's kinds: every row's kinds are members the core can number.
    numbers = mechanisms.kind_numbers()
    assert all(numbers[m.param] >= 0 and numbers[m.family] >= 0 for m in mechanisms.MECHANISMS)


def test_lite_dataclass_keeps_a_custom_setattr() -> None:
    # Records set their fields in one update of the instance dict, except a class with its own
    # __setattr__, which sees every field set.
    seen: list[str] = []

    @_lite.dataclass()
    class Watched:
        a: int
        b: str = "x"

        def __setattr__(self, key: str, value: object) -> None:
            seen.append(key)
            object.__setattr__(self, key, value)

    assert Watched(1) == Watched(1, "x") and seen == ["a", "b", "a", "b"]
    assert vars(_Frozen(3)) == {"a": 3, "b": "x", "c": {"a": 3}}


def test_lazy_module_takes_its_place_on_first_use() -> None:
    # The provider's templates and params: imported by the first call that reads them, and
    # from then on the module itself in the namespace (no proxy left in between).
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "from pkcs11ws import provider\n"
        "before = [m in sys.modules for m in ('pkcs11ws.templates', 'pkcs11ws.params')]\n"
        "lazy = type(provider.templates).__name__\n"
        "fn = provider.templates.decode_search\n"
        "real = provider.templates is sys.modules['pkcs11ws.templates']\n"
        "print(before, lazy, real, fn is sys.modules['pkcs11ws.templates'].decode_search,\n"
        "      'pkcs11ws.params' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "[False, False] LazyModule True True False"
    namespace: dict[str, object] = {}
    namespace["m"] = _lite.LazyModule("pkcs11ws.no_such_module", namespace, "m")
    with pytest.raises(ImportError):
        getattr(namespace["m"], "anything")  # noqa: B009
    assert type(namespace["m"]) is _lite.LazyModule  # a failed import leaves the stand-in


def test_lite_cached_property_on_a_frozen_record() -> None:
    calls: list[int] = []

    @_lite.dataclass(frozen=True)
    class Row:
        a: int

        @_lite.cached_property
        def double(self) -> int:
            """Twice a."""
            calls.append(self.a)
            return self.a * 2

    r = Row(4)
    assert r.double == 8 and r.double == 8 and calls == [4]  # computed once, then kept
    assert vars(r)["double"] == 8 and Row(4) == r  # in the instance dict, not a field
    descriptor = vars(Row)["double"]
    assert Row.__dict__["double"].__doc__ == "Twice a." and Row.double is descriptor


def test_lite_flag_set_once_wakes_every_waiter() -> None:
    import threading  # the test may; the module's start-up does not (test_startup_listing)

    flag = _lite.Flag()
    assert not flag.is_set() and flag.wait(0) is False and flag.wait(0.01) is False
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(flag.wait(60))) for _ in range(4)]
    for t in waiters:
        t.start()
    setters = [threading.Thread(target=flag.set) for _ in range(4)]  # racing set()s
    for t in setters:
        t.start()
    for t in waiters + setters:
        t.join(60)
    assert woke == [True] * 4 and flag.is_set()
    assert flag.wait(0) and flag.wait(None) and flag.wait(-1)  # stays set, never blocks again
    flag.set()
    assert flag.wait(0)


def test_lite_weakset_holds_only_live_objects() -> None:
    class Obj:
        pass

    s: _lite.WeakSet[Obj] = _lite.WeakSet()
    a, b = Obj(), Obj()
    s.add(a)
    s.add(b)
    s.add(a)  # once only
    assert len(s) == 2 and a in s and b in s and Obj() not in s
    assert set(map(id, s)) == {id(a), id(b)}
    s.discard(b)
    s.discard(b)  # absent: nothing happens
    assert list(s) == [a] and b not in s
    s.add(b)
    del a  # the set does not keep it alive: gone from the set as soon as it dies
    assert list(s) == [b] and len(s) == 1
    for obj in s:  # an object dying while the set is walked is only skipped
        s.add(Obj())  # dies at once (no other reference)
        assert obj is b
    assert list(s) == [b]


def test_request_ids_count_from_one_per_process_prefix() -> None:
    # The counter is a range iterator (no itertools at start-up): 1, 2, 3... after each reset,
    # in the header and in the body field alike, one shared sequence.
    from pkcs11ws import protocol
    from pkcs11ws.client.request_ids import RequestIds, request_id

    ids = RequestIds()
    first, second = ids.header(), ids.header()
    prefix = first.rsplit("-", 1)[0]
    assert first.startswith(f"{protocol.REQUEST_ID_HEADER}: ") and first.endswith("-1")
    assert second == prefix + "-2"
    body = b'%s%d",%s' % (ids.field, next(ids.count), b'"key":"k"}')
    assert request_id([], body) == prefix.split(": ")[1] + "-3"
    assert request_id([ids.header()], None) == prefix.split(": ")[1] + "-4"
    ids.reset()
    again = ids.header()
    assert again.endswith("-1") and again.rsplit("-", 1)[0] != prefix
