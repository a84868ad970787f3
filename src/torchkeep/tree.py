"""Torch-free placeholder values a parsed checkpoint tree is made of, and walks over trees."""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torchkeep.dtypes import DType
from torchkeep.errors import CorruptCheckpointError, FormatError, shown
from torchkeep.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "Device",
    "PickledObject",
    "Size",
    "SparseRef",
    "StorageRef",
    "StorageView",
    "Symbol",
    "TensorInfo",
    "TensorRef",
    "deep_recursion",
    "iter_tensors",
    "join_path",
    "map_tree",
    "plain_attribute_name",
    "view_problem",
    "walk_tree",
]


@dataclass(eq=False, slots=True)
class StorageRef:
    """One storage a checkpoint declares: which record holds it and how many bytes it has.

    ``key`` names the record within its file (``"0"`` for ``data/0``, a pointer string in
    the legacy format, a tensor name in safetensors). ``dtype`` is the dtype the storage
    was typed as when it was pickled (uint8 for an untyped storage). A legacy view storage
    has ``base`` set and starts ``base_offset`` bytes into it.
    """

    key: str
    dtype: DType
    nbytes: int
    location: str = "cpu"
    base: StorageRef | None = None
    base_offset: int = 0

    @property
    def root(self) -> StorageRef:
        """The storage that owns the bytes (itself unless this is a legacy view)."""
        return self.base.root if self.base is not None else self


@dataclass(eq=False, slots=True)
class StorageView:
    """A storage as the pickle refers to it: the storage plus the dtype it is typed as.

    Appears in a tree only when a bare storage (not a tensor) was saved.
    """

    storage: StorageRef
    dtype: DType
    #: an ``UntypedStorage`` (its size counts bytes) rather than a typed storage
    untyped: bool = False


@dataclass(eq=False, slots=True)
class TensorRef:
    """A tensor as a checkpoint describes it: a view (offset, shape, stride in elements)
    of a storage, without its bytes.

    ``storage`` is None for meta tensors. ``quantizer`` holds the quantization parameters
    of a quantized tensor: ``("per_tensor_affine", scale, zero_point)`` or
    ``("per_channel_affine", scales, zero_points, axis)`` with the two tensors as
    TensorRefs. ``attrs`` holds Python attributes the tensor carried.
    """

    storage: StorageRef | None
    dtype: DType
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    parameter: bool = False
    conj: bool = False
    neg: bool = False
    device: str | None = None
    quantizer: tuple[Any, ...] | None = None
    attrs: dict[str, Any] | None = None
    #: a numpy array stored as a tensor record: both backends give an ndarray back
    numpy: bool = False

    @property
    def numel(self) -> int:
        """Number of elements in the view."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the view's elements occupy when contiguous."""
        return self.numel * self.dtype.itemsize

    @property
    def location(self) -> str:
        """The device the tensor was saved from (``cpu``, ``cuda:0``, ``meta``)."""
        if self.device is not None:
            return self.device
        return self.storage.location if self.storage is not None else "meta"

    def is_contiguous(self) -> bool:
        """True when the view is C-contiguous (size-1 dimensions may have any stride)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def covers_storage(self) -> bool:
        """True when the view is contiguous, starts at 0 and spans its whole storage."""
        return (
            self.storage is not None
            and self.offset == 0
            and self.is_contiguous()
            and self.nbytes == self.storage.nbytes
        )

    def with_(self, **changes: Any) -> TensorRef:
        """A copy with some fields changed."""
        return replace(self, **changes)


class Size(tuple[int, ...]):
    """Torch-free stand-in for ``torch.Size``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"torchkeep.Size({list(self)!r})"


