"""OS errors of the storage layer, translated once into torchkeep's error tree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torchkeep.errors import CheckpointNotFoundError, StorageError

__all__ = ["translated"]


@contextlib.contextmanager
def translated(path: str, what: str, *, missing_is_not_found: bool = False) -> Iterator[None]:
    """Re-raise an OSError inside the block as StorageError naming ``path`` and ``what``
    (a missing file as CheckpointNotFoundError when ``missing_is_not_found``)."""
    try:
        yield
    except FileNotFoundError as e:
        if missing_is_not_found:
            raise CheckpointNotFoundError(f"{what}: no such file or folder", source=path) from e
        raise StorageError(f"{what} failed: {e.strerror or e}", source=path) from e
    except OSError as e:
        raise StorageError(f"{what} failed: {e.strerror or e}", source=path) from e
