"""Bit-for-bit comparison of the same step committed by two runs."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Difference", "StepComparison", "compare_step", "flatten"]


@dataclass(frozen=True)
class Difference:
    """One entry that differs: its path in the saved state (``model/fc1.weight``)."""

    path: str
    #: "value", "dtype", "shape", "type", "missing in A", "missing in B"
    kind: str
    a: str = ""
    b: str = ""
    #: for floating tensors of the same shape: the largest absolute difference
    max_abs_diff: float | None = None

    def describe(self) -> str:
        """One line: the path and how it differs."""
        if self.max_abs_diff is not None:
            return f"{self.path} (max abs diff {self.max_abs_diff:.3g})"
        if self.kind == "value":
            return f"{self.path} ({self.a} vs {self.b})"
        if self.kind.startswith("missing"):
            return f"{self.path} ({self.kind})"
        return f"{self.path} ({self.kind}: {self.a} vs {self.b})"


@dataclass
class StepComparison:
    """How one step of run B compares with the same step of run A."""

    step: int
    differences: list[Difference] = field(default_factory=list)
    metrics_a: dict[str, Any] = field(default_factory=dict)
    metrics_b: dict[str, Any] = field(default_factory=dict)
    entries: int = 0

    @property
    def identical(self) -> bool:
        """Every entry and every metric bit-identical."""
        return not self.differences and _same(self.metrics_a, self.metrics_b)

    @property
    def metric_differences(self) -> list[str]:
        """The metrics whose values differ."""
        names = sorted(set(self.metrics_a) | set(self.metrics_b))
        return [n for n in names if not _same(self.metrics_a.get(n), self.metrics_b.get(n))]


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of a loaded state, in the state's order."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)) and not _is_leaf_sequence(tree):
        for i, value in enumerate(tree):
            yield from flatten(value, f"{prefix}/{i}" if prefix else str(i))
    else:
        yield prefix, tree


def _is_leaf_sequence(value: Any) -> bool:
    # torch.Size and other named tuples of ints compare as values
    return type(value) not in (list, tuple)


def compare_step(step: int, a: Any, b: Any, *, metrics_a: dict[str, Any],
                 metrics_b: dict[str, Any]) -> StepComparison:
    """Compare two loaded states (numpy backend) leaf by leaf, bytes for arrays."""
    result = StepComparison(step, metrics_a=metrics_a, metrics_b=metrics_b)
    leaves_a = dict(flatten(a))
    leaves_b = dict(flatten(b))
    result.entries = len(leaves_a)
    for path, value in leaves_a.items():
        if path not in leaves_b:
            result.differences.append(Difference(path, "missing in B"))
            continue
        difference = _compare_leaf(path, value, leaves_b[path])
        if difference is not None:
            result.differences.append(difference)
    result.differences += [Difference(p, "missing in A") for p in leaves_b if p not in leaves_a]
    return result


def _compare_leaf(path: str, a: Any, b: Any) -> Difference | None:
    import numpy as np

    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return Difference(path, "type", type(a).__name__, type(b).__name__)
        if a.dtype != b.dtype:
            return Difference(path, "dtype", str(a.dtype), str(b.dtype))
        if a.shape != b.shape:
            return Difference(path, "shape", str(a.shape), str(b.shape))
        ca, cb = np.ascontiguousarray(a), np.ascontiguousarray(b)
        if ca.tobytes() == cb.tobytes():  # bit for bit: NaN equals NaN, -0.0 differs from 0.0
            return None
        return Difference(path, "value", _short(a), _short(b), _max_abs_diff(ca, cb))
    if type(a) is not type(b):
        return Difference(path, "type", type(a).__name__, type(b).__name__)
    if _same(a, b):
        return None
    return Difference(path, "value", _short(a), _short(b))


def _same(a: Any, b: Any) -> bool:
    """Equality that tells -0.0 from 0.0 and NaN from a number, and equates NaNs."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # objects whose == is not a bool
        return repr(a) == repr(b)


def _max_abs_diff(a: Any, b: Any) -> float | None:
    import numpy as np

    if a.dtype.kind not in "fciub" and "float" not in str(a.dtype):
        return None
    try:
        fa = a.astype(np.float64 if a.dtype.kind != "c" else np.complex128)
        fb = b.astype(fa.dtype)
    except (TypeError, ValueError):
        return None
    if fa.size == 0:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(fa - fb)
    return float(np.nanmax(diff)) if not np.all(np.isnan(diff)) else math.nan


def _short(value: Any) -> str:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.size == 1:
            return repr(value.reshape(()).item())
        return f"{value.dtype}{list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
