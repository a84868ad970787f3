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
    DeviceError,
    DistributedError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    MissingDependencyError,
    ScriptFailedError,
    StorageError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from torchkeep.handle import CheckpointHandle
from torchkeep.handle import open_checkpoint as open
from torchkeep.limits import Limits
from torchkeep.storage.remote import RemoteOptions, remote_options, storage_options
from torchkeep.tree import Device, PickledObject, Size, TensorInfo, TensorRef

if TYPE_CHECKING:
    from torchkeep.comparison import compare
    from torchkeep.conversion import convert
    from torchkeep.distributed.state import ModelState, PerRank
    from torchkeep.integrations.torch_load import (
        TorchLoadPatch,
        patch_torch_load,
        unpatch_torch_load,
    )
    from torchkeep.loading import LoadReport, PartialLoadError, load_into
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
    from torchkeep.scanning import scan
    from torchkeep.summary import inspect
    from torchkeep.verification import verify

__version__ = "0.1.0"

# Loaded on first use: some of these import torch, and ``import torchkeep`` (and the numpy
# backend) must not; the others are kept out of the start-up of every command.
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
    "ModelState": "torchkeep.distributed.state",
    "PerRank": "torchkeep.distributed.state",
    "LoadReport": "torchkeep.loading",
    "PartialLoadError": "torchkeep.loading",
    "load_into": "torchkeep.loading",
    "inspect": "torchkeep.summary",
    "scan": "torchkeep.scanning",
    "verify": "torchkeep.verification",
    "compare": "torchkeep.comparison",
    "TorchLoadPatch": "torchkeep.integrations.torch_load",
    "patch_torch_load": "torchkeep.integrations.torch_load",
    "unpatch_torch_load": "torchkeep.integrations.torch_load",
    "convert": "torchkeep.conversion",
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
    "DeviceError",
    "DistributedError",
    "FormatError",
    "IntegrityError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "LimitExceededError",
    "Limits",
    "LoadReport",
    "ManagerOptions",
    "MissingDependencyError",
    "ModelState",
    "PartialLoadError",
    "PerRank",
    "PickledObject",
    "PreemptionGuard",
    "RNGState",
    "RemoteOptions",
    "ResumableSampler",
    "SaveOptions",
    "ScriptFailedError",
    "Size",
    "StateMismatchError",
    "StorageError",
    "TensorInfo",
    "TensorRef",
    "TorchLoadPatch",
    "TorchkeepError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "__version__",
    "compare",
    "convert",
    "inspect",
    "load",
    "load_into",
    "open",
    "patch_torch_load",
    "remote_options",
    "save",
    "scan",
    "storage_options",
    "unpatch_torch_load",
    "verify",
]
