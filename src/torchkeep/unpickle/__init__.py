"""Restricted unpickling: an opcode interpreter over an allowlist, and a static scanner."""

from torchkeep.unpickle.allowlist import Allowlist, AllowSpec
from torchkeep.unpickle.interpreter import PickleResult, unpickle
from torchkeep.unpickle.torch_globals import StorageClass

__all__ = ["AllowSpec", "Allowlist", "PickleResult", "StorageClass", "unpickle"]
