"""The torch zip writer's pickle when torch is loaded: CPython's C pickler, lean reductions.

torch.save drives the same C pickler, but reduces each tensor through
``Tensor.__reduce_ex__`` (a TypedStorage per tensor, many checks) and a Python
``persistent_id`` doing isinstance tests on every object. Here each tensor becomes
``_rebuild_tensor_v2/v3`` arguments directly, and ``persistent_id`` is one type test.
The output is what torch.save writes, byte for byte; measured on 5000 tiny tensors the
pickling costs a third of torchkeep's hand-written pickler (which stays for torch-free
writing and trees of placeholders from parsed files).

Only what ``torchkeep.save`` accepts is pickled: anything else raises
UnsupportedTypeError naming where it sits in the tree.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from torchkeep.dtypes import DTYPES, DType
from torchkeep.errors import UnsupportedTypeError
from torchkeep.formats.pickler import REDUCED_TYPES, render_path
from torchkeep.tensors import check_saveable, location_of, unsupported_subclass
from torchkeep.tree import Device, PickledObject, Size, StorageView, Symbol, TensorRef
from torchkeep.unpickle.allowlist import Allowlist

__all__ = ["NeedsTreePickler", "StorageEntry", "pickle_torch_tree"]

_ALLOWED_GLOBALS = Allowlist().names | {
    "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "copyreg._reconstructor", "torch._utils._rebuild_tensor_v2",
}
_PLACEHOLDERS = (TensorRef, Size, Device, Symbol, StorageView, PickledObject, DType)
_PASS_THROUGH = (OrderedDict, collections.Counter, complex, torch.Size, torch.dtype,
                 torch.device, torch.layout, torch.qscheme, *REDUCED_TYPES)
_V2 = torch._utils._rebuild_tensor_v2
_V3 = torch._utils._rebuild_tensor_v3
_PARAMETER = torch._utils._rebuild_parameter
_PARAMETER_STATE = torch._utils._rebuild_parameter_with_state
_FROM_TYPE = torch._tensor._rebuild_from_type_v2
_UNTYPED = torch.storage.UntypedStorage
_NATIVE = frozenset({bool, int, float, str, bytes, bytearray, complex})
_STORAGE = "storage"


class NeedsTreePickler(Exception):
    """The tree holds torchkeep placeholders: the hand-written pickler handles those."""


class StorageEntry:
    """A storage met while pickling: its key, the storage, and the dtype it was typed as."""

    __slots__ = ("dtype", "key", "storage")

    def __init__(self, key: str, storage: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.key = key
        self.storage = storage
        self.dtype = dtype


class _StorageRef:
    """What a tensor's reduction names in place of its storage (persistent_id turns it
    into the ('storage', ...) tuple). ``dtype`` None: an UntypedStorage (v3 tensors)."""

    __slots__ = ("dtype", "entry")

    def __init__(self, entry: StorageEntry, dtype: torch.dtype | None) -> None:
        self.entry = entry
        self.dtype = dtype


class _EmptyHooks:
    """Stands for the empty backward-hooks OrderedDict of a tensor's reduction: pickles as
    ``OrderedDict()`` does, without the copyreg state lookup OrderedDict pays each time."""

    __slots__ = ()


_EMPTY_HOOKS_REDUCE = (OrderedDict, ())


def _storage_class(dtype: torch.dtype) -> Any:
    name = _LEGACY.get(dtype)
    return getattr(torch, name) if name else None


#: dtypes torch.save writes with a typed legacy storage class (and _rebuild_tensor_v2)
_LEGACY = {
    getattr(torch, d.name): d.storage_class
    for d in DTYPES.values() if d.storage_class and d.kind != "quantized"
}


class _Pickler(pickle.Pickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=2)
        self.entries: list[StorageEntry] = []
        self._by_storage: dict[int, StorageEntry] = {}
        self._classes: dict[torch.dtype, Any] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not _StorageRef:
            return None
        entry = obj.entry
        dtype = obj.dtype
        nbytes = entry.storage.nbytes()
        if dtype is None:
            cls: Any = _UNTYPED
            numel = nbytes
        else:
            cls = self._classes.get(dtype)
            if cls is None:
                cls = _storage_class(dtype)
                self._classes[dtype] = cls
            numel = nbytes // dtype.itemsize
        return (_STORAGE, cls, entry.key, location_of(entry.storage.device), numel)

    def _entry(self, storage: torch.UntypedStorage, dtype: torch.dtype) -> StorageEntry:
        cdata = storage._cdata
        entry = self._by_storage.get(cdata)
        if entry is None:
            entry = StorageEntry(str(len(self.entries)), storage, dtype)
            self.entries.append(entry)
            self._by_storage[cdata] = entry
        elif entry.dtype != dtype and (dtype in _LEGACY or entry.dtype in _LEGACY
                                       or dtype.itemsize != entry.dtype.itemsize):
            raise UnsupportedTypeError(
                "tensors that view the same storage as different dtypes "
                f"({str(entry.dtype)[6:]} and {str(dtype)[6:]}) cannot be saved "
                "(torch.save refuses them too); clone one of them")
        return entry

    def _tensor_args(self, t: torch.Tensor) -> tuple[Any, ...]:
        dtype = t.dtype
        entry = self._entry(t.untyped_storage(), dtype)
        legacy = dtype in _LEGACY
        args: tuple[Any, ...] = (
            _StorageRef(entry, dtype if legacy else None), t.storage_offset(),
            tuple(t.size()), t.stride(), t.requires_grad, _EmptyHooks(),
        )
        if not legacy:
            args = (*args, dtype)
        if t.is_conj() or t.is_neg():
            meta = {}
            if t.is_conj():
                meta["".join(("con", "j"))] = True  # fresh keys, as torch's C++ makes them
            if t.is_neg():
                meta["".join(("ne", "g"))] = True
            args = (*args, meta)
        return args

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is _EmptyHooks:
            return _EMPTY_HOOKS_REDUCE
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            check_saveable(obj)
            state = obj.__dict__
            if kind is torch.nn.Parameter:
                if state:
                    return (_PARAMETER_STATE, (obj.data, obj.requires_grad, _EmptyHooks(),
                                               dict(state)))
                return (_PARAMETER, (obj.data, obj.requires_grad, _EmptyHooks()))
            func = _V2 if obj.dtype in _LEGACY else _V3
            args = self._tensor_args(obj)
            if state:
                return (_FROM_TYPE, (func, torch.Tensor, args, dict(state)))
            return (func, args)
        if isinstance(obj, _PASS_THROUGH):
            return NotImplemented
        if isinstance(obj, (np.ndarray, np.generic)):
            if obj.dtype.hasobject or obj.dtype.names is not None or obj.dtype.subdtype:
                raise UnsupportedTypeError("numpy arrays of objects or structured dtypes "
                                           "cannot be saved")
            return NotImplemented
        if isinstance(obj, np.dtype) or kind is bytearray:
            return NotImplemented
        if isinstance(obj, (type, type(len), type(_is_storage_class))):
            name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
            if name.replace("__builtin__", "builtins") in _ALLOWED_GLOBALS or obj in (
                    _V2, _V3, _PARAMETER, _PARAMETER_STATE, _FROM_TYPE, torch.Tensor,
                    OrderedDict, collections.Counter, _UNTYPED) or _is_storage_class(obj):
                return NotImplemented
            raise UnsupportedTypeError(f"unsupported reference to {name}")
        if isinstance(obj, (torch.storage.TypedStorage, torch.UntypedStorage)):
            raise NeedsTreePickler
        if isinstance(obj, _PLACEHOLDERS):
            raise NeedsTreePickler
        if isinstance(obj, torch.Tensor):
            raise unsupported_subclass(kind)
        raise UnsupportedTypeError(
            f"unsupported type {kind.__module__}.{kind.__qualname__}; torchkeep saves tensors, "
            "containers, numbers, strings, bytes and numpy arrays, never arbitrary pickled "
            "objects")


def _is_storage_class(obj: Any) -> bool:
    return isinstance(obj, type) and obj.__module__ == "torch" and obj.__name__.endswith(
        "Storage")


def pickle_torch_tree(obj: Any) -> tuple[bytes, list[StorageEntry]]:
    """The data.pkl bytes of ``obj`` and the storages it references, in key order.

    Raises NeedsTreePickler for trees holding torchkeep placeholders, and
    UnsupportedTypeError (naming the path) for objects torchkeep does not save.
    """
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    try:
        pickler.dump(obj)
    except UnsupportedTypeError as e:
        raise UnsupportedTypeError(f"{_path_to_problem(obj, e)}: {e.reason}") from None
    except RecursionError:
        raise UnsupportedTypeError("obj: nesting too deep to save") from None
    return buffer.getvalue(), pickler.entries


def _path_to_problem(tree: Any, error: UnsupportedTypeError) -> str:
    """Where the first object the pickler refused sits (found only on the error path)."""
    probe = _Pickler(io.BytesIO())
    path: list[Any] = []
    seen: set[int] = set()

    def walk(node: Any) -> bool:
        if id(node) in seen:
            return False
        seen.add(id(node))
        if isinstance(node, dict):
            for key, value in node.items():
                path.append(key)
                if walk(value):
                    return True
                path.pop()
            return False
        if node is None or type(node) in _NATIVE:
            return False
        if isinstance(node, (set, frozenset)):
            return any(walk(value) for value in node)
        if isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                path.append(index)
                if walk(value):
                    return True
                path.pop()
            return False
        try:
            probe.reducer_override(node)
        except UnsupportedTypeError:
            return True
        except NeedsTreePickler:
            return False
        return False

    walk(tree)
    return render_path(path)
