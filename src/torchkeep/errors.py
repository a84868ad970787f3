"""The one error tree of torchkeep; every error the library raises on purpose is here.

::

    TorchkeepError                           base of everything below (exit code 1)
    ├── FormatError(ValueError)              the input is not a checkpoint we can read (exit 3)
    │   ├── CorruptCheckpointError           structure is broken: truncated, lying lengths,
    │   │   │                                bad offsets, views outside their storage
    │   │   └── IntegrityError               a checksum does not match the bytes
    │   ├── LimitExceededError               a named limit (limits.Limits) was exceeded
    │   └── UnsupportedFormatError           recognised, but not a format we read
    │                                        (TorchScript, the old tar layout; exit 2)
    ├── UnsafeCheckpointError(ValueError)    the file asks for a global outside the allowlist
    ├── CheckpointNotFoundError(FileNotFoundError)
    ├── UnsupportedTypeError(TypeError)      save() met an object it will not write
    ├── StorageError(OSError)                reading or writing the medium failed
    ├── MissingDependencyError(ImportError)  an optional package (torch, fsspec) is needed
    ├── AsyncSaveError(RuntimeError)         a background save failed; the cause is chained
    ├── DeviceError(RuntimeError)            tensors saved on a device this machine lacks
    ├── DistributedError(RuntimeError)       a collective failed on one or more ranks
    └── ScriptFailedError(RuntimeError)      a script check-resume ran failed (exit 3)

Each class also subclasses the nearest builtin, so ``except ValueError`` keeps working
for callers that do not know torchkeep. Foreign exceptions (struct, zipfile, zlib,
OSError, json) are translated once per layer with ``raise ... from e``.
"""

from __future__ import annotations

import os
import reprlib

__all__ = [
    "AsyncSaveError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DeviceError",
    "DistributedError",
    "FormatError",
    "IntegrityError",
    "LimitExceededError",
    "MissingDependencyError",
    "ScriptFailedError",
    "StorageError",
    "TorchkeepError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
]


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 4, 4, 4
_SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdeque = _SHORT.maxarray = 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def shown(value: object) -> str:
    """A short repr of a value read from a file, for messages: bounded in length and in
    cost (the full repr of a pickle's shared-reference bomb takes exponential time)."""
    return _SHORT.repr(value)


def _where(source: object) -> str:
    """A short human name for a source: a path, or the kind of object it is."""
    if source is None:
        return ""
    if isinstance(source, (str, os.PathLike)):
        return str(os.fspath(source))
    return f"<{type(source).__name__}>"


class TorchkeepError(Exception):
    """Base class of every error torchkeep raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, source: object = None) -> None:
        self.reason = message
        self.source = _where(source)
        super().__init__(f"{self.source}: {message}" if self.source else message)

    def with_source(self, source: object) -> TorchkeepError:
        """Return this error naming ``source`` when it does not name one yet."""
        if not self.source and source is not None:
            self.source = _where(source)
            self.args = (f"{self.source}: {self.reason}",)
        return self


class FormatError(TorchkeepError, ValueError):
    """The input is not a checkpoint torchkeep can read."""

    exit_code = 3


class CorruptCheckpointError(FormatError):
    """The input looks like a checkpoint but its structure is broken or inconsistent."""


class IntegrityError(CorruptCheckpointError):
    """Stored bytes do not match their recorded checksum."""


class LimitExceededError(FormatError):
    """A named limit was exceeded; raise it with ``limits=Limits(...)`` if the file is trusted."""


class UnsupportedFormatError(FormatError):
    """A recognised format that torchkeep deliberately does not read (``format`` names it:
    ``torchscript``, ``torch-tar``, ``numpy`` ...)."""

    exit_code = 2

    def __init__(self, message: str, *, source: object = None, format: str = "") -> None:
        self.format = format
        super().__init__(message, source=source)


class UnsafeCheckpointError(TorchkeepError, ValueError):
    """The file asks for a global (importable name) outside the allowlist."""

    exit_code = 4

    def __init__(self, message: str, *, source: object = None, global_name: str = "") -> None:
        self.global_name = global_name
        super().__init__(message, source=source)


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """The path does not exist or holds no checkpoint."""

    exit_code = 3


class UnsupportedTypeError(TorchkeepError, TypeError):
    """``save`` was given an object it does not write (it never pickles arbitrary objects)."""

    exit_code = 2


class StorageError(TorchkeepError, OSError):
    """Reading or writing the underlying medium failed."""

    exit_code = 3


class MissingDependencyError(TorchkeepError, ImportError):
    """An optional dependency (torch, fsspec) is required for this operation."""

    exit_code = 2


class DeviceError(TorchkeepError, RuntimeError):
    """A storage's saved location cannot be restored here (no CUDA, an unknown backend);
    ``map_location`` says where to put it instead."""

    exit_code = 3


class AsyncSaveError(TorchkeepError, RuntimeError):
    """A background save failed; ``__cause__`` is the original exception."""


class DistributedError(TorchkeepError, RuntimeError):
    """A distributed operation failed on one or more ranks."""


class ScriptFailedError(TorchkeepError, RuntimeError):
    """A training script ``torchkeep check-resume`` ran failed, hung or committed nothing;
    ``output`` holds the tail of its output."""

    exit_code = 3

    def __init__(self, message: str, *, output: str = "", source: object = None) -> None:
        super().__init__(message, source=source)
        self.output = output
