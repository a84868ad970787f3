"""A protocol-2 pickle writer for checkpoint trees, byte-compatible with ``torch.save``.

It writes only what ``torch.load(weights_only=True)`` reads: containers, scalars, tensors
(as ``_rebuild_tensor_v2/v3`` with storages as persistent ids), ``torch.Size``, dtypes,
devices, and numpy arrays in numpy's own reduce form. Memoisation follows CPython's C
pickler object for object (same opcodes, same memo indices), so a tree torch.save
would write comes out byte-identical. Anything else is refused with the path where it
sits in the tree: this writer never pickles arbitrary objects.

Hand-written rather than ``pickle.Pickler`` + ``reducer_override``: the stdlib pickler
can only emit GLOBAL for names it can import, which a torch-free writer cannot, and it
cannot name the tree path of an unsupported object.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import datetime
import decimal
import pathlib
import struct
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from torchkeep import dtypes
from torchkeep.dtypes import DType
from torchkeep.errors import UnsupportedTypeError
from torchkeep.tree import (
    Device,
    PickledObject,
    Size,
    StorageRef,
    StorageView,
    Symbol,
    TensorRef,
)
from torchkeep.unpickle.allowlist import Allowlist, dangerous

__all__ = ["REDUCED_TYPES", "Describe", "TreePickler", "reduction", "render_path"]

#: Standard-library types the default allowlist reads and both picklers write through
#: their own ``__reduce_ex__(2)`` (each names only allowlisted globals).
REDUCED_TYPES = (
    argparse.Namespace, slice, decimal.Decimal, datetime.datetime, datetime.date,
    datetime.time, datetime.timedelta, datetime.timezone, pathlib.PurePosixPath,
    pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath,
)
_READABLE = Allowlist().names


def reduction(obj: Any, protocol: int = 2) -> tuple[Any, tuple[Any, ...], Any, bool]:
    """``(callable, args, state, newobj)`` of one of REDUCED_TYPES from its
    ``__reduce_ex__(protocol)``; ``newobj`` when pickle writes it as NEWOBJ of the class.
    (Protocol 2 is torch.save's, which drops a datetime's ``fold``; 4 keeps it.)"""
    reduced: tuple[Any, ...] = obj.__reduce_ex__(protocol)
    func, args = reduced[0], tuple(reduced[1])
    state = reduced[2] if len(reduced) > 2 else None
    if func is copyreg.__newobj__:  # type: ignore[attr-defined]
        return args[0], args[1:], state, True
    return func, args, state, False

#: Turns a foreign object (a torch.Tensor, torch.Size ...) into a torchkeep placeholder,
#: or returns None when it is not supported.
Describe = Callable[[Any], Any]

_pack_i = struct.Struct("<i").pack
_pack_I = struct.Struct("<I").pack
_pack_d = struct.Struct(">d").pack

_MARK = b"("
_BATCH = 1000
_MAX_DEPTH = 200

# Python 3 names written under their Python 2 spelling (pickle's fix_imports).
_PY2_MODULES = {"builtins": "__builtin__", "copyreg": "copy_reg"}


def render_path(path: Iterable[Any]) -> str:
    """``obj['model']['fc1'][0]``: where an object sits in the tree being saved."""
    return "obj" + "".join(f"[{p!r}]" for p in path)


def _encode_long(x: int) -> bytes:
    if x == 0:
        return b""
    nbytes = (x.bit_length() >> 3) + 1
    result = x.to_bytes(nbytes, "little", signed=True)
    if x < 0 and nbytes > 1 and result[-1] == 0xFF and (result[-2] & 0x80) != 0:
        result = result[:-1]
    return result


class _GlobalKey:
    """One object per (module, name): the identity the memo uses for a GLOBAL."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name


_GLOBALS: dict[tuple[str, str], _GlobalKey] = {}
_STORAGE = "storage"
_LATIN1 = "latin1"


class _FreshTupleOf(tuple[Any, ...]):
    """A tuple the writer made itself: pickled like a fresh tuple (memo put, never hit)."""

    __slots__ = ()


class _FreshDict(dict[Any, Any]):
    """A dict the writer made itself (tensor attribute state, conj/neg metadata)."""


