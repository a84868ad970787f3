"""``torchkeep.diff``: how two checkpoints differ, across formats, without torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchkeep.api import parse
from torchkeep.arrays import NumpyMaterializer
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.summary import _short_repr, leaves
from torchkeep.tree import TensorRef, join_path

__all__ = ["Comparison", "TensorDiff", "compare"]

_CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """A tensor present in both with the same dtype and shape, whose values differ."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs_diff: float | None  # None when the dtype has no arithmetic (raw bits compared)
    mismatched: int  # elements outside the tolerance


@dataclass(slots=True)
class Comparison:
    """The differences between checkpoints A and B (empty lists: equal)."""

    a: str
    b: str
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)  # dtype / shape / kind
    tensors: list[TensorDiff] = field(default_factory=list)
    values: list[dict[str, Any]] = field(default_factory=list)
    compared_tensors: int = 0
    compared_values: int = 0

    @property
    def equal(self) -> bool:
        """True when nothing differs (within the tolerance)."""
        return not (self.only_in_a or self.only_in_b or self.changed or self.tensors
                    or self.values)

    def to_json(self) -> dict[str, Any]:
        """The documented ``--json`` shape."""
        return {
            "a": self.a, "b": self.b, "equal": self.equal,
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
            "changed": self.changed,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                         "max_abs_diff": t.max_abs_diff, "mismatched": t.mismatched}
                        for t in self.tensors],
            "values": self.values,
            "compared_tensors": self.compared_tensors,
            "compared_values": self.compared_values,
        }


def _flatten(tree: Any, limits: Limits) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for path, leaf in leaves(tree, limits=limits):
        flat[join_path(path)] = leaf
    return flat


def _is_tensor(leaf: Any) -> bool:
    return isinstance(leaf, TensorRef) or (
        isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biufc"
    )


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        return bool(x == y)
    except (ValueError, TypeError):
        return repr(x) == repr(y)


def _numeric(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    kind = array.dtype.kind
    if kind in "biu":
        return array.astype(np.int64 if kind != "u" else np.uint64)
    if kind == "c":
        return array.astype(np.complex128)
    if array.dtype.names is not None:
        return None
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError):
        return None


def _tensor_diff(name: str, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], atol: float,
                 rtol: float, progress: Callable[[int], None]) -> TensorDiff | None:
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    max_abs = 0.0
    mismatched = 0
    arithmetic = True
    for start in range(0, flat_a.size, _CHUNK):
        x, y = flat_a[start : start + _CHUNK], flat_b[start : start + _CHUNK]
        nx, ny = _numeric(x), _numeric(y)
        if nx is None or ny is None:
            arithmetic = False
            bad = x.view(np.uint8) != y.view(np.uint8) if x.dtype.names is None else (
                np.frombuffer(x.tobytes(), np.uint8) != np.frombuffer(y.tobytes(), np.uint8))
            mismatched += int(np.count_nonzero(bad))
        else:
            if nx.dtype.kind in "iu":
                delta = np.abs(nx.astype(np.float64) - ny.astype(np.float64))
            else:
                delta = np.abs(nx - ny)
            both_nan = np.isnan(nx) & np.isnan(ny) if nx.dtype.kind in "fc" else None
            if both_nan is not None:
                delta = np.where(both_nan, 0.0, delta)
                delta = np.where(np.isnan(delta), np.inf, delta)
            bound = atol + rtol * np.abs(ny.astype(np.complex128) if ny.dtype.kind == "c" else ny)
            mismatched += int(np.count_nonzero(delta > bound))
            if delta.size:
                max_abs = max(max_abs, float(delta.max()))
        progress(x.nbytes + y.nbytes)
    if mismatched == 0:
        return None
    return TensorDiff(name, str(a.dtype), tuple(a.shape), max_abs if arithmetic else None,
                      mismatched)


def compare(
    a: Any,
    b: Any,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    limits: Limits = DEFAULT_LIMITS,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """Compare two checkpoints of any formats by their tree paths.

    Tensors match when they have the same dtype and shape and every element satisfies
    ``|a - b| <= atol + rtol * |b|`` (NaN matches NaN); non-tensor values must be equal
    and of the same type.
    """
    tick = progress or (lambda n: None)
    parsed_a = parse(a, limits=limits)
    try:
        parsed_b = parse(b, limits=limits)
        try:
            result = Comparison(parsed_a.source.name, parsed_b.source.name)
            flat_a = _flatten(parsed_a.tree, limits)
            flat_b = _flatten(parsed_b.tree, limits)
            result.only_in_a = [k for k in flat_a if k not in flat_b]
            result.only_in_b = [k for k in flat_b if k not in flat_a]
            reader_a = NumpyMaterializer(parsed_a)
            reader_b = NumpyMaterializer(parsed_b)
            for name, left in flat_a.items():
                if name not in flat_b:
                    continue
                right = flat_b[name]
                if _is_tensor(left) != _is_tensor(right):
                    result.changed.append({"name": name, "what": "kind",
                                           "a": _kind(left), "b": _kind(right)})
                    continue
                if not _is_tensor(left):
                    result.compared_values += 1
                    if not _same_value(left, right):
                        result.values.append({"name": name, "a": _short_repr(left),
                                              "b": _short_repr(right)})
                    continue
                result.compared_tensors += 1
                array_a = reader_a.convert(left) if isinstance(left, TensorRef) else left
                array_b = reader_b.convert(right) if isinstance(right, TensorRef) else right
                if array_a.dtype != array_b.dtype:
                    result.changed.append({"name": name, "what": "dtype",
                                           "a": str(array_a.dtype), "b": str(array_b.dtype)})
                    continue
                if array_a.shape != array_b.shape:
                    result.changed.append({"name": name, "what": "shape",
                                           "a": list(array_a.shape), "b": list(array_b.shape)})
                    continue
                diff = _tensor_diff(name, array_a, array_b, atol, rtol, tick)
                if diff is not None:
                    result.tensors.append(diff)
            return result
        finally:
            parsed_b.close()
    finally:
        parsed_a.close()


def _kind(leaf: Any) -> str:
    if _is_tensor(leaf):
        return "tensor"
    return type(leaf).__name__
