"""Light stand-ins for the standard library helpers on the PKCS#11 module's import path.

Every process that loads libpkcs11ws.so imports the provider; these keep heavy modules out of
that start-up: ``dataclasses`` pulls in ``inspect`` (and with it ``ast``, ``dis``,
``tokenize``), ``contextlib`` is imported for ``suppress`` alone. tests/unit/test_startup_imports.py
keeps them out; what they cost is measured by the benchmark, not written here.

``Enum``: the mechanism table's five kinds of value. Making an ``enum.Enum`` class costs
~1 M instructions in Python 3.11 (its metaclass does a great deal per member); this one has
what the package uses (members with ``name`` and ``value``, iteration in definition order,
``len``, lookup by value, identity comparison, hashing, copy and pickle giving the member back)
and type checkers see ``enum.Enum`` itself.

``dataclass``/``field``/``replace``: the classes on that path only need the generated
``__init__`` (with defaults and ``default_factory``), ``__post_init__``, ``__repr__``,
``__eq__``, ``__hash__`` for frozen classes, and frozen attribute setting. It is the one way
records are declared in the package (``from pkcs11ws._lite import dataclass``, server side too);
``dataclass_transform`` tells type checkers it behaves like the real one, so signatures stay
checked. ``dataclasses.replace()``/``fields()``/``is_dataclass()`` keep working
on these classes: the ``__dataclass_fields__`` they read is built on first use, from a real
dataclass made with the same fields, so only the callers that use them import ``dataclasses``.

``cached_property`` and ``Flag`` (a ``threading.Event`` that is set once, never cleared): with
``_thread``'s locks they keep ``threading`` and ``functools`` (~4 M instructions together, with
``functools``' own imports) out of start-up; ``threading`` is imported by the first caller that
starts a thread. ``WeakSet`` (add, discard, ``in``, iteration, ``len``) keeps ``_weakrefset``
and the ``types`` module it imports out too.

``LazyModule``: one of the package's modules that only some calls need (object templates,
mechanism parameters), imported when first used instead of at start-up.
"""

from __future__ import annotations

import _weakref

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from enum import Enum as Enum
    from functools import cached_property as cached_property
    from typing import Any, TypeVar, dataclass_transform
    from weakref import WeakSet as WeakSet
else:

    def dataclass_transform(**_kw: object) -> object:  # type checkers only
        return lambda fn: fn

    def TypeVar(name: str) -> None:
        return None


_MISSING = object()
_PLAIN_SETATTR: object = object.__setattr__
_R = TypeVar("_R")


class _FieldSpec:
    __slots__ = ("compare", "default", "default_factory", "repr")

    def __init__(self, default: object, default_factory: object, compare: bool, repr: bool):
        self.default = default
        self.default_factory = default_factory
        self.compare = compare
        self.repr = repr