@dataclass(frozen=True, slots=True)
class Device:
    """Torch-free stand-in for ``torch.device``."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"torchkeep.device({str(self)!r})"


@dataclass(frozen=True, slots=True)
class Symbol:
    """A named torch constant with no data: a layout (``torch.sparse_coo``), a qscheme."""

    kind: str
    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@dataclass(eq=False, slots=True)
class SparseRef:
    """A sparse tensor: its layout, its component tensors and its dense size."""

    layout: str
    parts: tuple[Any, ...]
    size: tuple[int, ...]
    coalesced: bool | None = None
    requires_grad: bool = False

    @property
    def dtype(self) -> DType:
        """The element type: that of the values part (the last one, after the indices)."""
        return self.parts[-1].dtype  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        """Bytes of all the parts together (indices and values)."""
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What a checkpoint records about one tensor, without reading its bytes.

    The one description of a tensor: ``torchkeep.open(f).tensors`` and
    ``torchkeep.inspect(f).tensors`` list these. ``device`` is where it was saved
    (``cpu``, ``cuda:0``); ``layout`` is ``strided`` or a sparse layout; ``ref`` is the
    placeholder it describes (what ``CheckpointHandle.tensor`` reads).
    """

    name: str
    path: tuple[Any, ...]
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    device: str
    layout: str = "strided"
    requires_grad: bool = False
    parameter: bool = False
    ref: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, path: tuple[Any, ...], leaf: Any) -> TensorInfo | None:
        """The description of a placeholder leaf at ``path`` (None for other values)."""
        name = join_path(path)
        if isinstance(leaf, TensorRef):
            return cls(name, path, leaf.dtype.name, leaf.shape, leaf.nbytes, leaf.location,
                       requires_grad=leaf.requires_grad, parameter=leaf.parameter, ref=leaf)
        if isinstance(leaf, SparseRef):
            return cls(name, path, leaf.dtype.name, leaf.size, leaf.nbytes, "cpu",
                       layout=leaf.layout, requires_grad=leaf.requires_grad, ref=leaf)
        if isinstance(leaf, StorageView):
            storage = leaf.storage
            return cls(name, path, leaf.dtype.name, (storage.nbytes // leaf.dtype.itemsize,),
                       storage.nbytes, storage.location, ref=leaf)
        return None


@dataclass(eq=False, slots=True)
class PickledObject:
    """An object of a global the caller allowed by name only: what the pickle said, inert.

    Nothing is imported or called to build it. ``args`` are the constructor arguments,
    ``state`` the BUILD state, ``items`` what APPEND(S) added and ``dict_items`` the
    ``(key, value)`` pairs SETITEM(S) added. ``torchkeep.save`` writes it back as the
    same global, called with the same arguments. Tensors inside are loaded like any other.
    """

    module: str
    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    items: list[Any] = field(default_factory=list)
    dict_items: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def qualname(self) -> str:
        """``module.name`` of the global."""
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"PickledObject({self.qualname}, args={shown(self.args)}, state={shown(self.state)})"


#: Bound on any one size, stride or offset of a view (64-bit arithmetic stays exact).
MAX_DIMENSION = 1 << 46


def view_problem(
    nbytes: int | None,
    dtype: DType,
    offset: Any,
    shape: Any,
    stride: Any,
    limits: Limits = DEFAULT_LIMITS,
) -> str | None:
    """Why a view (offset, shape, stride in elements of ``dtype``) of a storage of
    ``nbytes`` bytes is invalid, or None when it is valid.

    The checks torch's ``set_`` makes, and more: ints only, no negative offset, size or
    stride, every value below 2**46, every element inside the storage (``nbytes=None``:
    a tensor without storage, not checked). Dims and element count beyond ``limits`` raise
    LimitExceededError.
    """
    if not dtype.has_tensors:
        return f"dtype {dtype.name} cannot back a tensor"
    values = (offset, *shape, *stride)
    for v in values:  # a loop, not all(genexpr): this runs once per tensor of every load
        if type(v) is not int:
            return "offset, shape and stride must be ints"
    if len(shape) != len(stride):
        return f"shape {list(shape)} and stride {list(stride)} differ in length"
    if len(shape) > limits.max_tensor_dims:
        limits.check("max_tensor_dims", len(shape), "tensor dimensions")
    if min(values) < 0:
        return (f"negative offset, size or stride (offset {offset}, shape {list(shape)}, "
                f"stride {list(stride)})")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        limits.check("max_tensor_elements", numel, "tensor elements")
    if max(values) >= MAX_DIMENSION:
        return "a size, stride or offset of 2**46 or more"
    itemsize = dtype.itemsize
    if nbytes is None:
        return None
    if numel == 0:  # an empty view reads nothing; torch accepts any offset for it
        return None
    last = offset
    for size, step in zip(shape, stride, strict=True):
        last += (size - 1) * step
    if (last + 1) * itemsize > nbytes:
        return (f"view (offset {offset}, shape {list(shape)}, stride {list(stride)}, "
                f"{dtype.name}) reaches byte {(last + 1) * itemsize}, outside its storage "
                f"of {nbytes} bytes")
    return None


def plain_attribute_name(name: Any) -> bool:
    """True for a name that can only set a plain attribute: an identifier without a
    leading ``__`` (never ``__class__``, ``__dict__``, ``__setstate__``...)."""
    return isinstance(name, str) and name.isidentifier() and not name.startswith("__")


def join_path(path: Sequence[Any]) -> str:
    """The ``/``-joined display name of a tree path."""
    return "/".join(str(p) for p in path)


@contextlib.contextmanager
def deep_recursion(limits: Limits = DEFAULT_LIMITS) -> Iterator[None]:
    """Room on the Python stack for walks ``limits.max_depth`` levels deep.

    A recursive walk spends several frames per level; without this, Python's default
    limit of 1000 frames would be hit before the ``max_depth`` check could fire.
    """
    previous = sys.getrecursionlimit()
    needed = limits.max_depth * 8 + 1000
    if previous < needed:
        sys.setrecursionlimit(needed)
    try:
        yield
    finally:
        if previous < needed:
            sys.setrecursionlimit(previous)


def walk_tree(
    tree: Any,
    *,
    limits: Limits = DEFAULT_LIMITS,
    repeat: Callable[[tuple[Any, ...], tuple[Any, ...], bool], Any] | None = None,
    only: type | tuple[type, ...] = object,
) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, value)`` for every value of ``tree`` that is not a non-empty dict, list or
    tuple (a Size is a value, an empty container too), in tree order; with ``only``,
    just the values of those types.

    A container reached again (a shared sub-tree, or a cycle) is walked only the first
    time, so a pickle that shares one list at every level cannot make the walk
    exponential; ``repeat(path, first_path, is_cycle)`` returns what to list at ``path``
    in its place (None: nothing) or raises. Nesting deeper than ``limits.max_depth``
    raises LimitExceededError.
    """
    found: list[tuple[tuple[Any, ...], Any]] = []
    first_path: dict[int, tuple[Any, ...]] = {}
    active: set[int] = set()

    def walk(obj: Any, path: tuple[Any, ...]) -> None:
        if not isinstance(obj, _BRANCHES) or not _children(obj) or isinstance(obj, Size):
            if isinstance(obj, only):
                found.append((path, obj))
            return
        if len(path) >= limits.max_depth:
            limits.check("max_depth", len(path) + 1, "nesting depth")
        oid = id(obj)
        known = first_path.get(oid)
        if known is not None:
            stand_in = None if repeat is None else repeat(path, known, oid in active)
            if stand_in is not None:
                found.append((path, stand_in))
            return
        first_path[oid] = path
        active.add(oid)
        for key, value in _children(obj):
            walk(value, (*path, key))
        active.discard(oid)

    with deep_recursion(limits):
        walk(tree, ())
    return found


def _refuse_cycles(path: tuple[Any, ...], first: tuple[Any, ...], is_cycle: bool) -> None:
    if is_cycle:
        raise CorruptCheckpointError(f"the object tree has a cycle at {join_path(path)!r}")


def iter_tensors(
    tree: Any, *, limits: Limits = DEFAULT_LIMITS
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Yield ``(path, leaf)`` for every TensorRef / SparseRef in ``tree``, in tree order.

    A leaf reached twice (tied weights) is yielded at each path; a shared sub-tree is
    walked once (see walk_tree). Cycles raise CorruptCheckpointError and nesting deeper
    than ``limits.max_depth`` LimitExceededError, before anything is yielded.
    """
    yield from walk_tree(tree, limits=limits, repeat=_refuse_cycles, only=(TensorRef, SparseRef))


