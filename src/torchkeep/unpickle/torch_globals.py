"""The torch globals a checkpoint may name: tensor rebuild functions, storages, dtypes,
Size, device, layouts and qschemes, each a torch-free stand-in that checks its arguments
and builds a placeholder (TensorRef, Size ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torchkeep import dtypes
from torchkeep.dtypes import DType
from torchkeep.errors import CorruptCheckpointError, shown
from torchkeep.tree import (
    Device,
    Size,
    SparseRef,
    StorageView,
    Symbol,
    TensorRef,
    view_problem,
)
from torchkeep.unpickle.entries import (
    Call,
    Entry,
    Machine,
    attribute_state,
    bool_arg,
    int_arg,
    ints_arg,
    marker,
)

__all__ = ["DEVICE_TYPES", "LOCATION", "StorageClass", "storage_pid", "torch_table"]


@dataclass(frozen=True, slots=True)
class StorageClass:
    """A storage class named in a persistent id (``torch.FloatStorage``, ``UntypedStorage``)."""

    name: str
    dtype: DType  # uint8 for UntypedStorage: its numel counts bytes

    @property
    def untyped(self) -> bool:
        """True for ``UntypedStorage``."""
        return self.name == "UntypedStorage"


#: locations LOCATION has accepted ("cpu", "cuda:0", ...): one regex match per location
_GOOD_LOCATIONS: set[str] = set()


def storage_pid(pid: Any, length: int) -> tuple[StorageClass, str, str, int, tuple[Any, ...]]:
    """Check a ``('storage', class, key, location, numel, ...)`` persistent id of ``length``
    fields; returns class, key, location, numel and the extra fields."""
    if not isinstance(pid, tuple) or len(pid) != length or pid[0] != "storage":
        raise CorruptCheckpointError(
            f"persistent id is not a {length}-field ('storage', ...) tuple")
    _, storage_class, key, location, numel, *extra = pid
    if not isinstance(storage_class, StorageClass):
        raise CorruptCheckpointError("persistent id does not name a storage class")
    if type(key) is not str or type(location) is not str or type(numel) is not int:
        raise CorruptCheckpointError("persistent id fields have the wrong types")
    if location not in _GOOD_LOCATIONS:
        if not LOCATION.match(location):
            raise CorruptCheckpointError(f"storage {key}: bad location {location[:40]!r}")
        if len(_GOOD_LOCATIONS) < 64:
            _GOOD_LOCATIONS.add(location)
    if numel < 0:
        raise CorruptCheckpointError(f"storage {key} has a negative size")
    return storage_class, key, location, numel, tuple(extra)


def _tensor_metadata(m: Machine, metadata: Any) -> tuple[bool, bool]:
    if metadata is None:
        return False, False
    if not isinstance(metadata, dict):
        raise m.fail("tensor metadata must be a dict")
    unknown = set(metadata) - {"conj", "neg"}
    if unknown:
        raise m.fail(f"unknown tensor metadata {sorted(map(str, unknown))}")
    return bool(metadata.get("conj", False)), bool(metadata.get("neg", False))


def _storage_view(m: Machine, value: Any) -> StorageView:
    if not isinstance(value, StorageView):
        raise m.fail(f"tensor storage must be a persistent storage, got {type(value).__name__}")
    return value


def _hooks(m: Machine, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise m.fail("backward hooks must be an OrderedDict")


def _make_tensor(
    m: Machine,
    view: StorageView,
    dtype: DType,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    metadata: Any = None,
) -> TensorRef:
    offset = int_arg(m, offset, "storage offset")
    shape = ints_arg(m, size, "size")
    strides = ints_arg(m, stride, "stride")
    problem = view_problem(view.storage.nbytes, dtype, offset, shape, strides, m.limits)
    if problem is not None:
        raise m.fail(f"tensor {problem}")
    conj, neg = _tensor_metadata(m, metadata)
    return TensorRef(
        storage=view.storage,
        dtype=dtype,
        offset=offset,
        shape=shape,
        stride=strides,
        requires_grad=bool_arg(m, requires_grad, "requires_grad"),
        conj=conj,
        neg=neg,
    )


# -- torch rebuild functions --------------------------------------------------------------


def _rebuild_tensor(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    storage, offset, size, stride = args
    view = _storage_view(m, storage)
    return _make_tensor(m, view, view.dtype, offset, size, stride, False)


def _rebuild_tensor_v2(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    if len(args) == 6:  # what torch.save writes for every plain tensor: checked in one go
        storage, offset, size, stride, requires_grad, hooks = args
        if (type(storage) is StorageView and type(size) is tuple and type(stride) is tuple
                and type(requires_grad) is bool and (hooks is None or isinstance(hooks, dict))
                and len(size) <= m.limits.max_tensor_dims
                and view_problem(storage.storage.nbytes, storage.dtype, offset, size, stride,
                                 m.limits) is None):
            return TensorRef(storage.storage, storage.dtype, offset, size, stride,
                             requires_grad)
        # anything else: the general path below, which names what is wrong
    if len(args) not in (6, 7):
        raise m.fail(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    storage, offset, size, stride, requires_grad, hooks, *rest = args
    _hooks(m, hooks)
    view = _storage_view(m, storage)
    metadata = rest[0] if rest else None
    return _make_tensor(m, view, view.dtype, offset, size, stride, requires_grad, metadata)


def _rebuild_tensor_v3(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    if len(args) not in (7, 8):
        raise m.fail(f"_rebuild_tensor_v3 takes 7 or 8 arguments, got {len(args)}")
    storage, offset, size, stride, requires_grad, hooks, dtype, *rest = args
    _hooks(m, hooks)
    if not isinstance(dtype, DType):
        raise m.fail("_rebuild_tensor_v3 dtype must be a torch dtype")
    view = _storage_view(m, storage)
    metadata = rest[0] if rest else None
    return _make_tensor(m, view, dtype, offset, size, stride, requires_grad, metadata)


def _tensor_arg(m: Machine, value: Any, what: str) -> TensorRef:
    if not isinstance(value, TensorRef):
        raise m.fail(f"{what} must be a tensor, got {type(value).__name__}")
    return value


def _rebuild_parameter(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    data, requires_grad, hooks = args
    _hooks(m, hooks)
    tensor = _tensor_arg(m, data, "Parameter data")
    return tensor.with_(parameter=True, requires_grad=bool_arg(m, requires_grad, "requires_grad"))


def _rebuild_parameter_with_state(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    data, requires_grad, hooks, state = args
    tensor = _rebuild_parameter(m, (data, requires_grad, hooks))
    tensor.attrs = attribute_state(m, state, "Parameter") or None
    return tensor


def _rebuild_from_type_v2(m: Machine, args: tuple[Any, ...]) -> Any:
    func, new_type, func_args, state = args
    if not isinstance(new_type, Entry) or new_type.qualname not in _TENSOR_CLASSES:
        raise m.fail(f"tensor subclass {shown(new_type)} is not supported")
    result = m.call(func, func_args, "REDUCE")
    tensor = _tensor_arg(m, result, "_rebuild_from_type_v2 result")
    if new_type.qualname == "torch.nn.parameter.Parameter" and not tensor.parameter:
        tensor = tensor.with_(parameter=True)
    attrs = attribute_state(m, state, "tensor")
    if attrs:
        tensor = tensor.with_(attrs={**(tensor.attrs or {}), **attrs})
    return tensor


def _parameter_new(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    # Parameter.__new__(cls, data=None, requires_grad=True)
    data = args[0] if args else None
    requires_grad = args[1] if len(args) > 1 else True
    tensor = _tensor_arg(m, data, "Parameter data")
    return tensor.with_(parameter=True, requires_grad=bool_arg(m, requires_grad, "requires_grad"))


_QSCHEMES = {
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
}


def _rebuild_qtensor(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    storage, offset, size, stride, qparams, requires_grad, hooks = args
    _hooks(m, hooks)
    view = _storage_view(m, storage)
    if view.dtype.kind != "quantized":
        raise m.fail(f"_rebuild_qtensor on a {view.dtype.name} storage")
    tensor = _make_tensor(m, view, view.dtype, offset, size, stride, requires_grad)
    if not isinstance(qparams, tuple) or not qparams or not isinstance(qparams[0], Symbol):
        raise m.fail("quantizer parameters must start with a qscheme")
    scheme = qparams[0].name
    if scheme in ("per_tensor_affine", "per_tensor_symmetric"):
        if len(qparams) != 3 or type(qparams[1]) is not float or type(qparams[2]) is not int:
            raise m.fail("per-tensor quantizer needs (scheme, float scale, int zero_point)")
        tensor.quantizer = ("per_tensor_affine", qparams[1], qparams[2])
    elif scheme in ("per_channel_affine", "per_channel_affine_float_qparams"):
        if len(qparams) != 4:
            raise m.fail("per-channel quantizer needs (scheme, scales, zero_points, axis)")
        scales = _tensor_arg(m, qparams[1], "scales")
        zero_points = _tensor_arg(m, qparams[2], "zero_points")
        axis = int_arg(m, qparams[3], "axis")
        if not 0 <= axis < len(tensor.shape):
            raise m.fail(f"quantization axis {axis} outside a {len(tensor.shape)}-d tensor")
        channels = tensor.shape[axis]
        if scales.numel != channels or zero_points.numel != channels:
            raise m.fail("per-channel scales/zero_points do not match the channel count")
        tensor.quantizer = (scheme, scales, zero_points, axis)
    else:
        raise m.fail(f"unsupported qscheme {scheme}")
    return tensor


def _rebuild_sparse_tensor(m: Machine, args: tuple[Any, ...]) -> SparseRef:
    layout, data = args
    if not isinstance(layout, Symbol) or layout.kind != "layout":
        raise m.fail("sparse tensor layout must be a torch layout")
    if not isinstance(data, tuple):
        raise m.fail("sparse tensor data must be a tuple")
    if layout.name == "sparse_coo":
        if len(data) not in (3, 4):
            raise m.fail("sparse COO data needs (indices, values, size[, coalesced])")
        indices = _tensor_arg(m, data[0], "indices")
        values = _tensor_arg(m, data[1], "values")
        size = ints_arg(m, data[2], "size")
        coalesced = data[3] if len(data) == 4 else None
        if coalesced is not None:
            bool_arg(m, coalesced, "is_coalesced")
        return SparseRef("sparse_coo", (indices, values), size, coalesced)
    if layout.name in ("sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"):
        if len(data) != 4:
            raise m.fail("compressed sparse data needs (compressed, plain, values, size)")
        parts = tuple(_tensor_arg(m, d, "sparse component") for d in data[:3])
        return SparseRef(layout.name, parts, ints_arg(m, data[3], "size"))
    raise m.fail(f"unsupported sparse layout {layout.name}")


def _rebuild_meta_tensor_no_storage(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    dtype, size, stride, requires_grad = args
    if not isinstance(dtype, DType):
        raise m.fail("meta tensor dtype must be a torch dtype")
    shape = ints_arg(m, size, "size")
    strides = ints_arg(m, stride, "stride")
    problem = view_problem(None, dtype, 0, shape, strides, m.limits)
    if problem is not None:
        raise m.fail(f"meta tensor: {problem}")
    return TensorRef(
        storage=None,
        dtype=dtype,
        offset=0,
        shape=shape,
        stride=strides,
        requires_grad=bool_arg(m, requires_grad, "requires_grad"),
        device="meta",
    )


def _rebuild_device_tensor_from_cpu_tensor(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    data, _dtype, device, requires_grad = args
    tensor = _tensor_arg(m, data, "cpu tensor")
    if type(device) is not str or not LOCATION.match(device):
        raise m.fail(f"bad device string {shown(device)}")
    return tensor.with_(device=device, requires_grad=bool_arg(m, requires_grad, "requires_grad"))


def _unsupported(what: str) -> Call:
    def refuse(m: Machine, args: tuple[Any, ...]) -> Any:
        raise m.fail(f"{what} are not supported by torchkeep")

    return refuse


# -- small torch values ----------------------------------------------------------------------

#: Device types torch.device accepts (c10::DeviceType names).
DEVICE_TYPES = frozenset({
    "cpu", "cuda", "mkldnn", "opengl", "opencl", "ideep", "hip", "fpga", "maia", "xla",
    "vulkan", "metal", "xpu", "mps", "meta", "hpu", "ve", "lazy", "ipu", "mtia",
    "privateuseone",
})
#: What a storage location tag looks like: ``cpu``, ``cuda:1``, a backend name.
LOCATION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(:\d{1,6})?$")


def _size(m: Machine, args: tuple[Any, ...]) -> Size:
    if len(args) != 1:
        raise m.fail("torch.Size takes one tuple")
    return Size(ints_arg(m, args[0], "torch.Size"))


def _device(m: Machine, args: tuple[Any, ...]) -> Device:
    if not args or type(args[0]) is not str or len(args) > 2:
        raise m.fail("torch.device takes (type[, index])")
    text = args[0]
    index: int | None = None
    if ":" in text:
        text, _, idx = text.partition(":")
        if not idx.isdigit():
            raise m.fail(f"bad device string {args[0]!r}")
        index = int(idx)
    if len(args) == 2 and args[1] is not None:
        index = int_arg(m, args[1], "device index")
        if index < 0:
            raise m.fail("negative device index")
    if text not in DEVICE_TYPES:
        raise m.fail(f"unknown device type {text!r}")
    return Device(text, index)


_LAYOUTS = {"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc",
            "_mkldnn", "jagged"}


def _get_layout(m: Machine, args: tuple[Any, ...]) -> Symbol:
    (name,) = args
    if type(name) is not str or name.removeprefix("torch.") not in _LAYOUTS:
        raise m.fail(f"unknown layout {name!r}")
    return Symbol("layout", name.removeprefix("torch."))


_TENSOR_CLASSES = {"torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter"}

_LEGACY_TENSOR_TYPES = [
    "DoubleTensor", "FloatTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
    "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor",
]


def torch_table() -> dict[str, Any]:
    """The torch globals, by ``module.name``."""
    table: dict[str, Any] = {}

    def add(qualname: str, call: Call | None = None, new: Call | None = None) -> None:
        table[qualname] = Entry(qualname, call=call, new=new)

    for name, fn in {
        "_rebuild_tensor": _rebuild_tensor,
        "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3,
        "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "_rebuild_qtensor": _rebuild_qtensor,
        "_rebuild_sparse_tensor": _rebuild_sparse_tensor,
        "_rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "_rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
        "_rebuild_device_tensor_from_numpy": _unsupported("numpy-backed device tensors"),
        "_rebuild_xla_tensor": _unsupported("XLA tensors"),
        "_rebuild_nested_tensor": _unsupported("nested tensors"),
        "_rebuild_wrapper_subclass": _unsupported("wrapper tensor subclasses"),
    }.items():
        add(f"torch._utils.{name}", fn)
    add("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2)
    add("torch._tensor._rebuild_from_type", _rebuild_from_type_v2)  # same arguments
    for spelling in ("torch.Tensor", "torch._tensor.Tensor"):
        table[spelling] = marker(spelling)
    add("torch.nn.parameter.Parameter", _parameter_new, _parameter_new)
    add("torch.Size", _size)
    add("torch.device", _device)
    add("torch.serialization._get_layout", _get_layout)
    for name in _LAYOUTS:
        table[f"torch.{name}"] = Symbol("layout", name)
    for name in _QSCHEMES:
        table[f"torch.{name}"] = Symbol("qscheme", name)
    for name, dtype in dtypes.DTYPES.items():
        table[f"torch.{name}"] = dtype
        if dtype.storage_class:
            for module in ("torch", "torch.cuda"):
                table[f"{module}.{dtype.storage_class}"] = StorageClass(
                    dtype.storage_class, dtype
                )
    untyped = StorageClass("UntypedStorage", dtypes.DTYPES["uint8"])
    for spelling in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        table[spelling] = untyped
    for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse"):
        for name in _LEGACY_TENSOR_TYPES:
            table[f"{module}.{name}"] = Symbol("tensortype", f"{module}.{name}")
    return table
