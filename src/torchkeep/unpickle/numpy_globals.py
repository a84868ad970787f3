"""The numpy globals a checkpoint may name: array and scalar reconstruction and plain
dtypes. numpy pickles arrays and dtypes as an object finished by BUILD: they come out of
REDUCE as Pending placeholders that ``finish`` turns into the real value."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torchkeep import dtypes
from torchkeep.errors import shown
from torchkeep.unpickle.entries import Call, Entry, Machine, Pending, ints_arg, marker

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PendingArray", "PendingDType", "finish", "numpy_table"]


class PendingArray(Pending):
    __slots__ = ()


class PendingDType(Pending):
    __slots__ = ("base",)

    def __init__(self, base: np.dtype[Any]) -> None:
        self.base = base


def _np_reconstruct(m: Machine, args: tuple[Any, ...]) -> PendingArray:
    subtype, _shape, _code = args
    if not isinstance(subtype, Entry) or subtype.qualname != "numpy.ndarray":
        raise m.fail("numpy _reconstruct of a type other than numpy.ndarray")
    return PendingArray()


def _np_dtype(m: Machine, args: tuple[Any, ...]) -> PendingDType:
    if not args or type(args[0]) is not str or len(args) > 3:
        raise m.fail("numpy.dtype takes (spec, align, copy)")
    try:
        return PendingDType(dtypes.plain_numpy_dtype(args[0]))
    except ValueError as e:
        raise m.fail(str(e)) from None


def _finish_dtype(m: Machine, pending: PendingDType, state: Any) -> np.dtype[Any]:
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
    import numpy as np

    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise m.fail("unsupported numpy array state")
    if len(state) == 5:
        if state[0] != 1:
            raise m.fail("unsupported numpy array state version")
        state = state[1:]
    shape, dtype, fortran, raw = state
    shape = ints_arg(m, shape, "numpy shape")
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
    import numpy as np

    dtype, raw = args
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise m.fail("numpy scalar dtype must be a plain dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize:
        raise m.fail("numpy scalar data does not match its dtype")
    return np.frombuffer(bytes(raw), dtype=dtype)[0]


def finish(m: Machine, target: Pending, state: Any) -> Any:
    """BUILD of a pending numpy object: the array or dtype it stands for."""
    if isinstance(target, PendingDType):
        return _finish_dtype(m, target, state)
    return _finish_array(m, state)


def numpy_table() -> dict[str, Any]:
    """The numpy globals, by ``module.name``."""
    table: dict[str, Any] = {}

    def add(qualname: str, call: Call | None = None, new: Call | None = None) -> None:
        table[qualname] = Entry(qualname, call=call, new=new)

    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        add(f"{module}._reconstruct", _np_reconstruct)
        add(f"{module}.scalar", _np_scalar)
    table["numpy.ndarray"] = marker("numpy.ndarray")
    add("numpy.dtype", _np_dtype)
    return table
