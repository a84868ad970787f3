"""One storage's bytes: a private copy (read in parallel) or a copy-on-write map slice."""

from __future__ import annotations

import os
from concurrent.futures import wait
from typing import Any

import numpy as np

from torchkeep.errors import CorruptCheckpointError, StorageError
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.storage.source import Source
from torchkeep.storage.workers import worker
from torchkeep.tree import StorageRef

__all__ = ["StorageLoader"]

#: Reads below this many bytes in all are not worth handing to threads.
_PARALLEL_BYTES = 8 << 20
#: A big record is read in pieces of this size, so the threads share it.
_PIECE_BYTES = 16 << 20
_READERS = max(2, min(4, os.cpu_count() or 1))
#: Patch maps a loader makes at most: each splits a memory map in up to three, and a
#: process has a limited number of them (65530 by default on Linux).
_MAX_OVERLAYS = 4096


class StorageLoader:
    """Hands out each root storage's bytes once, as a writable uint8 numpy array.

    ``mmap=None`` copies the bytes of a file (so another program rewriting the file in
    place, as torch.save does, can neither change nor crash the tensors) and maps the
    data files of a step directory (the manager never rewrites a committed step in place;
    a deleted one stays readable while mapped). ``True`` maps a local file copy-on-write:
    nothing is read until touched, but a file truncated in place under the map kills the
    process with SIGBUS when a tensor is touched (as with torch.load(mmap=True)).
    ``False`` always copies. Arrays are cached per storage key, so tensors that share a
    storage share memory. ``prefetch`` reads every copied storage at once, in parallel.
    """

    def __init__(self, parsed: Parsed, *, mmap: bool | None = None) -> None:
        self.parsed = parsed
        sources = [parsed.source, *parsed.extra_sources] if parsed.extra_sources else [
            parsed.source
        ]
        data_sources = parsed.extra_sources or [parsed.source]
        mappable = parsed.native_order and all(
            s.path is not None and s.size > 0 for s in data_sources
        )
        if mmap and not mappable:
            local = all(s.path is not None for s in sources)
            why = (
                "the input is not a local file" if not local
                else "its tensor bytes are not in this machine's byte order"
            )
            raise StorageError(f"mmap=True is not possible: {why}", source=parsed.source.name)
        if mmap is None:
            self.use_mmap = mappable and parsed.format == "torchkeep"
        else:
            self.use_mmap = bool(mmap)
        self.require_mmap = mmap is True
        self._mapped: dict[int, np.ndarray[Any, Any]] = {}
        self._cache: dict[str, np.ndarray[Any, Any]] = {}
        self._read_ahead: dict[str, np.ndarray[Any, Any]] = {}
        self._overlays = 0

    def prefetch(self) -> None:
        """Read every stored record that will be copied, with several threads (the
        kernel's copy and the page faults of the new buffers run side by side)."""
        if self.use_mmap:
            return
        jobs: list[tuple[Source, int, memoryview]] = []
        total = 0
        for key, record in self.parsed.records.items():
            source = record.source or self.parsed.source
            if (record.offset is None or not record.nbytes or key in self._cache
                    or key in self._read_ahead or source.memory() is not None
                    or not source.parallel_reads):
                continue
            out = np.empty(record.nbytes, dtype=np.uint8)
            self._read_ahead[key] = out
            view = out.data  # a memoryview of the new buffer
            for at, part_source, offset, n in _segments(record, source):
                for start in range(at, at + n, _PIECE_BYTES):
                    end = min(start + _PIECE_BYTES, at + n)
                    jobs.append((part_source, offset + start - at, view[start:end]))
            total += record.nbytes
        remote = [job for job in jobs if job[0].remote]
        if remote:  # coalesced and concurrent ranged requests (storage/remote.py)
            jobs = [job for job in jobs if not job[0].remote]
            for source in {id(job[0]): job[0] for job in remote}.values():
                source.readinto_many([(o, v) for s, o, v in remote if s is source])
        if total < _PARALLEL_BYTES:
            for source, offset, view in jobs:
                source.readinto(offset, view)
            return
        pool = worker("read", _READERS)
        futures = [pool.submit(source.readinto, offset, view) for source, offset, view in jobs]
        wait(futures)  # all of them, even after a failure: none may outlive the source
        for future in futures:
            future.result()

    def _whole_map(self, source: Source) -> np.ndarray[Any, Any]:
        found = self._mapped.get(id(source))
        if found is None:
            found = np.frombuffer(source.mapping(), dtype=np.uint8)
            self._mapped[id(source)] = found
        return found

    def root_bytes(self, ref: StorageRef, swap_itemsize: int = 1) -> np.ndarray[Any, Any]:
        """The root storage's bytes (uint8, writable, native order for ``swap_itemsize``)."""
        root = ref.root
        hit = self._cache.get(root.key)
        if hit is not None:
            return hit
        record = self.parsed.record(root)
        if record.nbytes != root.nbytes:
            raise CorruptCheckpointError(
                f"storage {root.key!r} needs {root.nbytes} bytes, its record has {record.nbytes}",
                source=self.parsed.source.name,
            )
        ahead = self._read_ahead.pop(root.key, None)
        data = ahead if ahead is not None else self._read(record)
        if self.parsed.verify is not None:
            self.parsed.verify(root, data.data)
        if not self.parsed.native_order and swap_itemsize > 1:
            data = _byteswap(data, swap_itemsize)
        self._cache[root.key] = data
        return data

    def view_bytes(self, ref: StorageRef, swap_itemsize: int = 1) -> np.ndarray[Any, Any]:
        """The bytes of ``ref`` itself (a legacy view storage is a slice of its root)."""
        data = self.root_bytes(ref, swap_itemsize)
        if ref.base is None:
            return data
        start = _absolute_offset(ref)
        if start + ref.nbytes > data.nbytes:
            raise CorruptCheckpointError(
                f"view storage {ref.key!r} lies outside its root storage",
                source=self.parsed.source.name,
            )
        return data[start : start + ref.nbytes]

    def _patched_map(self, record: Record, source: Source) -> np.ndarray[Any, Any] | None:
        """The record's range of ``source`` mapped copy-on-write, in a map of its own (so
        no other record sees the patches), with its patches' pages mapped over it in place
        where they lie at the same place in a page, else read into it. None when the
        input cannot be mapped so (the caller copies)."""
        patches = _merged_patches(record)
        if self._overlays + len(patches) > _MAX_OVERLAYS:
            return None
        assert record.offset is not None
        mapped = source.private_map(record.offset, record.nbytes)
        if mapped is None:
            return None
        try:
            for start, patch_source, patch_offset, n in patches:
                patch_source.map_into(patch_offset, mapped[start : start + n])
        except StorageError:  # the map may have a hole now: dropped unread, and copied
            mapped.release()
            return None
        self._overlays += len(patches)
        return np.frombuffer(mapped, dtype=np.uint8)

    def _read(self, record: Record) -> np.ndarray[Any, Any]:
        if record.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        if record.offset is not None:
            source = record.source or self.parsed.source
            if self.use_mmap and not record.patches:
                return self._whole_map(source)[record.offset : record.offset + record.nbytes]
            if self.use_mmap:
                patched = self._patched_map(record, source)
                if patched is not None:
                    return patched
            memory = source.memory()
            out = np.empty(record.nbytes, dtype=np.uint8)
            if memory is not None and not record.patches:
                out[:] = np.frombuffer(memory, dtype=np.uint8, count=record.nbytes,
                                       offset=record.offset)
            else:
                for at, part_source, offset, n in _segments(record, source):
                    part_source.readinto(offset, out.data[at : at + n])
            return out
        if record.decode is None:
            raise CorruptCheckpointError(f"record {record.name!r} has no data")
        if self.require_mmap:
            raise StorageError(f"mmap=True is not possible: record {record.name!r} is "
                               "compressed", source=self.parsed.source.name)
        raw = record.decode()
        if len(raw) != record.nbytes:
            raise CorruptCheckpointError(f"record {record.name!r} decoded to the wrong size")
        if isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.flags.writeable:
            return raw  # a fresh buffer of its own (chunks read into place): no second copy
        return np.frombuffer(bytearray(raw), dtype=np.uint8)


