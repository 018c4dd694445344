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

Before loading pycurl it refuses the PyPI wheel (design.md section 3): auditwheel puts the
libcurl and OpenSSL that wheel bundles in a ``pycurl.libs`` folder beside the package, and once
those are loaded inside a C host (pkcs11-tool) the damage is done, so the check looks at the
files (one stat) instead of importing first. pkcs11ws.client.transport checks the loaded
library again after the import.
"""

from __future__ import annotations

import os
import sys


def _module_getattr(name: str) -> object:
    if name == "__all__":  # as pycurl's __init__ makes it, on first use (from pycurl import *)
        pkg = sys.modules["pycurl"]
        names = [n for n in dir(sys.modules["pycurl._pycurl"]) if not n.startswith("_")]
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
    """`from pycurl import _pycurl`, with ``_datetime`` standing in for ``datetime``."""
    lent = "datetime" not in sys.modules
    if lent:
        try:
            import _datetime  # type: ignore[import-not-found]  # no stub: the C accelerator
        except ImportError:  # a Python without the C accelerator: pycurl imports datetime.py
            lent = False
        else:
            sys.modules["datetime"] = _datetime
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
