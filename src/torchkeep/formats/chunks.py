"""Sharded tensors: chunks (boxes of a global tensor) checked to tile it, and assembled.

Shared by the readers of torchkeep's sharded steps (formats/manifest.py) and of stock DCP
directories (formats/dcp.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torchkeep.limits import Limits

if TYPE_CHECKING:
    import numpy as np

__all__ = ["assemble", "byte_range", "ranges_problem", "tiling_problem"]

Box = tuple[Sequence[int], Sequence[int]]  # (offsets, sizes), both inside the tensor


def tiling_problem(shape: Sequence[int], boxes: Iterable[Box], limits: Limits,
                   what: str) -> str | None:
    """None when the boxes tile the tensor exactly (every element in one box, none in
    two), else what is wrong. The boxes must already lie inside the tensor.

    The edges of the boxes cut the tensor into a grid; each box paints its cells once, so
    the check is exact and costs the grid's size (bounded by ``max_chunk_cells``)."""
    if not math.prod(shape):
        return None
    full = [(tuple(o), tuple(n)) for o, n in boxes if math.prod(n)]
    edges = [sorted({0, size, *(o[d] for o, _ in full), *(o[d] + n[d] for o, n in full)})
             for d, size in enumerate(shape)]
    cells = math.prod(len(e) - 1 for e in edges)
    limits.check("max_chunk_cells", cells, f"{what} chunk grid")
    index = [{edge: i for i, edge in enumerate(e)} for e in edges]
    import numpy as np

    painted = np.zeros(tuple(len(e) - 1 for e in edges), dtype=np.int64)
    for offsets, sizes in full:
        painted[tuple(slice(at[o], at[o + n])
                      for at, o, n in zip(index, offsets, sizes, strict=True))] += 1
    if (painted > 1).any():
        return "two of its chunks overlap"
    if (painted == 0).any():
        return "its chunks do not cover it (elements missing)"
    return None


def assemble(shape: Sequence[int], itemsize: int,
             pieces: Iterable[tuple[Sequence[int], Sequence[int], np.ndarray[Any, Any]]]) -> bytes:
    """The whole tensor's bytes, C order, from ``(offsets, sizes, values)`` pieces that
    tile it; ``values`` is any array of that shape with ``itemsize``-byte elements."""
    import numpy as np

    kind = np.dtype(f"V{itemsize}")
    out = np.empty(tuple(shape), dtype=kind)
    for offsets, sizes, values in pieces:
        if math.prod(sizes):
            out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))] = \
                values.view(kind) if values.dtype != kind else values
    return out.tobytes()


def byte_range(shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int],
               itemsize: int) -> tuple[int, int] | None:
    """``(start, nbytes)`` of a box in the C-contiguous bytes of the tensor when the box is
    one contiguous run of them (whole trailing dimensions, one index in the leading ones),
    else None."""
    inner = len(shape)
    while inner > 0 and sizes[inner - 1] == shape[inner - 1]:
        inner -= 1
    # dims after ``inner - 1`` are whole; dim ``inner - 1`` is a range; the ones before are 1
    if any(n != 1 for n in sizes[: max(inner - 1, 0)]):
        return None
    start = 0
    for o, s in zip(offsets, shape, strict=True):
        start = start * s + o
    return start * itemsize, math.prod(sizes) * itemsize


def ranges_problem(nbytes: int, ranges: Iterable[tuple[int, int]]) -> str | None:
    """None when the ``(start, nbytes)`` ranges tile ``nbytes`` bytes exactly, else what is
    wrong (the cheap check for chunks that are contiguous runs, as incremental steps
    write them)."""
    at = 0
    for start, n in sorted(r for r in ranges if r[1]):
        if start < at:
            return "two of its chunks overlap"
        if start > at:
            return "its chunks do not cover it (elements missing)"
        at = start + n
    if at != nbytes:
        return "its chunks do not cover it (elements missing)"
    return None
