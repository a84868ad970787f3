"""Sharded checkpoints on torch.distributed.checkpoint (DCP): DCP plans and reshards,
torchkeep supplies the storage layer, the commit, the integrity and the safety.

Names are imported on first use (importing this package does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchkeep.distributed.api import load, save
    from torchkeep.distributed.planners import TorchkeepLoadPlanner, TorchkeepSavePlanner
    from torchkeep.distributed.reader import StepReader
    from torchkeep.distributed.writer import StepWriter

_WHERE = {
    "load": "api",
    "save": "api",
    "StepReader": "reader",
    "StepWriter": "writer",
    "TorchkeepLoadPlanner": "planners",
    "TorchkeepSavePlanner": "planners",
}

__all__ = ["StepReader", "StepWriter", "TorchkeepLoadPlanner", "TorchkeepSavePlanner", "load",
           "save"]


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkeep.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"torchkeep.distributed.{module}"), name)
    globals()[name] = value
    return value
