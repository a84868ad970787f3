"""Which globals a checkpoint may name: the default table, what callers add, and what can
never be allowed. Nothing here imports a module named by a file.

Each allowed ``module.name`` maps to an ``Entry`` (entries.py) whose ``call`` / ``new``
build placeholders or plain data after checking their arguments; the tables live by
domain: torch_globals.py, stdlib_globals.py, numpy_globals.py. Callers extend the list
with ``allow=``: a class object (real instances are built, as
``torch.serialization.add_safe_globals`` does) or a ``"module.Name"`` string (inert
``PickledObject`` records; nothing imported).
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable, Iterable
from typing import Any

from torchkeep.errors import UnsafeCheckpointError
from torchkeep.tree import PickledObject, TensorRef
from torchkeep.unpickle.entries import (
    Call,
    Entry,
    Machine,
    Pending,
    attribute_state,
    object_state,
)
from torchkeep.unpickle.numpy_globals import finish as finish_numpy
from torchkeep.unpickle.numpy_globals import numpy_table
from torchkeep.unpickle.stdlib_globals import stdlib_table
from torchkeep.unpickle.torch_globals import torch_table

__all__ = [
    "NEVER_ALLOWED",
    "AllowSpec",
    "Allowlist",
    "build",
    "canonical",
    "dangerous",
    "unsafe_global",
]


#: Modules (and their sub-modules) no allow= entry can ever open: they run code,
#: touch the system, or turn data into calls.
NEVER_ALLOWED = frozenset(
    {
        "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "importlib",
        "runpy", "code", "codeop", "pty", "ctypes", "marshal", "pickle", "_pickle",
        "dill", "cloudpickle", "joblib", "types", "functools", "operator", "webbrowser",
        "multiprocessing", "threading", "_thread", "signal", "asyncio", "platform",
        "inspect", "pdb", "bdb", "timeit", "tempfile", "io", "_io", "zipimport",
        "posixpath", "ntpath", "glob", "shelve", "sqlite3", "urllib", "http", "ftplib",
        "smtplib", "telnetlib", "xmlrpc", "ssl", "select", "mmap", "resource", "gc",
        "weakref", "copyreg", "copy_reg", "_codecs", "codecs", "builtins", "__builtin__",
        "torch._C", "torch.hub", "torch.jit", "torch.package", "torch.serialization",
        "torch.ops", "torch._ops", "torch.utils.cpp_extension", "numpy.f2py",
        "numpy.testing", "numpy.distutils", "numpy.lib.format", "pip",
        "setuptools", "distutils",
    }
)


#: Further modules whose globals run code or reach the network or disk when called; the
#: scanner reports them unsafe (``allow=`` still may name them: they are not imported).
RISKY_MODULES = frozenset({
    "torch._inductor", "torch.utils._config_module", "torch.fx", "torch._dynamo",
    "torch.distributed.rpc", "torch.testing", "torch.utils.data.datapipes", "numpy.lib.npyio",
    "requests", "aiohttp", "httplib", "http.client", "urllib.request", "nturl2path", "pydoc",
    "idlelib", "lib2to3", "ensurepip", "venv", "zipfile", "tarfile", "pkgutil", "imp",
    "site", "sysconfig", "trace", "cProfile", "profile", "doctest",
})
#: Builtins that execute, import, reach attributes or open files.
RISKY_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "apply",
    "execfile", "file", "reload", "memoryview", "type", "object", "super", "classmethod",
    "staticmethod", "property",
})


def _prefixes(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def _blocked(module: str) -> bool:
    return bool(_prefixes(module) & NEVER_ALLOWED)


_CODE_MODULES = NEVER_ALLOWED | RISKY_MODULES
#: Python 2 module names protocol 0-2 pickles may use for their Python 3 modules
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def canonical(module: str) -> str:
    """The Python 3 name of a module a pickle names (``__builtin__`` is ``builtins``)."""
    return _RENAMED_MODULES.get(module, module)


def dangerous(qualname: str) -> bool:
    """True for globals that run code or reach the system when called (never data)."""
    module, _, name = qualname.rpartition(".")
    module = canonical(module)
    if module == "builtins":
        return name in RISKY_BUILTINS
    if module == "torch" and name in ("load", "save"):
        return True
    return bool(_prefixes(module) & _CODE_MODULES)


# -- BUILD ---------------------------------------------------------------------------------


def build(m: Machine, target: Any, state: Any) -> Any:
    """BUILD ``state`` into ``target``; returns the finished object (usually ``target``)."""
    kind = type(target)
    if kind is collections.OrderedDict:
        target.__dict__.update(attribute_state(m, state, "OrderedDict"))
        return target
    if isinstance(target, Pending):
        return finish_numpy(m, target, state)
    if kind is TensorRef:
        attrs = attribute_state(m, state, "tensor")
        if attrs:
            target.attrs = {**(target.attrs or {}), **attrs}
        return target
    if kind is argparse.Namespace:
        for key, value in attribute_state(m, state, "Namespace").items():
            setattr(target, key, value)
        return target
    if kind is PickledObject:
        target.state = state
        return target
    allowed = m.allowlist.user_class(kind)
    if allowed is not None:
        setstate = getattr(target, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            target.__dict__.update(object_state(m, state) or {})
        return target
    raise m.fail(f"BUILD on a {kind.__name__} is not allowed")




# -- the table -----------------------------------------------------------------------------

_DEFAULT_TABLE = {**torch_table(), **stdlib_table(), **numpy_table()}

#: What ``allow=`` takes: a class, ``"module.Name"``, or ``(class_or_factory, "module.Name")``.
AllowSpec = type | str | tuple[Any, str]


class Allowlist:
    """Resolves the globals a stream names; the defaults plus what the caller allowed."""

    def __init__(self, allow: Iterable[AllowSpec] = ()) -> None:
        self._table = dict(_DEFAULT_TABLE)
        self._user_classes: dict[type, Entry] = {}
        for spec in allow:
            self._add(spec)

    @property
    def names(self) -> frozenset[str]:
        """Every ``module.name`` this allowlist resolves."""
        return frozenset(self._table)

    def extended(self, allow: Iterable[AllowSpec]) -> Allowlist:
        """A copy of this allowlist that also admits ``allow`` (this one is unchanged)."""
        copy = Allowlist()
        copy._table = dict(self._table)
        copy._user_classes = dict(self._user_classes)
        for spec in allow:
            copy._add(spec)
        return copy

    def _add(self, spec: AllowSpec) -> None:
        if isinstance(spec, str):
            module, _, name = spec.rpartition(".")
            if f"{canonical(module)}.{name}" in _DEFAULT_TABLE:
                return  # allowed already (__builtin__.dict is builtins.dict)
            self._check_allowable(module, spec)
            self._table[spec] = self._inert(module, name)
            return
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], str):
            target, qualname = spec
        elif isinstance(spec, type):
            target, qualname = spec, f"{spec.__module__}.{spec.__qualname__}"
        else:
            raise TypeError(
                f"allow= takes classes, 'module.Name' strings or (factory, 'module.Name') "
                f"pairs, got {spec!r}"
            )
        module = qualname.rpartition(".")[0]
        self._check_allowable(module, qualname)
        if getattr(target, "__module__", "") and _blocked(getattr(target, "__module__", "")):
            raise ValueError(f"{qualname} comes from a module torchkeep never allows")
        if isinstance(target, type):
            entry = Entry(qualname, call=_calling(target), new=_constructing(target), cls=target)
            self._user_classes[target] = entry
        elif callable(target):
            entry = Entry(qualname, call=_calling(target))
        else:
            raise TypeError(f"allow= entry for {qualname} must be a class or a callable")
        self._table[qualname] = entry

    @staticmethod
    def _check_allowable(module: str, qualname: str) -> None:
        if not module:
            raise ValueError(f"allow= names must be 'module.Name', got {qualname!r}")
        if _blocked(module):
            raise ValueError(f"{qualname} comes from a module torchkeep never allows")

    @staticmethod
    def _inert(module: str, name: str) -> Entry:
        def make(m: Machine, args: tuple[Any, ...]) -> PickledObject:
            return PickledObject(module, name, args)

        return Entry(f"{module}.{name}", call=make, new=make)

    def entry(self, qualname: str) -> Any:
        """What ``module.name`` resolves to (an Entry, a dtype, a storage class), or None."""
        module, _, name = qualname.rpartition(".")
        return self._table.get(f"{canonical(module)}.{name}")

    def user_class(self, kind: type) -> Entry | None:
        """The allow= entry for instances of ``kind``, if the caller allowed that class."""
        return self._user_classes.get(kind)

    def resolve(self, m: Machine, module: str, name: str) -> Any:
        """The value a GLOBAL opcode pushes for ``module.name``, or UnsafeCheckpointError."""
        qualname = f"{canonical(module)}.{name}"
        found = self._table.get(qualname)
        if found is not None:
            return found
        raise unsafe_global(qualname, f"{m.what} offset {m.op_pos}")

    def extend_items(self, m: Machine, target: Any, items: list[Any]) -> None:
        """APPEND(S) onto something that is not a plain list."""
        if isinstance(target, PickledObject):
            target.items.extend(items)
        elif isinstance(target, list) and type(target) in self._user_classes:
            target.extend(items)
        else:
            raise m.fail(f"APPEND on a {type(target).__name__} is not allowed")

    def set_items(self, m: Machine, target: Any, items: list[Any]) -> None:
        """SETITEM(S) onto something that is not a plain dict."""
        if isinstance(target, PickledObject):
            target.dict_items.extend(zip(items[::2], items[1::2], strict=True))
        elif isinstance(target, dict) and type(target) in self._user_classes:
            for i in range(0, len(items), 2):
                target[m.key(items[i])] = items[i + 1]
        else:
            raise m.fail(f"SETITEM on a {type(target).__name__} is not allowed")


def _calling(target: Callable[..., Any]) -> Call:
    def call(m: Machine, args: tuple[Any, ...]) -> Any:
        return target(*args)

    return call


def _constructing(cls: type) -> Call:
    def new(m: Machine, args: tuple[Any, ...]) -> Any:
        return cls.__new__(cls, *args)

    return new


def unsafe_global(qualname: str, where: str) -> UnsafeCheckpointError:
    """The error for a global outside the allowlist, saying how to allow it when that can help."""
    module = qualname.rpartition(".")[0]
    if _blocked(module):
        advice = (
            f"{module} is never allowed: naming it in a checkpoint is how pickle payloads run "
            "code. Do not load this file unless you wrote it."
        )
    elif dangerous(qualname):
        advice = (
            f"{qualname} runs code when called: no checkpoint needs it. Do not load this "
            "file unless you wrote it."
        )
    else:
        advice = (
            "torchkeep never imports or calls names from a file. If you trust this file and "
            f"{qualname} is a pure-data class, allow it: allow=[{qualname}] (the class "
            f"object; builds real instances) or allow=['{qualname}'] (inert PickledObject "
            "records; nothing imported)."
        )
    return UnsafeCheckpointError(
        f"{where}: global {qualname} is not allowed. {advice}", global_name=qualname
    )
