"""Training checkpoints: the CheckpointManager and what a bit-exact resume needs.

Names are imported on first use: the run-directory modules (layout, retention, rundir)
are torch-free, and importing them must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchkeep.manager.manager import CheckpointManager, ManagerOptions, StateMismatchError
    from torchkeep.manager.preemption import PreemptionGuard
    from torchkeep.manager.retention import AnyOf, KeepBest, KeepEvery, KeepLast
    from torchkeep.manager.rng import RNGState
    from torchkeep.manager.sampler import ResumableSampler

_WHERE = {
    "AnyOf": "retention",
    "CheckpointManager": "manager",
    "KeepBest": "retention",
    "KeepEvery": "retention",
    "KeepLast": "retention",
    "ManagerOptions": "manager",
    "PreemptionGuard": "preemption",
    "RNGState": "rng",
    "ResumableSampler": "sampler",
    "StateMismatchError": "manager",
}

__all__ = [
    "AnyOf",
    "CheckpointManager",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "ManagerOptions",
    "PreemptionGuard",
    "RNGState",
    "ResumableSampler",
    "StateMismatchError",
]


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkeep.manager' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"torchkeep.manager.{module}"), name)
    globals()[name] = value
    return value
