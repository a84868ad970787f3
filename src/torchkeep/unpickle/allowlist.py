"""Which globals a checkpoint may name, and the torch-free code that stands in for each.

Nothing here imports a module named by a file. Each allowed ``(module, name)`` maps to an
``Entry`` whose ``call`` / ``new`` build placeholders (TensorRef, Size, ...) or plain
Python data after checking their arguments. Callers extend the list with ``allow=``:
a class object (real instances are built, as ``torch.serialization.add_safe_globals``
does) or a ``"module.Name"`` string (inert ``PickledObject`` records; nothing imported).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import math
import pathlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from torchkeep import dtypes
from torchkeep.dtypes import DType
from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError, shown
from torchkeep.tree import (
    Device,
    PickledObject,
    Size,
    SparseRef,
    StorageView,
    Symbol,
    TensorRef,
    plain_attribute_name,
    view_problem,
)

if TYPE_CHECKING:
    from torchkeep.unpickle.interpreter import _Machine as Machine
else:
    Machine = Any

__all__ = [
    "DEVICE_TYPES",
    "LOCATION",
    "NEVER_ALLOWED",
    "Allowlist",
    "AllowSpec",
    "Entry",
    "Pending",
    "StorageClass",
    "build",
    "canonical",
    "dangerous",
    "storage_pid",
]

Call = Callable[[Machine, tuple[Any, ...]], Any]


@dataclass(frozen=True, eq=False, slots=True)
class Entry:
    """An allowed global as the stream sees it: callable through REDUCE and/or NEWOBJ."""

    qualname: str
    call: Call | None = None
    new: Call | None = None
    #: for allowed user classes: the class itself (BUILD and item ops consult it)
    cls: type | None = None

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


@dataclass(frozen=True, slots=True)
class StorageClass:
    """A storage class named in a persistent id (``torch.FloatStorage``, ``UntypedStorage``)."""

    name: str
    dtype: DType  # uint8 for UntypedStorage: its numel counts bytes

    @property
    def untyped(self) -> bool:
        """True for ``UntypedStorage``."""
        return self.name == "UntypedStorage"


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
    if not LOCATION.match(location):
        raise CorruptCheckpointError(f"storage {key}: bad location {location[:40]!r}")
    if numel < 0:
        raise CorruptCheckpointError(f"storage {key} has a negative size")
    return storage_class, key, location, numel, tuple(extra)


class Pending:
    """An object that BUILD will finish (numpy's ndarray and dtype pickle that way)."""

    __slots__ = ()


class _PendingArray(Pending):
    __slots__ = ()


class _PendingDType(Pending):
    __slots__ = ("base",)

    def __init__(self, base: np.dtype[Any]) -> None:
        self.base = base


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


# -- argument checks -----------------------------------------------------------------------


def _int(m: Machine, value: Any, what: str) -> int:
    if type(value) is not int:
        raise m.fail(f"{what} must be an int, got {type(value).__name__}")
    return value


def _ints(m: Machine, value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise m.fail(f"{what} must be a tuple of ints, got {type(value).__name__}")
    if len(value) > m.limits.max_tensor_dims:
        m.limits.check("max_tensor_dims", len(value), f"{m.what}: {what} dimensions")
    for v in value:
        if type(v) is not int:
            raise m.fail(f"{what} must hold ints, found {type(v).__name__}")
    return tuple(value)


def _bool(m: Machine, value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise m.fail(f"{what} must be a bool, got {type(value).__name__}")
    return value


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
    offset = _int(m, offset, "storage offset")
    shape = _ints(m, size, "size")
    strides = _ints(m, stride, "stride")
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
        requires_grad=_bool(m, requires_grad, "requires_grad"),
        conj=conj,
        neg=neg,
    )


# -- torch rebuild functions --------------------------------------------------------------


def _rebuild_tensor(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    storage, offset, size, stride = args
    view = _storage_view(m, storage)
    return _make_tensor(m, view, view.dtype, offset, size, stride, False)


def _rebuild_tensor_v2(m: Machine, args: tuple[Any, ...]) -> TensorRef:
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


def _object_state(m: Machine, state: Any) -> dict[str, Any] | None:
    """Python attribute state: a dict, or the (dict, slots) pair of ``__getstate__``."""
    if state is None:
        return None
    if isinstance(state, tuple) and len(state) == 2:
        merged: dict[str, Any] = {}
        for part in state:
            if part is not None:
                merged.update(_object_state(m, part) or {})
        return merged or None
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise m.fail("object state must be a dict with str keys")
    return dict(state) or None


def _rebuild_parameter(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    data, requires_grad, hooks = args
    _hooks(m, hooks)
    tensor = _tensor_arg(m, data, "Parameter data")
    return tensor.with_(parameter=True, requires_grad=_bool(m, requires_grad, "requires_grad"))


def _rebuild_parameter_with_state(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    data, requires_grad, hooks, state = args
    tensor = _rebuild_parameter(m, (data, requires_grad, hooks))
    tensor.attrs = _attribute_state(m, state, "Parameter") or None
    return tensor


def _rebuild_from_type_v2(m: Machine, args: tuple[Any, ...]) -> Any:
    func, new_type, func_args, state = args
    if not isinstance(new_type, Entry) or new_type.qualname not in _TENSOR_CLASSES:
        raise m.fail(f"tensor subclass {shown(new_type)} is not supported")
    result = m.call(func, func_args, "REDUCE")
    tensor = _tensor_arg(m, result, "_rebuild_from_type_v2 result")
    if new_type.qualname == "torch.nn.parameter.Parameter" and not tensor.parameter:
        tensor = tensor.with_(parameter=True)
    attrs = _attribute_state(m, state, "tensor")
    if attrs:
        tensor = tensor.with_(attrs={**(tensor.attrs or {}), **attrs})
    return tensor


def _parameter_new(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    # Parameter.__new__(cls, data=None, requires_grad=True)
    data = args[0] if args else None
    requires_grad = args[1] if len(args) > 1 else True
    tensor = _tensor_arg(m, data, "Parameter data")
    return tensor.with_(parameter=True, requires_grad=_bool(m, requires_grad, "requires_grad"))


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
        axis = _int(m, qparams[3], "axis")
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
        size = _ints(m, data[2], "size")
        coalesced = data[3] if len(data) == 4 else None
        if coalesced is not None:
            _bool(m, coalesced, "is_coalesced")
        return SparseRef("sparse_coo", (indices, values), size, coalesced)
    if layout.name in ("sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"):
        if len(data) != 4:
            raise m.fail("compressed sparse data needs (compressed, plain, values, size)")
        parts = tuple(_tensor_arg(m, d, "sparse component") for d in data[:3])
        return SparseRef(layout.name, parts, _ints(m, data[3], "size"))
    raise m.fail(f"unsupported sparse layout {layout.name}")


def _rebuild_meta_tensor_no_storage(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    dtype, size, stride, requires_grad = args
    if not isinstance(dtype, DType):
        raise m.fail("meta tensor dtype must be a torch dtype")
    shape = _ints(m, size, "size")
    strides = _ints(m, stride, "stride")
    problem = view_problem(None, dtype, 0, shape, strides, m.limits)
    if problem is not None:
        raise m.fail(f"meta tensor: {problem}")
    return TensorRef(
        storage=None,
        dtype=dtype,
        offset=0,
        shape=shape,
        stride=strides,
        requires_grad=_bool(m, requires_grad, "requires_grad"),
        device="meta",
    )


def _rebuild_device_tensor_from_cpu_tensor(m: Machine, args: tuple[Any, ...]) -> TensorRef:
    data, _dtype, device, requires_grad = args
    tensor = _tensor_arg(m, data, "cpu tensor")
    if type(device) is not str or not LOCATION.match(device):
        raise m.fail(f"bad device string {shown(device)}")
    return tensor.with_(device=device, requires_grad=_bool(m, requires_grad, "requires_grad"))


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
    return Size(_ints(m, args[0], "torch.Size"))


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
        index = _int(m, args[1], "device index")
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


# -- Python builtins and the standard library ---------------------------------------------


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


# -- numpy ---------------------------------------------------------------------------------


def _np_reconstruct(m: Machine, args: tuple[Any, ...]) -> _PendingArray:
    subtype, _shape, _code = args
    if not isinstance(subtype, Entry) or subtype.qualname != "numpy.ndarray":
        raise m.fail("numpy _reconstruct of a type other than numpy.ndarray")
    return _PendingArray()


def _np_dtype(m: Machine, args: tuple[Any, ...]) -> _PendingDType:
    if not args or type(args[0]) is not str or len(args) > 3:
        raise m.fail("numpy.dtype takes (spec, align, copy)")
    try:
        return _PendingDType(dtypes.plain_numpy_dtype(args[0]))
    except ValueError as e:
        raise m.fail(str(e)) from None


def _finish_dtype(m: Machine, pending: _PendingDType, state: Any) -> np.dtype[Any]:
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise m.fail("unsupported numpy dtype state")
    byteorder, subarray, names, fields = state[1:5]
    if subarray is not None or names is not None or fields is not None:
        raise m.fail("structured and sub-array numpy dtypes are not supported")
    if byteorder not in ("<", ">", "|", "="):
        raise m.fail(f"bad numpy byte order {shown(byteorder)}")
    base = pending.base
    return base if byteorder in ("|", "=") else base.newbyteorder(byteorder)


def _finish_array(m: Machine, state: Any) -> np.ndarray[Any, Any]:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise m.fail("unsupported numpy array state")
    if len(state) == 5:
        if state[0] != 1:
            raise m.fail("unsupported numpy array state version")
        state = state[1:]
    shape, dtype, fortran, raw = state
    shape = _ints(m, shape, "numpy shape")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise m.fail("numpy array dtype must be a plain (non-object) dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)):
        raise m.fail("numpy array data must be bytes")
    if any(s < 0 for s in shape):
        raise m.fail("negative numpy dimension")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise m.fail(f"numpy array data has {len(raw)} bytes, its shape needs {expected}")
    flat: np.ndarray[Any, Any] = np.frombuffer(bytearray(raw), dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C")


def _np_scalar(m: Machine, args: tuple[Any, ...]) -> Any:
    if len(args) != 2:
        raise m.fail("numpy scalar takes (dtype, data)")
    dtype, raw = args
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise m.fail("numpy scalar dtype must be a plain dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize:
        raise m.fail("numpy scalar data does not match its dtype")
    return np.frombuffer(bytes(raw), dtype=dtype)[0]


# -- BUILD ---------------------------------------------------------------------------------


def _attribute_state(m: Machine, state: Any, what: str) -> dict[str, Any]:
    """Object state whose keys can only ever be plain attribute names."""
    attrs = _object_state(m, state) or {}
    for name in attrs:
        if not plain_attribute_name(name):
            raise m.fail(f"{what} attribute {name!r} is not a plain attribute name")
    return attrs


def build(m: Machine, target: Any, state: Any) -> Any:
    """BUILD ``state`` into ``target``; returns the finished object (usually ``target``)."""
    kind = type(target)
    if kind is collections.OrderedDict:
        target.__dict__.update(_attribute_state(m, state, "OrderedDict"))
        return target
    if kind is _PendingArray:
        return _finish_array(m, state)
    if kind is _PendingDType:
        return _finish_dtype(m, target, state)
    if kind is TensorRef:
        attrs = _attribute_state(m, state, "tensor")
        if attrs:
            target.attrs = {**(target.attrs or {}), **attrs}
        return target
    if kind is argparse.Namespace:
        for key, value in _attribute_state(m, state, "Namespace").items():
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
            target.__dict__.update(_object_state(m, state) or {})
        return target
    raise m.fail(f"BUILD on a {kind.__name__} is not allowed")


# -- the table -----------------------------------------------------------------------------


def _marker(qualname: str) -> Entry:
    return Entry(qualname)


_TENSOR_CLASSES = {"torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter"}

_LEGACY_TENSOR_TYPES = [
    "DoubleTensor", "FloatTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
    "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor",
]


def _default_table() -> dict[str, Any]:
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
        table[spelling] = _marker(spelling)
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

    add("collections.OrderedDict", _ordered_dict, _empty(collections.OrderedDict))
    add("collections.Counter", _counter, _empty(collections.Counter))
    add("builtins.set", _set)
    add("builtins.frozenset", _frozenset)
    add("builtins.bytes", _bytes)
    add("builtins.bytearray", _bytearray)
    add("builtins.complex", _complex, _complex)
    add("builtins.slice", _slice)
    table["builtins.object"] = _marker("builtins.object")
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

    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        add(f"{module}._reconstruct", _np_reconstruct)
        add(f"{module}.scalar", _np_scalar)
    table["numpy.ndarray"] = _marker("numpy.ndarray")
    add("numpy.dtype", _np_dtype)
    return table


_DEFAULT_TABLE = _default_table()

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
