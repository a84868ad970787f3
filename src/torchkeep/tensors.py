"""THE torch boundary: placeholders and storage bytes to torch objects, and back.

The only module of the file layers that imports torch. ``materialize_torch`` turns a
parsed tree into tensors (sharing storages, zero-copy over a memory map when it can);
``TorchDescriber`` turns torch objects into placeholders for the writers.
"""

from __future__ import annotations

import collections
import ctypes
from collections.abc import Callable
from typing import Any

import torch

from torchkeep import dtypes
from torchkeep.arrays import tensor_to_numpy
from torchkeep.dtypes import DType
from torchkeep.errors import (
    CorruptCheckpointError,
    DeviceError,
    FormatError,
    UnsupportedTypeError,
)
from torchkeep.formats.loader import StorageLoader
from torchkeep.formats.parsed import Parsed
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.tree import (
    Device,
    SparseRef,
    StorageRef,
    StorageView,
    Symbol,
    TensorRef,
    map_tree,
)
from torchkeep.tree import Size as SizeRef

__all__ = [
    "MapLocation",
    "TorchDescriber",
    "TorchMaterializer",
    "check_saveable",
    "from_torch_dtype",
    "location_of",
    "to_torch_dtype",
    "unsupported_subclass",
]

MapLocation = (
    None | str | torch.device | dict[str, str] | Callable[[torch.UntypedStorage, str], Any]
)

_CPU = "cpu"  # one interned object, as torch's location tagger returns


_TO_TORCH: dict[str, torch.dtype] = {}


def location_of(device: torch.device) -> str:
    """The location tag torch.save writes for ``device`` (``cpu``, ``cuda:0``...)."""
    return _CPU if device.type == _CPU else str(device)


def unsupported_subclass(kind: type) -> UnsupportedTypeError:
    """The error for a tensor subclass torchkeep does not save."""
    return UnsupportedTypeError(
        f"tensor subclass {kind.__module__}.{kind.__qualname__} is not supported; "
        "save a plain tensor (t.as_subclass(torch.Tensor))"
    )


def check_saveable(t: torch.Tensor) -> None:
    """Raise UnsupportedTypeError for a (plain) tensor torchkeep.save cannot write:
    sparse and other non-strided layouts, quantized and meta tensors."""
    if t.layout is not torch.strided:
        raise UnsupportedTypeError(f"{t.layout} tensors are not supported by torchkeep.save")
    if t.is_quantized:
        raise UnsupportedTypeError("quantized tensors are not supported by torchkeep.save")
    if t.is_meta:
        raise UnsupportedTypeError("meta tensors have no data to save")


def to_torch_dtype(dtype: DType) -> torch.dtype:
    """The torch.dtype of a torchkeep DType."""
    value = _TO_TORCH.get(dtype.name)
    if value is None:
        value = getattr(torch, dtype.name, None)
        if not isinstance(value, torch.dtype):
            raise FormatError(f"this torch ({torch.__version__}) has no dtype {dtype.name}")
        _TO_TORCH[dtype.name] = value
    return value


_FROM_TORCH: dict[torch.dtype, DType] = {}


def from_torch_dtype(dtype: torch.dtype) -> DType:
    """The torchkeep DType of a torch.dtype."""
    found = _FROM_TORCH.get(dtype)
    if found is None:
        found = dtypes.by_name(str(dtype))
        _FROM_TORCH[dtype] = found
    return found


# -- loading ---------------------------------------------------------------------------


