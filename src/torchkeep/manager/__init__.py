"""Training checkpoints: the CheckpointManager and what a bit-exact resume needs."""

from torchkeep.manager.manager import CheckpointManager, ManagerOptions, StateMismatchError
from torchkeep.manager.preemption import PreemptionGuard
from torchkeep.manager.retention import AnyOf, KeepBest, KeepEvery, KeepLast
from torchkeep.manager.rng import RNGState
from torchkeep.manager.sampler import ResumableSampler

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