class TreePickler:
    """Pickles one tree; collects the storages it references, keyed in first-seen order.

    ``legacy=True`` writes the persistent ids of the magic-number format (a 6-tuple).
    """

    def __init__(self, *, describe: Describe | None = None, legacy: bool = False) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[int, int] = {}
        self._memo_size = 0  # memo indices handed out (several objects may share one)
        self._alive: list[Any] = []
        self.describe = describe
        self.legacy = legacy
        self.storages: list[StorageRef] = []
        self._storage_keys: dict[int, str] = {}
        self._storage_dtypes: dict[int, DType] = {}
        self._path: list[Any] = []
        self._tuples_in_progress: set[int] = set()
        self._dispatch: dict[type, Callable[[Any], None]] = {
            type(None): self._none,
            bool: self._bool,
            int: self._int,
            float: self._float,
            str: self._str,
            bytes: self._bytes,
            dict: self._dict,
            list: self._list,
            tuple: self._tuple,
            collections.OrderedDict: self._ordered_dict,
            collections.Counter: self._counter,
            set: self._set,
            frozenset: self._frozenset,
            bytearray: self._bytearray,
            complex: self._complex,
            TensorRef: self._tensor_ref,
            Size: self._size,
            Device: self._device,
            Symbol: self._symbol,
            StorageView: self._storage_view,
            _FreshTupleOf: self._fresh_tuple,
            _FreshDict: self._fresh_dict,
            PickledObject: self._pickled_object,
            **dict.fromkeys(REDUCED_TYPES, self._reduced),
        }

    # -- entry points ----------------------------------------------------------------------

    def dump(self, obj: Any) -> bytes:
        """The pickle bytes of ``obj`` (protocol 2, ending in STOP)."""
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def fail(self, message: str) -> UnsupportedTypeError:
        return UnsupportedTypeError(f"{render_path(self._path)}: {message}")

    # -- memo ------------------------------------------------------------------------------

    def _put(self, obj: Any) -> None:
        index = self._memo_size
        self._memo_size += 1
        if obj is not None:
            self.memo[id(obj)] = index
            self._alive.append(obj)
        self.out += b"q" + bytes((index,)) if index < 256 else b"r" + _pack_I(index)

    def _get(self, index: int) -> None:
        self.out += b"h" + bytes((index,)) if index < 256 else b"j" + _pack_I(index)

    # -- dispatch ------------------------------------------------------------------------

    def save(self, obj: Any) -> None:
        kind = type(obj)
        if kind is bool or kind is int or kind is float or obj is None:
            self._dispatch[kind](obj)
            return
        hit = self.memo.get(id(obj))
        if hit is not None:
            self._get(hit)
            return
        handler = self._dispatch.get(kind)
        if handler is not None:
            handler(obj)
            return
        if isinstance(obj, DType):
            self._global("torch", obj.name, obj)
            return
        # numpy is imported only where it is already loaded (the CLI never needs it): an
        # object cannot be a numpy array unless numpy has been imported
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, (np.ndarray, np.generic)):
            self._numpy(obj)
            return
        if self.describe is not None:
            try:
                placeholder = self.describe(obj)
            except UnsupportedTypeError as e:
                raise self.fail(e.reason) from None
            if placeholder is not None:
                self._placeholder(placeholder, obj)
                return
        raise self.fail(f"unsupported type {kind.__module__}.{kind.__qualname__}; torchkeep "
                        "saves tensors, containers, numbers, strings, bytes and numpy arrays, "
                        "never arbitrary pickled objects")

    def _placeholder(self, placeholder: Any, original: Any) -> None:
        if isinstance(placeholder, TensorRef):
            self._tensor_ref(placeholder, original)
        elif isinstance(placeholder, DType):
            self._global("torch", placeholder.name, original)
        elif isinstance(placeholder, Size):
            self._size(placeholder, original)
        elif isinstance(placeholder, Device):
            self._device(placeholder, original)
        elif isinstance(placeholder, Symbol):
            self._symbol(placeholder, original)
        elif isinstance(placeholder, StorageView):
            self._storage_view(placeholder, original)
        else:
            self.save(placeholder)

    def _child(self, key: Any, value: Any) -> None:
        path = self._path
        if len(path) >= _MAX_DEPTH:
            raise self.fail(f"nesting deeper than {_MAX_DEPTH} levels")
        path.append(key)
        self.save(value)
        path.pop()

    # -- scalars ----------------------------------------------------------------------------

    def _none(self, obj: None) -> None:
        self.out += b"N"

    def _bool(self, obj: bool) -> None:
        self.out += b"\x88" if obj else b"\x89"

    def _int(self, obj: int) -> None:
        out = self.out
        if 0 <= obj <= 0xFF:
            out += b"K" + bytes((obj,))
        elif 0 <= obj <= 0xFFFF:
            out += b"M" + obj.to_bytes(2, "little")
        elif -0x80000000 <= obj <= 0x7FFFFFFF:
            out += b"J" + _pack_i(obj)
        else:
            encoded = _encode_long(obj)
            if len(encoded) < 256:
                out += b"\x8a" + bytes((len(encoded),)) + encoded
            else:
                out += b"\x8b" + _pack_i(len(encoded)) + encoded

    def _float(self, obj: float) -> None:
        self.out += b"G" + _pack_d(obj)

    def _str(self, obj: str) -> None:
        encoded = obj.encode("utf-8", "surrogatepass")
        self.out += b"X" + _pack_I(len(encoded)) + encoded
        self._put(obj)

    def _bytes(self, obj: bytes) -> None:
        if not obj:
            self._reduce_call("__builtin__", "bytes", (), obj)
        else:
            self._reduce_call("_codecs", "encode", (obj.decode("latin-1"), _LATIN1), obj)

    # -- containers ----------------------------------------------------------------------

    def _tuple(self, obj: tuple[Any, ...]) -> None:
        n = len(obj)
        if n == 0:
            self.out += b")"
            return
        oid = id(obj)
        if oid in self._tuples_in_progress:
            raise self.fail("a tuple that contains itself cannot be saved")
        self._tuples_in_progress.add(oid)
        if n > 3:
            self.out += _MARK
        for i, item in enumerate(obj):
            self._child(i, item)
        self._tuples_in_progress.discard(oid)
        self.out += b"t" if n > 3 else (b"\x85", b"\x86", b"\x87")[n - 1]
        self._put(obj)

    def _fresh_tuple(self, items: tuple[Any, ...]) -> None:
        """A tuple the writer builds (never a memo hit): the same bytes as a fresh tuple."""
        n = len(items)
        if n == 0:
            self.out += b")"
            return
        if n > 3:
            self.out += _MARK
        for item in items:
            self.save(item)
        self.out += b"t" if n > 3 else (b"\x85", b"\x86", b"\x87")[n - 1]
        self._put(None)

    def _fresh_dict(self, obj: dict[Any, Any]) -> None:
        self.out += b"}"
        self._put(None)
        self._dict_items_exact(obj)

    def _list(self, obj: list[Any]) -> None:
        self.out += b"]"
        self._put(obj)
        n = len(obj)
        if n == 1:
            self._child(0, obj[0])
            self.out += b"a"
        elif n:
            i = 0
            while i < n:
                self.out += _MARK
                for j in range(i, min(i + _BATCH, n)):
                    self._child(j, obj[j])
                self.out += b"e"
                i += _BATCH

    def _dict(self, obj: dict[Any, Any]) -> None:
        self.out += b"}"
        self._put(obj)
        self._dict_items_exact(obj)

    def _dict_items_exact(self, obj: dict[Any, Any]) -> None:
        # CPython's batch_dict_exact: one item is SETITEM; otherwise MARK...SETITEMS
        # batches of 1000, with a final empty batch when the size is a multiple of 1000.
        n = len(obj)
        if n == 1:
            ((key, value),) = obj.items()
            self.save(key)
            self._child(key, value)
            self.out += b"s"
            return
        if n == 0:
            return
        items = iter(obj.items())
        while True:
            self.out += _MARK
            count = 0
            for key, value in items:
                self.save(key)
                self._child(key, value)
                count += 1
                if count == _BATCH:
                    break
            self.out += b"u"
            if count != _BATCH:
                break

    def _dict_items_iter(self, pairs: list[tuple[Any, Any]]) -> None:
        # CPython's batch_dict over an iterator: a final batch of one uses SETITEM.
        i, n = 0, len(pairs)
        while i < n:
            batch = pairs[i : i + _BATCH]
            if len(batch) == 1:
                key, value = batch[0]
                self.save(key)
                self._child(key, value)
                self.out += b"s"
            else:
                self.out += _MARK
                for key, value in batch:
                    self.save(key)
                    self._child(key, value)
                self.out += b"u"
            i += _BATCH

    def _ordered_dict(self, obj: collections.OrderedDict[Any, Any]) -> None:
        # OrderedDict.__reduce__: (cls, (), state or None, None, iter(items))
        self._global("collections", "OrderedDict")
        self.out += b")R"
        self._put(obj)
        self._dict_items_iter(list(obj.items()))
        state = vars(obj)
        if state:
            self.out += b"}"
            self._put(None)
            self._path.append("<attributes>")
            self._dict_items_exact(state)
            self._path.pop()
            self.out += b"b"

    def _counter(self, obj: collections.Counter[Any]) -> None:
        self._global("collections", "Counter")
        self._child("<items>", _FreshTupleOf((dict(obj),)))
        self.out += b"R"
        self._put(obj)

    def _set(self, obj: set[Any]) -> None:
        self._reduce_call("__builtin__", "set", (list(obj),), obj)

    def _frozenset(self, obj: frozenset[Any]) -> None:
        self._reduce_call("__builtin__", "frozenset", (list(obj),) if obj else (), obj)

    def _bytearray(self, obj: bytearray) -> None:
        # the C pickler below protocol 5: bytearray(bytes(obj)), or bytearray() when empty
        self._reduce_call("__builtin__", "bytearray", (bytes(obj),) if obj else (), obj)

    def _complex(self, obj: complex) -> None:
        # copyreg's dispatch_table reduces complex to complex(real, imag)
        self._reduce_call("__builtin__", "complex", (obj.real, obj.imag), obj)

    def _reduced(self, obj: Any) -> None:
        """A standard-library value the default allowlist reads (Namespace, paths, datetimes,
        Decimal, slice), written as the C pickler writes its ``__reduce_ex__(2)``."""
        func, args, state, newobj = reduction(obj)
        self._class_global(func)
        self._fresh_tuple(args)
        self.out += b"\x81" if newobj else b"R"
        self._put(obj)
        if state is not None:
            self._child("<attributes>", state)
            self.out += b"b"

    def _class_global(self, cls: Any) -> None:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name not in _READABLE:
            raise self.fail(f"cannot save a reference to {name}")
        self._global(cls.__module__, cls.__qualname__)

    def _pickled_object(self, obj: PickledObject) -> None:
        """An inert record, written back as its own global called with its arguments."""
        if dangerous(obj.qualname) or not obj.module or "\n" in obj.qualname:
            raise self.fail(f"{obj.qualname} runs code: an inert record of it is not saved")
        self._global(obj.module, obj.name)
        self._child("<args>", _FreshTupleOf(obj.args))
        self.out += b"R"
        self._put(obj)
        if obj.items:
            self.out += _MARK
            for i, item in enumerate(obj.items):
                self._child(i, item)
            self.out += b"e"
        if obj.dict_items:
            self._dict_items_iter(list(obj.dict_items))
        if obj.state is not None:
            self._child("<state>", obj.state)
            self.out += b"b"

    def _reduce_call(self, module: str, name: str, args: tuple[Any, ...], obj: Any) -> None:
        self._global(module, name)
        self._fresh_tuple(args)
        self.out += b"R"
        self._put(obj)

    def _global(self, module: str, name: str, obj: Any = None) -> None:
        key = _GLOBALS.setdefault((module, name), _GlobalKey(module, name))
        hit = self.memo.get(id(key))
        if hit is not None:
            self._get(hit)
            if obj is not None and id(obj) not in self.memo:
                self.memo[id(obj)] = hit
                self._alive.append(obj)
            return
        module = _PY2_MODULES.get(module, module)
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        index = self._memo_size
        self._put(key)
        if obj is not None:
            self.memo[id(obj)] = index
            self._alive.append(obj)

    # -- torch values ----------------------------------------------------------------------

    def _size(self, obj: tuple[int, ...], original: Any = None) -> None:
        self._global("torch", "Size")
        self._fresh_tuple(tuple(obj))
        self.out += b"\x85"
        self._put(None)
        self.out += b"R"
        self._put(original if original is not None else obj)

    def _device(self, obj: Device, original: Any = None) -> None:
        self._global("torch", "device")
        args: tuple[Any, ...] = (obj.type,) if obj.index is None else (obj.type, obj.index)
        self._fresh_tuple(args)
        self.out += b"R"
        self._put(original if original is not None else obj)

    def _symbol(self, obj: Symbol, original: Any = None) -> None:
        if obj.kind == "layout":
            self._global("torch.serialization", "_get_layout")
            self._fresh_tuple((f"torch.{obj.name}",))
            self.out += b"R"
            self._put(original if original is not None else obj)
        else:
            self._global("torch", obj.name, original if original is not None else obj)

    def _storage_view(self, obj: StorageView, original: Any = None) -> None:
        # torch's persistent_id path: no memo entry for the storage object itself
        self._persistent(obj.storage, obj.dtype, untyped=obj.untyped)

    def storage_dtype(self, ref: StorageRef) -> DType:
        """The dtype storage ``ref`` was first written as (its element size counts numel)."""
        return self._storage_dtypes[id(ref)]

    def storage_key(self, ref: StorageRef, dtype: DType) -> str:
        """The key of ``ref`` in this file ("0", "1", ... in first-seen order)."""
        sid = id(ref)
        key = self._storage_keys.get(sid)
        if key is None:
            key = str(len(self.storages))
            self._storage_keys[sid] = key
            self._storage_dtypes[sid] = dtype
            self.storages.append(ref)
            self._alive.append(ref)
            self._alive.append(key)
        elif self._storage_dtypes[sid].itemsize != dtype.itemsize or (
            self._storage_dtypes[sid] is not dtype and dtype.storage_class is not None
            and self._storage_dtypes[sid].storage_class is not None
        ):
            raise self.fail(
                "tensors that view the same storage as different dtypes "
                f"({self._storage_dtypes[sid].name} and {dtype.name}) cannot be saved "
                "(torch.save refuses them too); clone one of them"
            )
        return key

    def _persistent(self, ref: StorageRef, dtype: DType, *, untyped: bool = False) -> None:
        key = self.storage_key(ref, dtype)
        if dtype.storage_class is not None and not untyped:
            cls_module, cls_name = "torch", dtype.storage_class
            numel = ref.nbytes // dtype.itemsize
        else:
            cls_module, cls_name = "torch.storage", "UntypedStorage"
            numel = ref.nbytes
        out = self.out
        out += _MARK
        self._str_memo(_STORAGE)
        self._global(cls_module, cls_name)
        self._str_memo(key)
        self._str_memo(ref.location)
        self._int(numel)
        if self.legacy:
            self.out += b"N"
        self.out += b"t"
        self._put(None)
        self.out += b"Q"

    def _str_memo(self, text: str) -> None:
        hit = self.memo.get(id(text))
        if hit is not None:
            self._get(hit)
        else:
            self._str(text)

    def _tensor_ref(self, ref: TensorRef, original: Any = None) -> None:
        owner = original if original is not None else ref
        if ref.storage is None:
            raise self.fail(f"a {ref.location} tensor has no data to save")
        if ref.quantizer is not None:
            raise self.fail("quantized tensors are not supported by torchkeep.save")
        if not ref.dtype.has_tensors:
            raise self.fail(f"dtype {ref.dtype.name} cannot be saved (torch cannot either)")
        if self.legacy and ref.dtype.storage_class is None:
            raise self.fail(
                f"the legacy format cannot hold {ref.dtype.name} tensors (torch 2.13 fails to "
                "load them); use format='torch'"
            )
        wrapped = bool(ref.attrs) and not ref.parameter
        if wrapped:
            self._global("torch._tensor", "_rebuild_from_type_v2")
            self.out += _MARK
            self._rebuild_global(ref)
            self._global("torch", "Tensor")
            self._tensor_args(ref, requires_grad=ref.requires_grad)
            self._child("<attributes>", _FreshDict(ref.attrs or {}))
            self.out += b"t"
            self._put(None)
            self.out += b"R"
            self._put(owner)
            return
        if ref.parameter:
            name = "_rebuild_parameter_with_state" if ref.attrs else "_rebuild_parameter"
            self._global("torch._utils", name)
            if ref.attrs:
                self.out += _MARK
            self._tensor_plain(ref.with_(parameter=False, requires_grad=False, attrs=None), None)
            self._bool(ref.requires_grad)
            self._empty_ordered_dict()
            if ref.attrs:
                self._child("<attributes>", _FreshDict(ref.attrs))
                self.out += b"t"
            else:
                self.out += b"\x87"
            self._put(None)
            self.out += b"R"
            self._put(owner)
            return
        self._tensor_plain(ref, owner)

    def _rebuild_global(self, ref: TensorRef) -> None:
        v3 = ref.dtype.storage_class is None
        self._global("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")

    def _tensor_plain(self, ref: TensorRef, owner: Any) -> None:
        self._rebuild_global(ref)
        self._tensor_args(ref, requires_grad=ref.requires_grad)
        self.out += b"R"
        self._put(owner)

    def _tensor_args(self, ref: TensorRef, *, requires_grad: bool | None) -> None:
        assert ref.storage is not None
        self.out += _MARK
        self._persistent(ref.storage, ref.dtype)
        self._int(ref.offset)
        self._fresh_tuple(ref.shape)
        self._fresh_tuple(ref.stride)
        self._bool(bool(requires_grad))
        self._empty_ordered_dict()
        if ref.dtype.storage_class is None:
            self._global("torch", ref.dtype.name, dtypes.DTYPES.get(ref.dtype.name))
        if ref.conj or ref.neg:
            # torch builds these keys in C++: a fresh string each time, never a memo hit
            meta = {}
            if ref.conj:
                meta["".join(("con", "j"))] = True
            if ref.neg:
                meta["".join(("ne", "g"))] = True
            self.save(_FreshDict(meta))
        self.out += b"t"
        self._put(None)

    def _empty_ordered_dict(self) -> None:
        self._global("collections", "OrderedDict")
        self.out += b")R"
        self._put(None)

    # -- numpy -----------------------------------------------------------------------------

    def _numpy(self, obj: np.ndarray[Any, Any] | np.generic) -> None:
        dtype = obj.dtype
        if dtype.hasobject:
            raise self.fail("numpy arrays of Python objects cannot be saved")
        if dtype.names is not None or dtype.subdtype is not None:
            raise self.fail("structured numpy dtypes cannot be saved")
        func, args, *rest = obj.__reduce__()  # type: ignore[str-unpack]
        self._callable(func)
        self._numpy_value(args)
        self.out += b"R"
        self._put(obj)
        state = rest[0] if rest else None
        if state is not None:
            self._numpy_value(state)
            self.out += b"b"

    def _numpy_value(self, value: Any) -> None:
        """Save a value from numpy's own reduce tuples (functions, classes, dtypes)."""
        import numpy as np

        if isinstance(value, np.dtype):
            hit = self.memo.get(id(value))
            if hit is not None:
                self._get(hit)
                return
            func, args, state = value.__reduce__()  # type: ignore[str-unpack]
            self._callable(func)
            self._numpy_value(args)
            self.out += b"R"
            self._put(value)
            self._numpy_value(state)
            self.out += b"b"
        elif isinstance(value, type) or (callable(value) and not isinstance(value, np.ndarray)):
            self._callable(value)
        elif type(value) is tuple:
            hit = self.memo.get(id(value))
            if hit is not None:
                self._get(hit)
                return
            n = len(value)
            if n == 0:
                self.out += b")"
                return
            if n > 3:
                self.out += _MARK
            for item in value:
                self._numpy_value(item)
            self.out += b"t" if n > 3 else (b"\x85", b"\x86", b"\x87")[n - 1]
            self._put(value)
        else:
            self.save(value)

    def _callable(self, func: Any) -> None:
        module = getattr(func, "__module__", None)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
        if not module or not name or not module.startswith("numpy"):
            raise self.fail(f"cannot save a reference to {func!r}")
        self._global(module, name, func)
