"""The Python globals a checkpoint may name: containers, bytes, numbers, the plain type
constructors with plain arguments, copyreg's helpers, and pure-data standard library types
(Namespace, paths, datetimes, Decimal), each checking its arguments before it builds."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import pathlib
from typing import Any

from torchkeep.unpickle.entries import Call, Entry, Machine, marker

__all__ = ["stdlib_table"]


def _ordered_dict(m: Machine, args: tuple[Any, ...]) -> collections.OrderedDict[Any, Any]:
    result: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    if args:
        (items,) = args
        pairs = items.items() if isinstance(items, dict) else items
        for pair in pairs:
            key, value = pair
            result[m.key(key)] = value
    return result


def _counter(m: Machine, args: tuple[Any, ...]) -> collections.Counter[Any]:
    result: collections.Counter[Any] = collections.Counter()
    if args:
        (items,) = args
        if not isinstance(items, dict):
            raise m.fail("Counter takes a dict")
        for key, value in items.items():
            result[m.key(key)] = value
    return result


def _at_most_one(m: Machine, args: tuple[Any, ...], what: str) -> None:
    # the real callables refuse more (set(a, b) is a TypeError): so does their stand-in
    if len(args) > 1:
        raise m.fail(f"{what} takes at most 1 argument, got {len(args)}")


def _set(m: Machine, args: tuple[Any, ...]) -> set[Any]:
    _at_most_one(m, args, "set")
    return {m.key(v) for v in (args[0] if args else ())}


def _frozenset(m: Machine, args: tuple[Any, ...]) -> frozenset[Any]:
    _at_most_one(m, args, "frozenset")
    return frozenset(m.key(v) for v in (args[0] if args else ()))


def _empty(kind: type) -> Call:
    """NEWOBJ of a dict type: ``cls.__new__(cls, *args)`` ignores the args (the items come
    through SETITEMS, or BUILD)."""
    def new(m: Machine, args: tuple[Any, ...]) -> Any:
        return kind()

    return new


def _bytes_from(m: Machine, args: tuple[Any, ...], what: str) -> bytes:
    if not args:
        return b""
    value = args[0]
    if isinstance(value, str) and len(args) == 2 and args[1] in ("latin1", "latin-1"):
        return value.encode("latin-1")
    if len(args) != 1:
        raise m.fail(f"unsupported {what} arguments")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, list) and all(type(v) is int and 0 <= v < 256 for v in value):
        return bytes(list[int](value))
    raise m.fail(f"unsupported {what} arguments")


def _bytes(m: Machine, args: tuple[Any, ...]) -> bytes:
    return _bytes_from(m, args, "bytes")


def _bytearray(m: Machine, args: tuple[Any, ...]) -> bytearray:
    return bytearray(_bytes_from(m, args, "bytearray"))


def _complex(m: Machine, args: tuple[Any, ...]) -> complex:
    if len(args) != 2 or not all(type(v) in (int, float) for v in args):
        raise m.fail("complex takes (real, imag) numbers")
    return complex(args[0], args[1])


def _slice(m: Machine, args: tuple[Any, ...]) -> slice:
    if len(args) != 3 or not all(v is None or type(v) is int for v in args):
        raise m.fail("slice takes (start, stop, step) ints or None")
    return slice(*args)


def _codecs_encode(m: Machine, args: tuple[Any, ...]) -> bytes:
    if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str:
        raise m.fail("_codecs.encode takes (str, encoding)")
    text, encoding = str(args[0]), str(args[1])
    if encoding.lower().replace("_", "-") in ("latin1", "latin-1", "iso-8859-1"):
        return text.encode("latin-1")
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        return text.encode("utf-8", "surrogatepass")
    raise m.fail(f"_codecs.encode with encoding {encoding!r} is not allowed")


def _namespace(m: Machine, args: tuple[Any, ...]) -> argparse.Namespace:
    if args:
        raise m.fail("argparse.Namespace takes no positional arguments")
    return argparse.Namespace()


def _path(kind: type[pathlib.PurePath]) -> Call:
    def make(m: Machine, args: tuple[Any, ...]) -> pathlib.PurePath:
        if not all(type(a) is str for a in args):
            raise m.fail(f"{kind.__name__} takes str parts")
        try:
            return kind(*args)
        except NotImplementedError:  # WindowsPath on POSIX and the reverse
            pure = pathlib.PureWindowsPath if "Windows" in kind.__name__ else pathlib.PurePosixPath
            return pure(*args)

    return make


_DATETIME_ARGS = (int, bytes, datetime.timezone, type(None))


def _datetime_type(kind: type) -> Call:
    def make(m: Machine, args: tuple[Any, ...]) -> Any:
        if not all(type(a) in _DATETIME_ARGS for a in args):
            raise m.fail(f"{kind.__name__} takes ints, bytes state or a timezone")
        return kind(*args)

    return make


def _timedelta(m: Machine, args: tuple[Any, ...]) -> datetime.timedelta:
    if not all(type(a) is int for a in args):
        raise m.fail("timedelta takes ints")
    return datetime.timedelta(*args)


def _timezone(m: Machine, args: tuple[Any, ...]) -> datetime.timezone:
    if not args or type(args[0]) is not datetime.timedelta or len(args) > 2:
        raise m.fail("timezone takes (timedelta[, name])")
    if len(args) == 2:
        if type(args[1]) is not str:
            raise m.fail("timezone name must be a str")
        return datetime.timezone(args[0], args[1])
    return datetime.timezone(args[0])


def _decimal(m: Machine, args: tuple[Any, ...]) -> decimal.Decimal:
    if len(args) != 1 or type(args[0]) is not str:
        raise m.fail("Decimal takes one str")
    return decimal.Decimal(args[0])


def _reconstructor(m: Machine, args: tuple[Any, ...]) -> Any:
    # copyreg._reconstructor(cls, base, state), which protocols 0 and 1 use for instances
    # of classes: base.__new__(cls, state), then base.__init__(obj, state) for dict/list
    cls, base, state = args
    if not isinstance(cls, Entry) or cls.new is None:
        raise m.fail("copyreg._reconstructor of a class that is not allowed")
    kind = base.qualname if isinstance(base, Entry) else None
    if kind == "builtins.object" and state is None:
        return cls.new(m, ())
    if kind == "builtins.dict" and isinstance(state, dict):
        obj = cls.new(m, ())
        m.allowlist.set_items(m, obj, [x for pair in state.items() for x in pair])
        return obj
    if kind == "builtins.list" and isinstance(state, list):
        obj = cls.new(m, ())
        m.allowlist.extend_items(m, obj, list(state))
        return obj
    raise m.fail("copyreg._reconstructor is supported with base object, dict or list")


# -- plain type constructors with plain arguments (Python 2 pickles name them) --

_PLAIN = (int, float, str, bool, type(None), bytes, complex)
_ITERABLES = (list, tuple, set, frozenset, dict, str, bytes)


def _plain_args(m: Machine, args: tuple[Any, ...], kinds: tuple[type, ...], what: str,
                most: int = 1) -> None:
    if len(args) > most or any(type(a) not in kinds for a in args):
        raise m.fail(f"{what} takes at most {most} argument(s) of plain types, got "
                     f"{[type(a).__name__ for a in args]}")


def _dict(m: Machine, args: tuple[Any, ...]) -> dict[Any, Any]:
    _plain_args(m, args, (dict, list, tuple), "dict")
    if not args:
        return {}
    pairs = args[0].items() if isinstance(args[0], dict) else args[0]
    result = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise m.fail("dict takes (key, value) pairs")
        result[m.key(pair[0])] = pair[1]
    return result


def _sequence(kind: type) -> Call:
    def make(m: Machine, args: tuple[Any, ...]) -> Any:
        _plain_args(m, args, _ITERABLES, kind.__name__)
        return kind(args[0]) if args else kind()

    return make


def _number(kind: type) -> Call:
    def make(m: Machine, args: tuple[Any, ...]) -> Any:
        _plain_args(m, args, _PLAIN, kind.__name__, most=2 if kind is int else 1)
        if kind is not int and any(type(a) in (bytes, complex) for a in args):
            raise m.fail(f"{kind.__name__} of bytes or complex is not supported")
        return kind(*args)

    return make


def _newobj_func(m: Machine, args: tuple[Any, ...]) -> Any:
    # copyreg.__newobj__(cls, *args), spelled as a call by some picklers.
    if not args or not isinstance(args[0], Entry) or args[0].new is None:
        raise m.fail("copyreg.__newobj__ of a class that is not allowed")
    return args[0].new(m, tuple(args[1:]))


def stdlib_table() -> dict[str, Any]:
    """The Python globals, by ``module.name``."""
    table: dict[str, Any] = {}

    def add(qualname: str, call: Call | None = None, new: Call | None = None) -> None:
        table[qualname] = Entry(qualname, call=call, new=new)

    add("collections.OrderedDict", _ordered_dict, _empty(collections.OrderedDict))
    add("collections.Counter", _counter, _empty(collections.Counter))
    add("builtins.set", _set)
    add("builtins.frozenset", _frozenset)
    add("builtins.bytes", _bytes)
    add("builtins.bytearray", _bytearray)
    add("builtins.complex", _complex, _complex)
    add("builtins.slice", _slice)
    table["builtins.object"] = marker("builtins.object")
    add("builtins.dict", _dict, _empty(dict))
    add("builtins.list", _sequence(list), _empty(list))
    add("builtins.tuple", _sequence(tuple))
    for number in (int, float, str, bool):
        add(f"builtins.{number.__name__}", _number(number))
    add("_codecs.encode", _codecs_encode)
    add("copyreg._reconstructor", _reconstructor)
    add("copyreg.__newobj__", _newobj_func)

    add("argparse.Namespace", _namespace, _namespace)
    for kind in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                 pathlib.PureWindowsPath, pathlib.Path, pathlib.PurePath):
        add(f"pathlib.{kind.__name__}", _path(kind))
    add("datetime.datetime", _datetime_type(datetime.datetime))
    add("datetime.date", _datetime_type(datetime.date))
    add("datetime.time", _datetime_type(datetime.time))
    add("datetime.timedelta", _timedelta)
    add("datetime.timezone", _timezone)
    add("decimal.Decimal", _decimal)
    return table
