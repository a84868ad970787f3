"""Writing zip archives laid out exactly as torch's C++ writer (miniz) lays them out.

Every record is stored, its payload aligned to ``alignment`` bytes by a padding extra
field ("FB" + length + "Z"s) in the local header; sizes and CRC-32 follow the data in
a descriptor; a zip64 end record is always written. This layout is what lets
``torch.load(mmap=True)`` and torch's computed-offset reader work on the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchkeep.formats.serialization_id import serialization_id
from torchkeep.formats.zipstructs import (
    CENTRAL_HEADER,
    DESCRIPTOR,
    DESCRIPTOR64,
    END_RECORD,
    LOCAL_HEADER,
    ZIP64_END_RECORD,
    ZIP64_LOCATOR,
)
from torchkeep.storage.checksums import crc32

__all__ = ["ZipWriter"]

_U32_MAX = 0xFFFFFFFF
_SMALL_WRITE = 1 << 16
#: the padding extra field for every pad length below 64 (the default alignment)
_PADS = [b"FB" + struct.pack("<H", n) + b"Z" * n for n in range(64)]


def _pad_field(pad: int) -> bytes:
    """The extra field that pads a local header by ``pad`` bytes, as miniz writes it."""
    return _PADS[pad] if pad < len(_PADS) else b"FB" + struct.pack("<H", pad) + b"Z" * pad


@dataclass(slots=True)
class _Entry:
    name: bytes
    offset: int
    size: int
    crc: int


Write = Callable[[Any], Any]


class ZipWriter:
    """Streams records to ``write`` (a callable taking a bytes-like), tracking offsets.

    Small pieces are gathered and written together; large payloads go straight from
    the caller's memory. Needs no ``seek``, so any writable stream works.
    """

    def __init__(
        self,
        write: Write,
        archive_name: str,
        *,
        alignment: int = 64,
        compute_crc: bool = True,
    ) -> None:
        self._write = write
        self.prefix = archive_name + "/"
        self.alignment = alignment
        self.compute_crc = compute_crc
        self.offset = 0
        self._pending = bytearray()
        self._entries: list[_Entry] = []
        self._names: list[str] = []
        self._crcs: list[int] = []

    # -- output ------------------------------------------------------------------------

    def _emit(self, data: Any) -> None:
        n = memoryview(data).nbytes
        if n < _SMALL_WRITE:
            self._pending += data
            if len(self._pending) >= _SMALL_WRITE:
                self._flush()
        else:
            self._flush()
            self._write(data)
        self.offset += n

    def _flush(self) -> None:
        if self._pending:
            self._write(self._pending)
            self._pending = bytearray()

    # -- records -----------------------------------------------------------------------

    def _padding(self, name: bytes, size: int) -> bytes:
        start = self.offset + LOCAL_HEADER.size + len(name) + 4
        if size < _U32_MAX and self.offset < _U32_MAX:  # the common case, no zip64 block
            return _pad_field((-start) % self.alignment)
        start += 4
        body = b""
        if size >= _U32_MAX:
            start += 16
            body += struct.pack("<QQ", size, 0)
        if self.offset >= _U32_MAX:
            start += 8
            body += struct.pack("<Q", self.offset)
        zip64 = struct.pack("<HH", 1, len(body)) + body
        return zip64 + _pad_field((-start) % self.alignment)

    def begin(self, record: str, size: int) -> None:
        """Write the local header of ``record`` whose payload will have ``size`` bytes."""
        name = (self.prefix + record).encode("utf-8")
        extra = self._padding(name, size)
        header = LOCAL_HEADER.pack(b"PK\x03\x04", 0, 0x0808 if size else 0x0800, 0, 0, 0, 0, 0, 0,
                             len(name), len(extra))
        self._entries.append(_Entry(name, self.offset, size, 0))
        self._names.append(record)
        self._emit(header + name + extra)

    def payload(self, data: Any) -> None:
        """Write part of the current record's payload."""
        if memoryview(data).nbytes:
            self._emit(data)

    def end(self, crc: int | None = None) -> None:
        """Close the current record: its data descriptor (when non-empty) with ``crc``."""
        entry = self._entries[-1]
        entry.crc = crc or 0
        if entry.size:
            self._crcs.append(entry.crc)
            if entry.size >= _U32_MAX or entry.offset >= _U32_MAX:
                desc = DESCRIPTOR64.pack(b"PK\x07\x08", entry.crc, entry.size, entry.size)
            else:
                desc = DESCRIPTOR.pack(b"PK\x07\x08", entry.crc, entry.size, entry.size)
            self._emit(desc)

    def add(self, record: str, data: Any) -> None:
        """Write a whole record from one buffer, computing its CRC-32 when enabled."""
        view = memoryview(data).cast("B")
        self.begin(record, view.nbytes)
        self.payload(view)
        self.end(crc32(view) if self.compute_crc and view.nbytes else 0)

    # -- directory -----------------------------------------------------------------------

    def finish(self) -> int:
        """Write ``.data/serialization_id``, the central directory and end records.

        Returns the archive's total size in bytes.
        """
        ident = serialization_id(self._names, self._crcs)
        self.add(".data/serialization_id", ident.encode("ascii"))
        cd_offset = self.offset
        directory = bytearray()
        for entry in self._entries:
            zip64 = b""
            size32 = entry.size
            offset32 = entry.offset
            if entry.size >= _U32_MAX:
                zip64 += struct.pack("<QQ", entry.size, entry.size)
                size32 = _U32_MAX
            if entry.offset >= _U32_MAX:
                zip64 += struct.pack("<Q", entry.offset)
                offset32 = _U32_MAX
            extra = struct.pack("<HH", 1, len(zip64)) + zip64 if zip64 else b""
            flags = 0x0808 if entry.size else 0x0800
            directory += CENTRAL_HEADER.pack(
                b"PK\x01\x02", 0, 0, flags, 0, 0, 0, entry.crc, size32, size32,
                len(entry.name), len(extra), 0, 0, 0, 0, offset32,
            )
            directory += entry.name + extra
        self._emit(directory)
        cd_size = len(directory)
        count = len(self._entries)
        z64_offset = self.offset
        tail = ZIP64_END_RECORD.pack(
            b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count, count, cd_size, cd_offset
        )
        tail += ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, z64_offset, 1)
        tail += END_RECORD.pack(
            b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
            min(cd_size, _U32_MAX), min(cd_offset, _U32_MAX), 0,
        )
        self._emit(tail)
        self._flush()
        return self.offset