def field(
    *,
    default: object = _MISSING,
    default_factory: object = _MISSING,
    compare: bool = True,
    repr: bool = True,
) -> Any:
    """The subset of ``dataclasses.field`` the module-path classes use."""
    return _FieldSpec(default, default_factory, compare, repr)


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record (like ``dataclasses.FrozenInstanceError``)."""


class _LazyFields:
    """``__dataclass_fields__`` computed on first access from a real dataclass twin."""

    def __init__(self, specs: dict[str, _FieldSpec | None], frozen: bool):
        self.specs = specs
        self.frozen = frozen

    def __get__(self, obj: object, owner: type) -> object:
        import dataclasses

        ns: dict[str, object] = {"__annotations__": {n: object for n in self.specs}}
        for name, spec in self.specs.items():
            if spec is None:
                continue
            kw: dict[str, object] = {"compare": spec.compare, "repr": spec.repr}
            if spec.default is not _MISSING:
                kw["default"] = spec.default
            if spec.default_factory is not _MISSING:
                kw["default_factory"] = spec.default_factory
            ns[name] = dataclasses.field(**kw)  # type: ignore[call-overload]
        twin: type = dataclasses.dataclass(frozen=self.frozen)(type(owner.__name__, (), ns))
        fields = twin.__dataclass_fields__  # type: ignore[attr-defined]
        type.__setattr__(owner, "__dataclass_fields__", fields)
        return fields


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _fill(self: object, values: dict[str, object]) -> None:
    """Stands for each record's own filler (_shared_init) in _record_init's globals."""
    raise AssertionError("a record's __init__ runs with its own _fill")


# The code of a record's __init__ (_shared_init): its parameters become the fields. (No
# docstring: a function made from this code would take it as its own __doc__.)
def _record_init(self: object) -> None:
    _fill(self, locals())


def _shared_init(cls: type, names: list[str], specs: dict[str, _FieldSpec | None]) -> object:
    """``__init__(self, <fields>)`` for a record whose instance dict may be written directly:
    _record_init's code with the fields as its parameters (CPython binds the arguments,
    positional or by keyword, and the defaults) and a filler that puts them in the dict."""
    defaults: list[object] = []
    factories: list[tuple[str, Callable[[], object]]] = []
    for name in names:
        spec = specs[name]
        if spec is None:
            if defaults:  # as the compiler would refuse the signature
                raise TypeError(f"non-default argument {name!r} follows default argument")
        elif spec.default_factory is not _MISSING:
            factories.append((name, spec.default_factory))  # type: ignore[arg-type]
            defaults.append(_MISSING)
        else:
            defaults.append(spec.default)
    made = tuple(factories)
    post_init = hasattr(cls, "__post_init__")

    def fill(self: Any, values: dict[str, object]) -> None:
        del values["self"]
        for name, make in made:
            if values[name] is _MISSING:
                values[name] = make()
        self.__dict__.update(values)
        if post_init:
            self.__post_init__()

    code = _record_init.__code__.replace(
        co_argcount=1 + len(names),
        co_nlocals=1 + len(names),
        co_varnames=("self", *names),
        co_name="__init__",
        co_qualname=f"{cls.__qualname__}.__init__",
    )
    glob = {"__builtins__": __builtins__, "_fill": fill}
    function: Any = type(_record_init)
    return function(code, glob, "__init__", tuple(defaults) or None)


def _compiled_init(
    cls: type, names: list[str], specs: dict[str, _FieldSpec | None], frozen: bool
) -> object:
    """``__init__`` from generated source, for a record with __slots__ or its own
    __setattr__ (its fields are set one by one, as a dataclass sets them)."""
    glob: dict[str, object] = {"_MISSING": _MISSING, "_set": object.__setattr__}
    params: list[str] = []
    inits: list[str] = []
    for name in names:
        spec = specs[name]
        if spec is not None and spec.default_factory is not _MISSING:
            glob[f"_f_{name}"] = spec.default_factory
            params.append(f"{name}=_MISSING")
            inits.append(f"_f_{name}() if {name} is _MISSING else {name}")
        elif spec is not None:
            glob[f"_d_{name}"] = spec.default
            params.append(f"{name}=_d_{name}")
            inits.append(name)
        else:
            params.append(name)
            inits.append(name)
    if not names:
        body = []
    elif frozen:
        body = [f"  _set(self, {n!r}, {i})" for n, i in zip(names, inits, strict=True)]
    else:
        body = [f"  self.{n} = {i}" for n, i in zip(names, inits, strict=True)]
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    src = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["  pass"])
    exec(src, glob)
    return glob["__init__"]


@dataclass_transform(field_specifiers=(field,))
def dataclass(*, frozen: bool = False) -> Callable[[type], type]:
    """Decorate a class like ``@dataclass(frozen=...)`` (eq=True, no ordering)."""

    def wrap(cls: type) -> type:
        # inspect.get_annotations would import inspect, the very thing this module avoids
        annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
        # A ClassVar is no field (as in dataclasses); annotations are strings here.
        names = [n for n, a in annotations.items() if not str(a).startswith("ClassVar")]
        specs: dict[str, _FieldSpec | None] = {}
        own = cls.__dict__
        for name in names:
            value = own.get(name, _MISSING)
            if value is _MISSING:
                specs[name] = None
            elif isinstance(value, _FieldSpec):
                specs[name] = value
                if value.default is _MISSING:
                    type.__delattr__(cls, name)
                else:
                    type.__setattr__(cls, name, value.default)
            else:  # a plain default: the class attribute already holds it
                specs[name] = _FieldSpec(value, _MISSING, True, True)
        if (
            names
            and not hasattr(cls, "__slots__")
            and (frozen or cls.__setattr__ is _PLAIN_SETATTR)
        ):
            # Compiling generated source was most of what a record class cost at import (~0.4 M
            # instructions each): these records share _record_init's code instead.
            init_fn: Any = _shared_init(cls, names, specs)
        else:
            init_fn = _compiled_init(cls, names, specs, frozen)
        init_fn.__qualname__ = f"{cls.__qualname__}.__init__"
        shown = [n for n in names if specs[n] is None or specs[n].repr]  # type: ignore[union-attr]
        compared = tuple(n for n in names if specs[n] is None or specs[n].compare)  # type: ignore[union-attr]

        def __repr__(self: object) -> str:
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in shown)
            return f"{type(self).__qualname__}({inner})"

        def __eq__(self: object, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return tuple(getattr(self, n) for n in compared) == tuple(
                getattr(other, n) for n in compared
            )

        def __hash__(self: object) -> int:
            return hash(tuple(getattr(self, n) for n in compared))

        type.__setattr__(cls, "__init__", init_fn)
        type.__setattr__(cls, "__repr__", __repr__)
        type.__setattr__(cls, "__eq__", __eq__)
        type.__setattr__(cls, "__hash__", __hash__ if frozen else None)
        if frozen:
            type.__setattr__(cls, "__setattr__", _frozen_setattr)
            type.__setattr__(cls, "__delattr__", _frozen_delattr)
        type.__setattr__(cls, "__match_args__", tuple(names))
        type.__setattr__(cls, "__dataclass_fields__", _LazyFields(specs, frozen))
        return cls

    return wrap


def replace(obj: _R, /, **changes: object) -> _R:
    """``dataclasses.replace`` for records (no ``InitVar``/``init=False`` fields here)."""
    for name in type(obj).__match_args__:  # type: ignore[attr-defined]
        if name not in changes:
            changes[name] = getattr(obj, name)
    return type(obj)(**changes)


class LazyModule:
    """Stands for the module `name` in a namespace (a module's globals) until an attribute is
    first read: then imports it and puts the module itself in its place, so later reads are
    plain global lookups. Type checkers see the module (import it under TYPE_CHECKING)."""

    __slots__ = ("_key", "_name", "_namespace")

    def __init__(self, name: str, namespace: dict[str, object], key: str) -> None:
        self._name = name
        self._namespace = namespace
        self._key = key

    def __getattr__(self, attr: str) -> object:
        import sys

        __import__(self._name)
        module = sys.modules[self._name]
        self._namespace[self._key] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<LazyModule {self._name!r}>"


if not TYPE_CHECKING:

    class cached_property:
        """``functools.cached_property``: computed on first read, then kept in the instance's
        ``__dict__`` (written directly, so frozen records can have one too), where later reads
        find it before this non-data descriptor."""

        def __init__(self, func):
            self.func = func
            self.attrname = None
            self.__doc__ = func.__doc__

        def __set_name__(self, owner, name):
            self.attrname = name

        def __get__(self, instance, owner=None):
            if instance is None:
                return self
            value = self.func(instance)
            instance.__dict__[self.attrname] = value
            return value


class Flag:
    """A ``threading.Event`` that is never cleared: ``set()`` once (again is a no-op),
    ``wait(timeout)`` returns whether it is set, ``is_set()``. Built on one ``_thread`` lock,
    held while the flag is down; a waiter that gets it gives it back at once. (A second
    set() racing the first may release it under a waiter: whoever releases second is told
    the lock is free already, and it ends free either way.)"""

    __slots__ = ("_down", "_up")

    def __init__(self) -> None:
        import _thread

        self._up = False
        self._down = _thread.allocate_lock()
        self._down.acquire()

    def set(self) -> None:
        if not self._up:
            self._up = True
            with suppress(RuntimeError):  # another thread's set() released it first
                self._down.release()

    def is_set(self) -> bool:
        return self._up

    def wait(self, timeout: float | None = None) -> bool:
        if self._up:
            return True
        if self._down.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            with suppress(RuntimeError):  # a second set() released it under this waiter
                self._down.release()
        return self._up


if not TYPE_CHECKING:

    class WeakSet:
        """``weakref.WeakSet``'s add, discard, ``in``, iteration and ``len``: a dict of weak
        references by id(), each removing itself when its object dies (CPython calls it before
        the id can be reused). Iteration walks a snapshot and skips the dead."""

        __slots__ = ("__weakref__", "_refs")

        def __init__(self):
            self._refs = {}

        def add(self, obj):
            key = id(obj)
            if key not in self._refs:
                refs = self._refs

                def gone(_ref, key=key, refs=refs):
                    if refs.get(key) is _ref:
                        del refs[key]

                self._refs[key] = _weakref.ref(obj, gone)

        def discard(self, obj):
            ref = self._refs.get(id(obj))
            if ref is not None and ref() is obj:
                del self._refs[id(obj)]

        def __contains__(self, obj):
            ref = self._refs.get(id(obj))
            return ref is not None and ref() is obj

        def __iter__(self):
            for ref in list(self._refs.values()):
                obj = ref()
                if obj is not None:
                    yield obj

        def __len__(self):
            return sum(1 for ref in list(self._refs.values()) if ref() is not None)


class suppress:
    """``contextlib.suppress``: ignore the given exceptions raised in the ``with`` body."""

    __slots__ = ("_kinds",)

    def __init__(self, *kinds: type[BaseException]) -> None:
        self._kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> bool:
        return kind is not None and issubclass(kind, self._kinds)


if not TYPE_CHECKING:

    class _EnumType(type):
        """The members of an Enum subclass: each plain class attribute (not a dunder, not
        a function or descriptor) becomes an instance with that name and value."""

        def __new__(mcls, name, bases, ns):
            cls = super().__new__(mcls, name, bases, dict(ns))
            members = []
            for key, value in ns.items():
                if key[:1] == "_" or hasattr(value, "__get__"):
                    continue
                member = object.__new__(cls)
                object.__setattr__(member, "_name_", key)
                object.__setattr__(member, "_value_", value)
                type.__setattr__(cls, key, member)
                members.append(member)
            if bases and members:
                type.__setattr__(cls, "_members_", tuple(members))
                type.__setattr__(cls, "_by_value_", {m._value_: m for m in members})
            return cls

        def __iter__(cls):
            return iter(cls._members_)

        def __len__(cls):
            return len(cls._members_)

        def __call__(cls, value):
            try:
                return cls._by_value_[value]
            except (KeyError, TypeError):
                raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

        def __setattr__(cls, key, value):
            raise AttributeError(f"cannot reassign members of {cls.__qualname__}")

    class Enum(metaclass=_EnumType):
        """The subset of ``enum.Enum`` the package uses (see the module docstring)."""

        __slots__ = ("_name_", "_value_")
        _members_ = ()

        @property
        def name(self):
            return self._name_

        @property
        def value(self):
            return self._value_

        def __setattr__(self, key, value):
            raise AttributeError(f"cannot set {key!r} on {self!r}")

        def __repr__(self):
            return f"<{type(self).__qualname__}.{self._name_}: {self._value_!r}>"

        def __str__(self):
            return f"{type(self).__qualname__}.{self._name_}"

        def __reduce__(self):
            return type(self), (self._value_,)

        def __copy__(self):
            return self

        def __deepcopy__(self, memo):
            return self
