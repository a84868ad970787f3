"""torchkeep: safe, fast, crash-proof PyTorch checkpoints.

Read every torch checkpoint format and .safetensors without running code from the file
(with or without torch installed), write files stock torch and safetensors read, and
keep training runs safe with an atomic, checksummed CheckpointManager.
"""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "AsyncSaveError",
    "CheckpointHandle",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DType",
    "Device",
    "DistributedError",
    "FormatError",
    "IntegrityError",
    "LimitExceededError",
    "Limits",
    "MissingDependencyError",
    "PickledObject",
    "SaveOptions",
    "Size",
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