class _Restorer:
    """Applies ``map_location`` to each storage, as ``torch.load`` does."""

    def __init__(self, map_location: MapLocation) -> None:
        self.map_location = map_location
        if isinstance(map_location, (str, torch.device)):
            target = str(map_location)
            self.fixed: str | None = target
        else:
            self.fixed = None

    def __call__(self, storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        from torch.serialization import default_restore_location

        where = self.map_location
        if where is None:
            target = location
        elif self.fixed is not None:
            target = self.fixed
        elif isinstance(where, dict):
            target = where.get(location, location)
        elif callable(where):
            result = where(storage, location)
            if result is None:
                target = location
            else:
                if isinstance(result, torch.storage.TypedStorage):
                    result = result._untyped_storage
                return result
        else:
            raise TypeError(f"map_location must be a str, torch.device, dict or callable, "
                            f"got {type(where).__name__}")
        if target == _CPU:
            return storage
        try:
            return default_restore_location(storage, target)
        except RuntimeError as e:
            where = f"on {target!r}" if target != location else "there"
            raise DeviceError(
                f"tensors were saved on {location!r} and cannot be placed {where}: "
                f"{str(e).splitlines()[0]} (pass map_location='cpu' to load on the CPU)"
            ) from e

    def device_of(self, location: str) -> str:
        """Where a storage-less tensor saved at ``location`` goes."""
        where = self.map_location
        if where is None or (callable(where) and not isinstance(where, dict)):
            return location
        if self.fixed is not None:
            return self.fixed
        assert isinstance(where, dict)
        return where.get(location, location)


class TorchMaterializer:
    """Turns a parsed file's placeholders into torch objects, one leaf or the whole tree.

    Tensors that shared a storage in the file share one here. With a memory map,
    tensor bytes are copy-on-write pages of the file: nothing is read until touched,
    and writes never reach the file. ``map_location`` has torch.load's meaning.
    """

    def __init__(
        self, parsed: Parsed, *, map_location: MapLocation = None, mmap: bool | None = None
    ) -> None:
        self.parsed = parsed
        self.loader = StorageLoader(parsed, mmap=mmap)
        self.restore = _Restorer(map_location)
        self._storages: dict[str, torch.UntypedStorage] = {}
        #: tensors built straight from their bytes, by storage key (their storage is theirs)
        self._owners: dict[str, torch.Tensor] = {}
        self._cpu = self.restore.fixed in (None, _CPU) and not callable(map_location) \
            and not isinstance(map_location, dict)

    def storage(self, ref: StorageRef, unit: int) -> torch.UntypedStorage:
        """The one torch storage of ``ref`` (created on first use, then shared)."""
        found = self._storages.get(ref.key)
        if found is not None:
            return found
        owner = self._owners.pop(ref.key, None)
        if owner is not None:  # made by the fast path below; share its storage
            found = owner.untyped_storage()
            self._storages[ref.key] = found
            return found
        data = self.loader.view_bytes(ref, unit)
        cpu = torch.from_numpy(data).untyped_storage() if data.nbytes else torch.UntypedStorage()
        placed = self.restore(cpu, ref.location)
        self._storages[ref.key] = placed
        return placed

    def _plain(self, ref: TensorRef, dtype: torch.dtype) -> torch.Tensor | None:
        """The common case, with fewer torch calls: a CPU tensor that is its whole storage,
        contiguous, with no flags. None when the general path is needed."""
        storage = ref.storage
        if (storage is None or storage.location != _CPU or storage.key in self._storages
                or storage.key in self._owners or ref.device is not None or ref.conj
                or ref.neg or ref.quantizer is not None or not ref.numel
                or storage.base is not None or not ref.covers_storage()):
            return None
        unit = ref.dtype.swap_unit
        data = self.loader.view_bytes(storage, unit)
        result = torch.from_numpy(data)
        if dtype is not torch.uint8:
            result = result.view(dtype)
        result = result.view(ref.shape)
        self._owners[storage.key] = result
        return result

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """The torch tensor a TensorRef describes."""
        dtype = to_torch_dtype(ref.dtype)
        plain = self._plain(ref, dtype) if self._cpu else None
        if plain is not None:
            result = plain
        elif ref.storage is None:
            device = self.restore.device_of(ref.location)
            result = torch.empty_strided(ref.shape, ref.stride, dtype=dtype, device=device)
        elif ref.quantizer is not None:
            result = _quantized(ref, self.storage(ref.storage, 1), dtype, self.tensor)
        else:
            unit = ref.dtype.swap_unit
            storage = self.storage(ref.storage, unit)
            # an empty uint8 tensor viewed as the dtype: torch.empty(dtype=...) would run a
            # fill kernel under use_deterministic_algorithms, which float4/bits dtypes lack
            result = torch.empty((0,), dtype=torch.uint8, device=storage.device).view(dtype)
            result.set_(storage, ref.offset, ref.shape, ref.stride)
            if ref.device is not None:
                target = self.restore.device_of(ref.device)
                try:
                    result = result.to(target)
                except RuntimeError as e:
                    raise DeviceError(f"cannot place a tensor saved on {ref.device!r} on "
                                      f"{target!r}: {str(e).splitlines()[0]} (pass "
                                      "map_location='cpu' to load on the CPU)") from e
            if ref.conj or ref.neg:  # torch sets a bit for every key present, True or not
                bits = {k: True for k, on in (("conj", ref.conj), ("neg", ref.neg)) if on}
                torch._utils.set_tensor_metadata(result, bits)
        if ref.parameter:
            result = torch.nn.Parameter(result, requires_grad=ref.requires_grad)
        elif ref.requires_grad:
            if not (result.is_floating_point() or result.is_complex()):
                raise CorruptCheckpointError(
                    f"a {ref.dtype.name} tensor cannot require grad")
            result.requires_grad_(True)
        if ref.attrs:
            _set_attributes(result, ref.attrs)
        return result

    def convert(self, leaf: Any) -> Any:
        """The torch value of one placeholder (other values come back unchanged)."""
        if isinstance(leaf, TensorRef):
            if leaf.numpy:
                return tensor_to_numpy(self.loader, leaf)
            return self.tensor(leaf)
        if isinstance(leaf, SparseRef):
            return _sparse(leaf, self.tensor)
        if isinstance(leaf, SizeRef):
            return torch.Size(leaf)
        if isinstance(leaf, DType):
            return to_torch_dtype(leaf)
        if isinstance(leaf, Device):
            try:
                return torch.device(str(leaf))
            except RuntimeError as e:
                raise CorruptCheckpointError(f"bad device {str(leaf)!r}: {e}") from e
        if isinstance(leaf, Symbol):
            return _symbol(leaf)
        if isinstance(leaf, StorageView):
            storage = self.storage(leaf.storage, leaf.dtype.swap_unit)
            if leaf.untyped:
                return storage
            return torch.storage.TypedStorage(
                wrap_storage=storage, dtype=to_torch_dtype(leaf.dtype), _internal=True
            )
        return leaf

    def tree(self, *, limits: Limits = DEFAULT_LIMITS) -> Any:
        """The whole tree with torch values in place of placeholders."""
        self.loader.prefetch()
        return map_tree(self.parsed.tree, self.convert, limits=limits)


def _set_attributes(tensor: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Python attributes a tensor carried; never ones that shadow torch's own."""
    for name in attrs:
        if hasattr(torch.Tensor, name) or hasattr(torch.nn.Parameter, name):
            raise CorruptCheckpointError(
                f"tensor attribute {name!r} would replace torch.Tensor.{name}")
    try:
        for name, value in attrs.items():
            setattr(tensor, name, value)
    except (TypeError, AttributeError, RuntimeError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot set tensor attributes: {e}") from e


def _symbol(leaf: Symbol) -> Any:
    if leaf.kind == "tensortype":
        obj: Any = torch
        for part in leaf.name.split(".")[1:]:
            obj = getattr(obj, part)
        return obj
    return getattr(torch, leaf.name)


def _quantized(
    ref: TensorRef,
    storage: torch.UntypedStorage,
    dtype: torch.dtype,
    tensor: Callable[[TensorRef], torch.Tensor],
) -> torch.Tensor:
    assert ref.quantizer is not None
    scheme = ref.quantizer[0]
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    if scheme == "per_tensor_affine":
        params: tuple[Any, ...] = (torch.per_tensor_affine, ref.quantizer[1], ref.quantizer[2])
    else:
        params = (getattr(torch, scheme), tensor(ref.quantizer[1]), tensor(ref.quantizer[2]),
                  ref.quantizer[3])
    return torch._utils._rebuild_qtensor(
        typed, ref.offset, ref.shape, ref.stride, params, False, collections.OrderedDict()
    )


def _sparse(leaf: SparseRef, tensor: Callable[[TensorRef], torch.Tensor]) -> torch.Tensor:
    parts = [tensor(p) for p in leaf.parts]
    size = torch.Size(leaf.size)
    try:
        if leaf.layout == "sparse_coo":
            result = torch.sparse_coo_tensor(
                parts[0], parts[1], size, is_coalesced=leaf.coalesced, check_invariants=True
            )
        else:
            make = {
                "sparse_csr": torch.sparse_csr_tensor,
                "sparse_csc": torch.sparse_csc_tensor,
                "sparse_bsr": torch.sparse_bsr_tensor,
                "sparse_bsc": torch.sparse_bsc_tensor,
            }[leaf.layout]
            result = make(parts[0], parts[1], parts[2], size, check_invariants=True)
    except (RuntimeError, ValueError, IndexError) as e:
        raise FormatError(f"invalid {leaf.layout} tensor: {e}") from e
    return result


# -- saving ---------------------------------------------------------------------------


class TorchDescriber:
    """Describes torch objects as placeholders and serves their storage bytes.

    One StorageRef per distinct storage (by identity), so tensors that share a storage
    are written once and share it again on load.
    """

    def __init__(self) -> None:
        self._refs: dict[int, StorageRef] = {}
        self._storages: dict[int, torch.UntypedStorage] = {}

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, torch.Size):
            return SizeRef(obj)
        if isinstance(obj, torch.dtype):
            return from_torch_dtype(obj)
        if isinstance(obj, torch.device):
            return Device(obj.type, obj.index)
        if isinstance(obj, torch.layout):
            return Symbol("layout", str(obj).removeprefix("torch."))
        if isinstance(obj, torch.qscheme):
            return Symbol("qscheme", str(obj).removeprefix("torch."))
        if isinstance(obj, torch.storage.TypedStorage):
            return StorageView(self.storage_ref(obj._untyped_storage, from_torch_dtype(obj.dtype)),
                               from_torch_dtype(obj.dtype))
        if isinstance(obj, torch.UntypedStorage):
            uint8 = dtypes.DTYPES["uint8"]
            return StorageView(self.storage_ref(obj, uint8), uint8, untyped=True)
        return None

    def storage_ref(self, storage: torch.UntypedStorage, dtype: DType) -> StorageRef:
        """The one StorageRef of ``storage``."""
        key = storage._cdata
        ref = self._refs.get(key)
        if ref is None:
            ref = StorageRef(str(len(self._refs)), dtype, storage.nbytes(),
                             location_of(storage.device))
            self._refs[key] = ref
            self._storages[id(ref)] = storage
        return ref

    def tensor(self, t: torch.Tensor) -> TensorRef:
        """A torch tensor as a TensorRef over its (whole) storage."""
        kind = type(t)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            raise unsupported_subclass(kind)
        check_saveable(t)
        dtype = from_torch_dtype(t.dtype)
        ref = self.storage_ref(t.untyped_storage(), dtype)
        state = torch._utils._get_obj_state(t)
        attrs = None
        if state:
            attrs = dict(state[0] or {}) | dict(state[1] or {}) if isinstance(state, tuple) \
                else dict(state)
        return TensorRef(
            storage=ref,
            dtype=dtype,
            offset=int(t.storage_offset()),
            shape=tuple(t.shape),
            stride=t.stride(),
            requires_grad=t.requires_grad,
            parameter=isinstance(t, torch.nn.Parameter),
            conj=t.is_conj(),
            neg=t.is_neg(),
            attrs=attrs or None,
        )

    def storage_bytes(self, ref: StorageRef) -> memoryview:
        """The bytes of a storage, in native byte order (copied to CPU when needed)."""
        return cpu_bytes(self._storages[id(ref)])


def cpu_bytes(storage: torch.UntypedStorage) -> memoryview:
    """A storage's bytes as a memoryview (a view for CPU storages, else a copy to CPU).

    The view addresses the storage's memory directly (ctypes): building a uint8 tensor
    and its numpy view cost 3.6 us a storage, which showed on files of many small tensors.
    The caller keeps ``storage`` alive while it uses the view.
    """
    if storage.device.type != "cpu":
        storage = storage.cpu()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * nbytes).from_address(storage.data_ptr())).cast("B")

