"""Import pycurl without its asyncio helper, so loading the PKCS#11 module stays light.

pycurl's package ``__init__`` is three lines: import the ``_pycurl`` extension, re-export its
public names, and import ``pycurl.async_multi`` for ``AsyncCurlMulti``. That last import pulls
in ``dataclasses`` (and so ``inspect``, ``ast``, ``dis``) and ``typing``: ~11 ms and ~2.5 MB in
every process that loads libpkcs11ws.so, for a class the module never uses. When pycurl is not
imported yet, this builds the same package module (same names, same ``__all__``) with
``AsyncCurlMulti`` imported on first access instead. If pycurl is already imported, or its
layout is not the one described above, it does nothing and ``import pycurl`` runs as usual.

pycurl's extension also imports ``datetime`` in its init, for the C API capsule of the
datetime types (HSTS entries): the pure-Python ``datetime.py`` costs ~5 M instructions only to be
replaced by ``_datetime``'s classes at its end. While the extension loads, ``sys.modules``
lends it ``_datetime`` under that name (the same capsule and the same classes); a later
``import datetime`` anywhere imports the real module as usual.

Its init also imports ``collections`` (~7 M instructions of ``pkcs11-tool -L``, with
``keyword``, ``operator`` and ``reprlib``) for ``namedtuple``, and makes five tuple types with
it (~2 M more: each compiles its ``__new__``): ``KhKey``, ``CurlSockAddr``, ``HstsEntry``,
``HstsIndex`` and ``WsFrame``, built only in callbacks the module never sets. While the
extension loads, ``sys.modules`` lends it a ``collections`` whose ``namedtuple`` hands back a
``_LazyTuple`` holding the name and fields; the first call of one, or the first read of
``pycurl.KhKey`` (or ``pycurl._pycurl.KhKey``), makes the real ``collections.namedtuple`` type
and puts it in both modules' namespaces, so every instance pycurl builds is of that one type
and what a host reads is the real class. When ``collections`` is already imported, pycurl gets
it as usual.

Before loading pycurl it refuses the PyPI wheel (design.md section 3): auditwheel puts the
libcurl and OpenSSL that wheel bundles in a ``pycurl.libs`` folder beside the package, and once
those are loaded inside a C host (pkcs11-tool) the damage is done, so the check looks at the
files (one stat) instead of importing first. pkcs11ws.client.transport checks the loaded
library again after the import.
"""

from __future__ import annotations

import sys

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Any


# The tuple types pycurl's init asked the lent namedtuple for: name -> its field names.
_LAZY_TUPLES: dict[str, object] = {}


def _tuple_type(name: str) -> type:
    """The real namedtuple type for pycurl's `name`, made once, in both modules' namespaces."""
    ext, pkg = sys.modules["pycurl._pycurl"], sys.modules["pycurl"]
    made = vars(ext).get(name)
    if isinstance(made, type):
        return made
    cls: type = _real_collections().namedtuple(name, _LAZY_TUPLES[name], module="pycurl")
    cls = vars(ext).setdefault(name, cls)  # two first calls at once: one type wins
    setattr(pkg, name, cls)
    return cls


class _LazyTuple:
    """What the lent namedtuple returns to pycurl's init: calling it (pycurl's callbacks build
    their tuples so) makes the real type on first use and returns that type's instance."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: object, **kwargs: object) -> object:
        return _tuple_type(self.name)(*args, **kwargs)


def _lent_namedtuple(typename: str, field_names: object, **kwargs: object) -> object:
    if kwargs:  # not pycurl's way (two positional arguments): the real function, now
        real: Any = _real_collections().namedtuple
        return real(typename, field_names, **kwargs)
    _LAZY_TUPLES[typename] = field_names
    return _LazyTuple(typename)


def _real_collections() -> Any:
    """The real collections module, imported now (the lent one leaves sys.modules first)."""
    if sys.modules.get("collections") is _LENT_COLLECTIONS:
        del sys.modules["collections"]
    import collections

    return collections


def _lent_collections_getattr(name: str) -> object:
    """Anything else the extension would read from the lent collections: the real module's."""
    return getattr(_real_collections(), name)


_LENT_COLLECTIONS = type(sys)("collections")
_LENT_COLLECTIONS.namedtuple = _lent_namedtuple  # type: ignore[attr-defined]
_LENT_COLLECTIONS.__getattr__ = _lent_collections_getattr  # type: ignore[method-assign]


def _ext_getattr(name: str) -> object:
    """`pycurl._pycurl`'s module __getattr__: its namedtuple types, made on first read."""
    if name in _LAZY_TUPLES:
        return _tuple_type(name)
    raise AttributeError(f"module 'pycurl._pycurl' has no attribute {name!r}")


