"""Fuzz targets: one function per parser entry point, each taking the fuzzer's bytes.

A target may end in one of torchkeep's own errors (``TorchkeepError``); anything else is a
bug: another exception, a ``MemoryError`` even when translated into one of ours (no input
may make torchkeep allocate what the fuzzing process cannot hold), a hang (the driver's
``-timeout``), a crash. ``check(name, data)`` runs a target with that rule; the tests
replay the regression inputs under ``tests/fuzz_regressions/`` through it, and
``fuzz/run.py`` drives the targets under atheris.

Targets: ``pickle`` (the restricted interpreter), ``zip`` (the zip reader and the torch
zip format), ``legacy`` (the magic-number stream), ``safetensors`` (header and views),
``manifest`` (a step directory's manifest), ``scan`` (the static scanner over any input),
``load`` (format detection and a full numpy-backend load of any input) and
``differential`` (torchkeep's reading of a pickle against CPython's ``pickle.loads`` with
a ``find_class`` restricted to the same allowlist).
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
from collections.abc import Callable
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.limits import Limits
from torchkeep.unpickle.entries import Entry

__all__ = ["TARGETS", "Finding", "check"]

#: Limits for fuzzing: the defaults, with the pickle size bounded by the fuzzer's inputs.
LIMITS = Limits()


class Finding(AssertionError):
    """What a target did that is a bug (the fuzzer reports it as a crash)."""


def _memory_error_in(error: BaseException) -> bool:
    seen = 0
    node: BaseException | None = error
    while node is not None and seen < 20:
        if isinstance(node, MemoryError):
            return True
        node = node.__cause__ or node.__context__
        seen += 1
    return False


def _materialize(parsed: Any) -> None:
    from torchkeep.arrays import NumpyMaterializer

    try:
        NumpyMaterializer(parsed, mmap=False).tree(limits=LIMITS)
    finally:
        parsed.close()


def _source(data: bytes) -> Any:
    from torchkeep.storage.source import open_source

    return open_source(data)


def fuzz_pickle(data: bytes) -> None:
    from torchkeep.unpickle import Allowlist, unpickle
    from torchkeep.unpickle.torch_globals import storage_pid

    unpickle(data, allowlist=Allowlist(), persistent_load=lambda pid: storage_pid(pid, 5),
             limits=LIMITS)


def fuzz_zip(data: bytes) -> None:
    from torchkeep.errors import IntegrityError
    from torchkeep.formats.torch_zip import read_torch_zip
    from torchkeep.formats.ziparchive import ZipArchive
    from torchkeep.unpickle import Allowlist

    archive = ZipArchive(_source(data), limits=LIMITS)
    for name in archive.order[:16]:
        if archive.members[name].size <= 1 << 20:
            archive.read(name, verify=False)
    try:
        _materialize(read_torch_zip(_source(data), allowlist=Allowlist(), limits=LIMITS))
    except IntegrityError:
        # a mutation rarely keeps a CRC-32 right: read on past it, so the fuzzer reaches
        # what comes after (storages, views, the pickle inside)
        check_crc = ZipArchive.check_crc
        ZipArchive.check_crc = lambda self, member, data: None  # type: ignore[method-assign]
        try:
            _materialize(read_torch_zip(_source(data), allowlist=Allowlist(), limits=LIMITS))
        finally:
            ZipArchive.check_crc = check_crc  # type: ignore[method-assign]


def fuzz_legacy(data: bytes) -> None:
    from torchkeep.formats.torch_legacy import read_torch_legacy
    from torchkeep.unpickle import Allowlist

    _materialize(read_torch_legacy(_source(data), allowlist=Allowlist(), limits=LIMITS))


def fuzz_safetensors(data: bytes) -> None:
    from torchkeep.formats.safetensors import read_safetensors

    _materialize(read_safetensors(_source(data), limits=LIMITS))


class _MemoryFileSystem:
    """The few FileSystem calls a step read makes, over a dict of bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def join(self, *parts: str) -> str:
        return "/".join(parts)

    def exists(self, path: str) -> bool:
        return path in self.files

    def read_bytes(self, path: str) -> bytes:
        from torchkeep.errors import StorageError

        try:
            return self.files[path]
        except KeyError:
            raise StorageError("no such file", source=path) from None

    def source(self, path: str) -> Any:
        return _source(self.read_bytes(path))

    def describe(self, path: str) -> str:
        return f"memory:{path}"


#: the data file a fuzzed manifest's chunks point into
_DATA_FILE = bytes(range(256)) * 64


def fuzz_manifest(data: bytes) -> None:
    from torchkeep.formats.manifest import MANIFEST_NAME, MARKER_NAME, checksum, read_step_dir

    marker = json.dumps({"manifest_xxh3": checksum(data)}).encode()
    fs = _MemoryFileSystem({f"step/{MANIFEST_NAME}": data, f"step/{MARKER_NAME}": marker,
                            "step/data-00000.bin": _DATA_FILE})
    _materialize(read_step_dir("step", fs=fs, limits=LIMITS))  # type: ignore[arg-type]


