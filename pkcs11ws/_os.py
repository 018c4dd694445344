"""The part of ``os`` the PKCS#11 module's start-up uses, without importing ``os``.

``import os`` costs every process that loads the module ~5.4 M instructions (of ~110 M for
``pkcs11-tool -L``): ``os`` builds ``os.environ`` and its ``path`` module, and imports
``_collections_abc``, ~25 abstract classes, for ``os.environ``'s base class. The functions the
start-up path calls are ``posix``'s own (``os`` re-exports them: the same objects); what ``os``
adds on top and the module needs is here: ``fsdecode``, ``environ`` (read-only) and ``path``
(``join``, ``dirname``, ``basename``, ``normpath``, ``abspath``, ``exists``, ``isfile``,
``isdir``, ``expanduser``) with ``posixpath``'s results for ``str`` paths. Modules on that path
import it as ``from pkcs11ws import _os as os``; tests/unit/test_startup_imports.py keeps
``os`` out of the start-up and checks these against ``os`` and ``posixpath``.
"""

from __future__ import annotations

import sys
from posix import (
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_WRONLY,
    R_OK,
    RTLD_LAZY,
    RTLD_NOW,
    access,
    close,
    dup,
    fork,
    fspath,
    getcwd,
    getpid,
    open,
    register_at_fork,
    stat,
    stat_result,
    urandom,
    write,
)
from posix import environ as _posix_environ

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView

    _EnvironBase = Mapping[str, str]
else:
    _EnvironBase = object

__all__ = [
    "O_APPEND",
    "O_CLOEXEC",
    "O_CREAT",
    "O_WRONLY",
    "RTLD_LAZY",
    "RTLD_NOW",
    "R_OK",
    "access",
    "close",
    "dup",
    "environ",
    "fork",
    "fsdecode",
    "getcwd",
    "getpid",
    "open",
    "path",
    "register_at_fork",
    "stat",
    "stat_result",
    "urandom",
    "write",
]


# Fixed once the interpreter runs (os.fsdecode keeps them the same way).
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def fsdecode(filename: str | bytes) -> str:
    """``os.fsdecode``: bytes in the filesystem encoding (surrogateescape) to str."""
    name = fspath(filename)
    if isinstance(name, bytes):
        return name.decode(_FS_ENCODING, _FS_ERRORS)
    return name


_snapshot: dict[str, str] = {}


def _current() -> Mapping[str, str]:
    """The process environment as ``os.environ`` holds it: that mapping itself once ``os`` is
    imported (a host may have changed it since), else the interpreter's start-up copy that
    ``os.environ`` would have been made from (``posix.environ``), decoded once."""
    real = sys.modules.get("os")
    if real is not None:
        live: Mapping[str, str] = real.environ
        return live
    if not _snapshot and _posix_environ:
        _snapshot.update((fsdecode(k), fsdecode(v)) for k, v in _posix_environ.items())
    return _snapshot


class _Environ(_EnvironBase):
    """Read-only ``os.environ`` (the Mapping methods the package calls)."""

    __slots__ = ()

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return _current().get(key, default)

    def __getitem__(self, key: str) -> str:
        return _current()[key]

    def __contains__(self, key: object) -> bool:
        return key in _current()

    def __iter__(self) -> Iterator[str]:
        return iter(_current())

    def __len__(self) -> int:
        return len(_current())

    def keys(self) -> KeysView[str]:
        return _current().keys()

    def items(self) -> ItemsView[str, str]:
        return _current().items()

    def values(self) -> ValuesView[str]:
        return _current().values()


environ = _Environ()

_S_IFMT = 0o170000


class path:
    """``posixpath``'s functions the start-up calls, for ``str`` paths."""

    @staticmethod
    def join(a: str, *p: str) -> str:
        out = a
        for b in p:
            if b.startswith("/"):
                out = b
            elif not out or out.endswith("/"):
                out += b
            else:
                out += "/" + b
        return out

    @staticmethod
    def dirname(p: str) -> str:
        i = p.rfind("/") + 1
        head = p[:i]
        if head and head != "/" * len(head):
            head = head.rstrip("/")
        return head

    @staticmethod
    def basename(p: str) -> str:
        return p[p.rfind("/") + 1 :]

    @staticmethod
    def normpath(p: str) -> str:
        if not p:
            return "."
        initial = 0
        if p.startswith("/"):
            # POSIX allows one implementation-defined meaning for exactly two leading slashes
            initial = 2 if p.startswith("//") and not p.startswith("///") else 1
        comps: list[str] = []
        for comp in p.split("/"):
            if comp in ("", "."):
                continue
            if comp != ".." or (not initial and not comps) or (comps and comps[-1] == ".."):
                comps.append(comp)
            elif comps:
                comps.pop()
        out = "/" * initial + "/".join(comps)
        return out or "."

    @staticmethod
    def abspath(p: str) -> str:
        if not p.startswith("/"):
            p = path.join(getcwd(), p)
        return path.normpath(p)

    @staticmethod
    def expanduser(p: str) -> str:
        if not p.startswith("~"):
            return p
        import posixpath  # a "~" path in the configuration: rare, and os costs only then

        return posixpath.expanduser(p)

    @staticmethod
    def _mode(p: str) -> int | None:
        try:
            return stat(p).st_mode
        except (OSError, ValueError):
            return None

    @staticmethod
    def exists(p: str) -> bool:
        return path._mode(p) is not None

    @staticmethod
    def isfile(p: str) -> bool:
        mode = path._mode(p)
        return mode is not None and mode & _S_IFMT == 0o100000

    @staticmethod
    def isdir(p: str) -> bool:
        mode = path._mode(p)
        return mode is not None and mode & _S_IFMT == 0o040000