def _module_getattr(name: str) -> object:
    if name in _LAZY_TUPLES:
        return _tuple_type(name)
    if name == "__all__":  # as pycurl's __init__ makes it, on first use (from pycurl import *)
        pkg = sys.modules["pycurl"]
        ext = sys.modules["pycurl._pycurl"]
        names = sorted({n for n in dir(ext) if not n.startswith("_")} | _LAZY_TUPLES.keys())
        names.append("AsyncCurlMulti")
        pkg.__all__ = names  # type: ignore[attr-defined]
        return names
    if name == "AsyncCurlMulti":
        import importlib

        cls: object = importlib.import_module("pycurl.async_multi").AsyncCurlMulti
        setattr(sys.modules["pycurl"], name, cls)
        return cls
    raise AttributeError(f"module 'pycurl' has no attribute {name!r}")


def pycurl_fix() -> str:
    """The exact command that replaces pycurl with a build on the system libcurl."""
    return (
        f"fix: {sys.executable} -m pip install --force-reinstall --no-deps --no-binary pycurl "
        "pycurl (needs gcc and the Debian packages libcurl4-openssl-dev and libssl-dev)"
    )


def check_not_wheel(package_dir: str) -> None:
    """InstallationError when the pycurl package in package_dir is the PyPI wheel."""
    site = os.path.dirname(package_dir.rstrip("/"))
    libs = os.path.join(site, "pycurl.libs")
    if os.path.isdir(libs):
        from pkcs11ws.errors import InstallationError

        raise InstallationError(
            f"pycurl in {site} is the PyPI wheel, whose own libcurl and OpenSSL ({libs}) crash "
            f"inside PKCS#11 hosts; {pycurl_fix()}"
        )


def _load_extension() -> None:
    """`from pycurl import _pycurl`, with ``_datetime`` standing in for ``datetime`` and the
    lazy namedtuple's module for ``collections``."""
    lent = "datetime" not in sys.modules
    if lent:
        try:
            import _datetime  # type: ignore[import-not-found]  # no stub: the C accelerator
        except ImportError:  # a Python without the C accelerator: pycurl imports datetime.py
            lent = False
        else:
            sys.modules["datetime"] = _datetime
    lent_collections = "collections" not in sys.modules
    if lent_collections:
        sys.modules["collections"] = _LENT_COLLECTIONS
    # Lazy binding for libcurl's ~30 libraries: the ones built without BIND_NOW (libldap,
    # libgssapi, libnghttp2...) then bind a function at its first call instead of all ~2,100
    # of their PLT slots while the module loads (pkcs11-tool -L calls few of them). Python
    # opens extensions RTLD_NOW; the flag is this interpreter's and is put back at once.
    flags = sys.getdlopenflags()
    sys.setdlopenflags((flags & ~os.RTLD_NOW) | os.RTLD_LAZY)
    try:
        from pycurl import _pycurl  # noqa: F401
    finally:
        sys.setdlopenflags(flags)
        if lent and sys.modules.get("datetime") is sys.modules.get("_datetime"):
            del sys.modules["datetime"]
        if lent_collections and sys.modules.get("collections") is _LENT_COLLECTIONS:
            del sys.modules["collections"]
    # The lazy types leave the extension's namespace: its __getattr__ makes them on first read.
    ext = vars(sys.modules["pycurl._pycurl"])
    for name in _LAZY_TUPLES:
        if isinstance(ext.get(name), _LazyTuple):
            del ext[name]
    ext["__getattr__"] = _ext_getattr


def _boot() -> None:
    if "pycurl" in sys.modules:
        return
    # importlib.machinery's PathFinder, without importing importlib (and warnings) for it.
    from _frozen_importlib_external import PathFinder

    spec = PathFinder.find_spec("pycurl")
    if spec is None or not spec.submodule_search_locations:
        return  # not a package here: let `import pycurl` report it
    check_not_wheel(next(iter(spec.submodule_search_locations)))
    # What importlib.util.module_from_spec sets on a package from a file location.
    pkg = type(sys)(spec.name)
    pkg.__spec__ = spec
    pkg.__loader__ = spec.loader
    pkg.__package__ = spec.name
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__cached__ = spec.cached  # type: ignore[attr-defined]
    sys.modules["pycurl"] = pkg
    try:
        _load_extension()
    except BaseException:
        del sys.modules["pycurl"]
        raise
    # The extension's ~770 public names in one dict merge (no Python loop over them): its only
    # other names are its module dunders, and the package's own are put back over them.
    # __all__ (a sorted list, as `dir()` gives) is made by the first reader.
    namespace = vars(pkg)
    own = dict(namespace)
    namespace.update(vars(sys.modules["pycurl._pycurl"]))
    namespace.update(own)
    pkg.__getattr__ = _module_getattr  # type: ignore[method-assign]


_boot()
