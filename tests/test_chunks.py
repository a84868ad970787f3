"""The tiling check and the assembly shared by sharded-step and DCP readers."""

from __future__ import annotations

import numpy as np
import pytest

from torchkeep.errors import LimitExceededError
from torchkeep.formats.chunks import assemble, tiling_problem
from torchkeep.limits import DEFAULT_LIMITS, Limits


@pytest.mark.parametrize(("shape", "boxes", "problem"), [
    ((7, 5), [((0, 0), (4, 5)), ((4, 0), (3, 5))], None),
    ((6, 6), [((0, 0), (3, 3)), ((0, 3), (3, 3)), ((3, 0), (3, 6))], None),
    ((7, 5), [((0, 0), (4, 5)), ((4, 0), (2, 5))], "missing"),  # row 6 in no chunk
    ((7, 5), [((0, 0), (5, 5)), ((4, 0), (3, 5))], "overlap"),  # row 4 in both
    ((4, 4), [((0, 0), (4, 4)), ((1, 1), (2, 2))], "overlap"),  # one inside another
    ((), [((), ())], None),
    ((), [((), ()), ((), ())], "overlap"),  # a 0-d tensor in two chunks
    ((), [], "missing"),
    ((0, 4), [], None),
    ((4,), [((0,), (4,)), ((2,), (0,))], None),  # an empty chunk covers nothing
])
def test_tiling(shape: tuple[int, ...], boxes: list, problem: str | None) -> None:
    found = tiling_problem(shape, boxes, DEFAULT_LIMITS, "t")
    assert (found is None) if problem is None else (problem in (found or ""))


def test_the_grid_is_bounded() -> None:
    boxes = [((i, 0), (1, 1)) for i in range(100)] + [((0, i), (1, 1)) for i in range(1, 100)]
    with pytest.raises(LimitExceededError, match="max_chunk_cells"):
        tiling_problem((100, 100), boxes, Limits(max_chunk_cells=1000), "t")


def test_assemble() -> None:
    full = np.arange(35, dtype=np.float32).reshape(7, 5)
    pieces = [((0, 0), (4, 5), full[:4]), ((4, 0), (3, 2), full[4:, :2]),
              ((4, 2), (3, 3), np.ascontiguousarray(full[4:, 2:]))]
    assert assemble((7, 5), 4, pieces) == full.tobytes()