def _merged_patches(record: Record) -> list[tuple[int, Source, int, int]]:
    """The record's patches as ``(start, source, offset, nbytes)``, neighbours that
    continue each other in the same file joined (one read or map for a run of chunks)."""
    out: list[tuple[int, Source, int, int]] = []
    for start, part in record.patches:
        assert part.source is not None and part.offset is not None
        if not part.nbytes:
            continue
        if out:
            at, source, offset, n = out[-1]
            if source is part.source and at + n == start and offset + n == part.offset:
                out[-1] = (at, source, offset, n + part.nbytes)
                continue
        out.append((start, part.source, part.offset, part.nbytes))
    return out


def _segments(record: Record, source: Source) -> list[tuple[int, Source, int, int]]:
    """Where the record's bytes come from, in order, as ``(start, source, offset,
    nbytes)``: its patches and the bytes of ``source`` (its own) between them, each
    byte read once."""
    assert record.offset is not None
    out: list[tuple[int, Source, int, int]] = []
    at = 0
    for start, patch_source, offset, n in _merged_patches(record):
        if start > at:
            out.append((at, source, record.offset + at, start - at))
        out.append((start, patch_source, offset, n))
        at = start + n
    if at < record.nbytes:
        out.append((at, source, record.offset + at, record.nbytes - at))
    return out


def _absolute_offset(ref: StorageRef) -> int:
    offset = 0
    node: StorageRef | None = ref
    while node is not None and node.base is not None:
        offset += node.base_offset
        node = node.base
    return offset


def _byteswap(data: np.ndarray[Any, Any], unit: int) -> np.ndarray[Any, Any]:
    if data.nbytes % unit:
        raise CorruptCheckpointError(
            f"a big-endian storage of {data.nbytes} bytes is not a whole number of "
            f"{unit}-byte elements"
        )
    out = data if data.flags.writeable else data.copy()
    view = out.view(np.dtype(f"u{unit}")) if unit in (2, 4, 8) else None
    if view is None:
        raise CorruptCheckpointError(f"cannot byte-swap {unit}-byte elements")
    view.byteswap(inplace=True)
    return out

