"""torchkeep: safe, fast, crash-proof PyTorch checkpoints.

Read every torch checkpoint format and .safetensors without running code from the file
(with or without torch installed), write files stock torch and safetensors read, and
keep training runs safe with an atomic, checksummed CheckpointManager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchkeep.api import SaveOptions, load, save
from torchkeep.dtypes import DType
from torchkeep.errors import (
    AsyncSaveError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    MissingDependencyError,
    StorageError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from torchkeep.handle import CheckpointHandle, TensorInfo
from torchkeep.handle import open_checkpoint as open
from torchkeep.limits import Limits
from torchkeep.tree import Device, PickledObject, Size, TensorRef

if TYPE_CHECKING:
    from torchkeep.manager import (
        AnyOf,
        CheckpointManager,
        KeepBest,
        KeepEvery,
        KeepLast,
        ManagerOptions,
        PreemptionGuard,
        ResumableSampler,
        RNGState,
        StateMismatchError,
    )

__version__ = "0.1.0"

# Names whose modules import torch: loaded on first use, so ``import torchkeep`` (and the
# numpy backend) never imports torch.
_LAZY = {
    "AnyOf": "torchkeep.manager",
    "CheckpointManager": "torchkeep.manager",
    "KeepBest": "torchkeep.manager",
    "KeepEvery": "torchkeep.manager",
    "KeepLast": "torchkeep.manager",
    "ManagerOptions": "torchkeep.manager",
    "PreemptionGuard": "torchkeep.manager",
    "RNGState": "torchkeep.manager",
    "ResumableSampler": "torchkeep.manager",
    "StateMismatchError": "torchkeep.manager",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkeep' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "AnyOf",
    "AsyncSaveError",
    "CheckpointHandle",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DType",
    "Device",
    "DistributedError",
    "FormatError",
    "IntegrityError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "LimitExceededError",
    "Limits",
    "ManagerOptions",
    "MissingDependencyError",
    "PickledObject",
    "PreemptionGuard",
    "RNGState",
    "ResumableSampler",
    "SaveOptions",
    "Size",
    "StateMismatchError",
    "StorageError",
    "TensorInfo",
    "TensorRef",
    "TorchkeepError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "__version__",
    "load",
    "open",
    "save",
]
