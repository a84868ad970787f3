"""Restricted unpickling: an opcode interpreter over an allowlist, and a static scanner."""

from torchkeep.unpickle.allowlist import Allowlist, AllowSpec, StorageClass
from torchkeep.unpickle.interpreter import PickleResult, unpickle

__all__ = ["AllowSpec", "Allowlist", "PickleResult", "StorageClass", "unpickle"]