def map_tree(tree: Any, leaf: Callable[[Any], Any], *, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Rebuild ``tree`` with every placeholder replaced by ``leaf(placeholder)``.

    Containers are rebuilt (never mutated), shared sub-trees stay shared, and the same
    placeholder object maps to the same result object, so tied weights stay tied.
    ``leaf`` is called for TensorRef, SparseRef, Size, Device, Symbol and DType values;
    other scalars are kept; inert records and Namespaces are rebuilt around their
    converted contents. OrderedDict ``_metadata`` survives.
    Cycles and nesting deeper than ``limits.max_depth`` raise FormatError.
    """
    done: dict[int, Any] = {}
    active: set[int] = set()
    keep: list[Any] = []  # keeps ids in ``done`` valid for the whole walk

    def walk(obj: Any, depth: int) -> Any:
        kind = type(obj)
        if kind in _SCALARS:
            return obj
        oid = id(obj)
        hit = done.get(oid, _MISSING)
        if hit is not _MISSING:
            return hit
        if isinstance(obj, _LEAVES):
            result = leaf(obj)
        elif kind in _CONTAINERS or isinstance(obj, _BRANCHES):
            if depth >= limits.max_depth:
                limits.check("max_depth", depth + 1, "nesting depth")
            if oid in active:
                raise CorruptCheckpointError("the object tree has a cycle")
            active.add(oid)
            try:
                result = _rebuild_container(obj, lambda v: walk(v, depth + 1))
            finally:
                active.discard(oid)
        else:
            return obj
        done[oid] = result
        keep.append(obj)
        return result

    with deep_recursion(limits):
        return walk(tree, 0)


def _rebuild_container(obj: Any, convert: Callable[[Any], Any]) -> Any:
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: convert(v) for k, v in obj.items()}
        if isinstance(obj, collections.OrderedDict):
            new: Any = collections.OrderedDict((k, convert(v)) for k, v in obj.items())
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                new._metadata = meta
            new.__dict__.update(
                {name: convert(value) for name, value in vars(obj).items() if name != "_metadata"}
            )
            return new
        if isinstance(obj, collections.Counter):
            return collections.Counter({k: convert(v) for k, v in obj.items()})
        # a dict subclass the caller allowed (allow=[cls]) stays an instance of its class:
        # a shallow copy (the class's own copy protocol), its items converted
        items = {k: convert(v) for k, v in obj.items()}
        same = copy.copy(obj)
        dict.clear(same)
        dict.update(same, items)
        _convert_attributes(same, obj, convert)
        return same
    if isinstance(obj, list):
        if type(obj) is list:
            return [convert(v) for v in obj]
        values = [convert(v) for v in obj]
        copied: list[Any] = copy.copy(obj)
        list.clear(copied)
        list.extend(copied, values)
        _convert_attributes(copied, obj, convert)
        return copied
    if isinstance(obj, tuple):
        values = [convert(v) for v in obj]
        if hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*values)
        return tuple(values)
    if isinstance(obj, PickledObject):
        return PickledObject(obj.module, obj.name, tuple(convert(v) for v in obj.args),
                             convert(obj.state), [convert(v) for v in obj.items],
                             [(k, convert(v)) for k, v in obj.dict_items])
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: convert(v) for k, v in vars(obj).items()})
    raise FormatError(f"cannot rebuild container of type {type(obj).__name__}")


def _convert_attributes(new: Any, old: Any, convert: Callable[[Any], Any]) -> None:
    if hasattr(old, "__dict__"):
        new.__dict__.update({name: convert(value) for name, value in vars(old).items()})


def _children(obj: Any) -> Any:
    """(key, value) pairs below a branch of the tree (``state``, ``args`` ... of an inert
    record; a Namespace's attributes)."""
    if isinstance(obj, dict):
        return obj.items()
    if isinstance(obj, PickledObject):
        return [(name, value) for name, value in (
            ("args", obj.args), ("state", obj.state), ("items", obj.items),
            ("dict_items", obj.dict_items)) if value]
    if isinstance(obj, argparse.Namespace):
        return vars(obj).items()
    return enumerate(obj)


_MISSING = object()
_SCALARS = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})
_CONTAINERS = frozenset({dict, list, tuple, collections.OrderedDict})
#: what a walk descends into: containers, inert records and Namespaces (tensors inside
#: them are loaded like any other)
_BRANCHES = (dict, list, tuple, PickledObject, argparse.Namespace)
_LEAVES = (TensorRef, SparseRef, StorageView, Size, Device, Symbol, DType)
