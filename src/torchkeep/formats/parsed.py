"""What every format reader returns: the tree of placeholders and where each storage lies."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchkeep.storage.source import Source
from torchkeep.tree import StorageRef

__all__ = ["Parsed", "Record"]


@dataclass(frozen=True, slots=True)
class Record:
    """Where one storage's bytes are: ``nbytes`` at ``offset`` of the source, stored as is.

    ``decode`` is set instead when the bytes must be produced (a deflated zip record); it
    returns exactly ``nbytes`` bytes. ``crc32`` is the recorded CRC-32, when there is one.
    """

    nbytes: int
    offset: int | None = None
    decode: Callable[[], bytes] | None = None
    crc32: int | None = None
    name: str = ""
    #: the input holding the bytes, when it is not the parsed file itself (step directories)
    source: Source | None = None
    #: the recorded xxh3-64 as 16 hex digits, when there is one (step directories)
    xxh3: str | None = None
    #: the chunks a sharded tensor is assembled from (``decode`` assembles them), each a
    #: Record of its own bytes with its own checksum
    parts: tuple[Record, ...] = ()
    #: ``(start, record)``: ranges of these bytes that come from other records instead
    #: (an incremental step's changed chunks over the bytes of an earlier step)
    patches: tuple[tuple[int, Record], ...] = ()


@dataclass(slots=True)
class Parsed:
    """A parsed checkpoint: the object tree with TensorRef placeholders, and its records.

    ``format`` is ``torch`` (zip), ``torch-legacy``, ``safetensors``, ``pickle`` or
    ``torchkeep`` (a manager step directory). ``byteorder`` is the order of the stored
    tensor bytes. ``info`` holds facts the file records about its writer.
    """

    format: str
    tree: Any
    source: Source
    records: dict[str, Record]
    byteorder: str = "little"
    info: dict[str, Any] = field(default_factory=dict)
    #: optional check run on a storage's bytes when they are read (manifest checksums)
    verify: Callable[[StorageRef, memoryview], None] | None = None
    #: further inputs records point into (data files of a step directory)
    extra_sources: list[Source] = field(default_factory=list)

    @property
    def native_order(self) -> bool:
        """True when stored bytes are in this machine's byte order."""
        return self.byteorder == sys.byteorder

    def record(self, ref: StorageRef) -> Record:
        """The record holding a storage's root bytes."""
        return self.records[ref.root.key]

    def close(self) -> None:
        """Release the inputs."""
        self.source.close()
        for source in self.extra_sources:
            source.close()