def fuzz_scan(data: bytes) -> None:
    from torchkeep.scanning import scan

    scan(data, limits=LIMITS)


def fuzz_load(data: bytes) -> None:
    from torchkeep.api import parse

    _materialize(parse(data, limits=LIMITS))


# -- the differential target ----------------------------------------------------------

#: globals both sides resolve: for CPython the real objects, for torchkeep its allowlist
_SHARED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class _NotShared(pickle.UnpicklingError):
    """CPython met a global the two sides do not both resolve: nothing to compare."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _SHARED_GLOBALS.get((module, name))
        if found is None:
            raise _NotShared(f"{module}.{name}")
        return found


class _Incomparable(Exception):
    """CPython's reading cannot be compared with torchkeep's."""


def _big_memo_index(data: bytes) -> bool:
    """True when a PUT names a memo index CPython would size an array of that many slots
    for (a LONG_BINPUT of 55,257,090 takes it seconds and 440 MB)."""
    import pickletools

    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > 100_000:
                return True
            if opcode.name == "STOP":
                break
    except Exception:
        pass
    return False


def _cpython(data: bytes) -> tuple[bool, Any]:
    """(True, value) or (False, the error) for CPython's C unpickler."""
    if _big_memo_index(data):
        raise _Incomparable
    try:
        return True, _Restricted(io.BytesIO(data), encoding="utf-8").load()
    except (_NotShared, UnicodeDecodeError, MemoryError) as e:
        # a global outside the shared few; a Python 2 string that is not UTF-8 (torchkeep
        # keeps it as bytes, CPython's utf-8 decoding fails); a memo index CPython sizes
        # its memo array by (LONG_BINPUT 2**31 is a MemoryError, a dict key for torchkeep)
        raise _Incomparable from e
    except RecursionError:
        return False, "RecursionError"
    except Exception as e:
        return False, e


def _global_name(value: Any) -> Any:
    """A global (torchkeep's Entry, CPython's class) as its name; other values as is."""
    if isinstance(value, Entry):
        return ("global", value.qualname.replace("collections.", ""))
    if isinstance(value, type):
        return ("global", f"{value.__module__}.{value.__qualname__}".replace(
            "collections.", ""))
    if isinstance(value, frozenset):
        return frozenset(_global_name(x) for x in value)
    if isinstance(value, tuple):
        return tuple(_global_name(x) for x in value)
    return value


def _same(a: Any, b: Any, memo: dict[int, int], depth: int = 0) -> bool:
    """Equal values with equal types, identity kept (a cycle or shared child on one side
    is one on the other)."""
    if depth > 200:
        return True
    if isinstance(a, Entry) and isinstance(b, type):  # a global itself, as a value
        return bool(_global_name(a) == _global_name(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == \
            math.copysign(1, b))
    if isinstance(a, complex):
        return _same(a.real, b.real, memo, depth) and _same(a.imag, b.imag, memo, depth)
    if isinstance(a, (list, tuple, dict, set, frozenset, bytearray)):
        if id(a) in memo:
            return memo[id(a)] == id(b)
        memo[id(a)] = id(b)
        if isinstance(a, dict):
            return list(a) == list(b) and all(
                _same(a[k], b[k], memo, depth + 1) for k in a)
        if isinstance(a, (set, frozenset)):
            return {_global_name(x) for x in a} == {_global_name(x) for x in b}
        if isinstance(a, bytearray):
            return bool(a == b)
        return len(a) == len(b) and all(
            _same(x, y, memo, depth + 1) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def fuzz_differential(data: bytes) -> None:
    from torchkeep.unpickle import Allowlist, unpickle

    try:
        result = unpickle(data, allowlist=Allowlist(), limits=LIMITS)
    except TorchkeepError:
        return  # torchkeep refuses what CPython may read (FRAME splits, limits, globals)
    try:  # only now: CPython can take seconds on what torchkeep refuses (deep keys)
        ok, expected = _cpython(data)
    except _Incomparable:
        return
    if not ok:
        raise Finding(f"torchkeep read a pickle CPython refuses ({expected!r})")
    if not _same(result.value, expected, {}):
        raise Finding(f"torchkeep read {result.value!r:.200} where CPython read "
                      f"{expected!r:.200}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "pickle": fuzz_pickle,
    "zip": fuzz_zip,
    "legacy": fuzz_legacy,
    "safetensors": fuzz_safetensors,
    "manifest": fuzz_manifest,
    "scan": fuzz_scan,
    "load": fuzz_load,
    "differential": fuzz_differential,
}


def check(name: str, data: bytes) -> None:
    """Run target ``name`` on ``data``; raise ``Finding`` (or let a foreign error out)
    for a bug, return for a clean end or one of torchkeep's own errors."""
    try:
        TARGETS[name](data)
    except TorchkeepError as e:
        if _memory_error_in(e):
            raise Finding(f"a MemoryError behind {type(e).__name__}: {e}") from e
