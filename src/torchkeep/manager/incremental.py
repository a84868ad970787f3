"""Incremental steps: write only the chunks that changed since the last committed step.

Each tensor is cut into chunks of at most ``chunk_bytes`` that are contiguous runs of its
bytes (whole trailing dimensions). A chunk whose xxh3-64 equals the one the base step (the
newest committed step) recorded at the same place is not written again: the new entry
names the bytes already in the run's shared ``chunks/`` folder. A tensor whose storage,
view and in-place version counter are those of the base step's save is not even read.
docs/manager.md has the layout and the safety argument.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.errors import TorchkeepError
from torchkeep.formats.manifest import (
    ALIGNMENT,
    PAGE_PHASE,
    POOL_NAME,
    POOL_PREFIX,
    TensorPayload,
    checksum,
    chunk_file_path,
    pool_file_name,
    read_manifest,
)
from torchkeep.storage.filesystem import FileSystem
from torchkeep.tree import StorageRef

__all__ = ["CHUNK_BYTES", "Base", "Delta", "NewChunk", "ShardedDiff", "diff", "plan_chunks",
           "read_base", "usable_files", "version_of", "write_chunks"]

#: the chunk size (bench/incremental.py measures 1, 2, 4 and 8 MiB; docs/manager.md)
CHUNK_BYTES = 4 << 20

Box = tuple[list[int], list[int], int, int]  # offsets, sizes, byte start, nbytes


#: a sharded piece at least this big is written at its place in a page (PAGE_PHASE)
PAGE_ALIGNED_BYTES = 1 << 20


def plan_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> list[Box]:
    """Boxes cutting a C-contiguous tensor into contiguous runs of at most ``chunk_bytes``
    (one element at least): whole rows where a row fits, else pieces of one row."""
    nbytes = math.prod(shape) * itemsize
    if nbytes <= chunk_bytes or not shape:
        return [([0] * len(shape), list(shape), 0, nbytes)]
    k = 0  # the first dimension whose trailing block fits in a chunk
    while math.prod(shape[k + 1:]) * itemsize > chunk_bytes:
        k += 1
    inner = math.prod(shape[k + 1:]) * itemsize
    run = max(1, chunk_bytes // inner)
    boxes: list[Box] = []
    for lead in itertools.product(*(range(n) for n in shape[:k])):
        for j in range(0, shape[k], run):
            n = min(run, shape[k] - j)
            offsets = [*lead, j, *([0] * (len(shape) - k - 1))]
            start = 0
            for o, s in zip(offsets, shape, strict=True):
                start = start * s + o
            boxes.append((offsets, [*([1] * k), n, *shape[k + 1:]], start * itemsize,
                          n * inner))
    return boxes


@dataclass(frozen=True, slots=True)
class Version:
    """What identifies a tensor's bytes as unchanged since a save: the same storage
    object (held weakly, so a freed one never matches a new one at its address), the same
    view and the same in-place version counter."""

    storage: weakref.ref[Any]
    view: tuple[Any, ...]
    counter: int


def version_of(original: Any) -> Version | None:
    """The Version of a plain dense torch tensor, or None when it cannot be trusted
    (inference tensors keep no counter; subclasses and other layouts are always hashed)."""
    if type(original) not in (torch.Tensor, torch.nn.Parameter):
        return None
    t: torch.Tensor = original
    if t.layout != torch.strided or t.is_inference():
        return None
    try:
        storage = t.untyped_storage()
        return Version(weakref.ref(storage),
                       (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device),
                       t._version)
    except (RuntimeError, TypeError):
        return None


def _same(a: Version | None, b: Version | None) -> bool:
    if a is None or b is None:
        return False
    storage = a.storage()
    return storage is not None and storage is b.storage() and a.view == b.view \
        and a.counter == b.counter


@dataclass(slots=True)
class Base:
    """The step an incremental save compares with: the newest committed step."""

    step: int
    #: its manifest's tensor table
    entries: dict[str, dict[str, Any]]
    #: incremental steps since its last full step (0: it is full)
    since_full: int
    #: the tensors' versions when this process saved it (empty when read from disk)
    versions: dict[str, Version] = field(default_factory=dict)


def read_base(fs: FileSystem, directory: str, step: int) -> Base:
    """Committed step ``step`` (in ``directory``) as a Base, from its manifest (raises
    when it cannot be read)."""
    manifest = read_manifest(fs, directory)
    entries = manifest.get("tensors")
    info = manifest.get("incremental")
    since = info.get("since_full") if isinstance(info, dict) else None
    return Base(step, entries if isinstance(entries, dict) else {},
                since if type(since) is int else 0)


def usable_files(fs: FileSystem, directory: str, base: Base) -> set[str]:
    """The shared data files of ``base``'s chunks (``directory`` is its folder) that are
    there whole: one size lookup a file, so a chunk whose file went missing or was cut
    short is written again, never named."""
    ends: dict[str, int] = {}
    for entry in base.entries.values():
        for chunk in (entry.get("chunks") or ()) if isinstance(entry, dict) else ():
            name = str(chunk.get("file", ""))
            if name.startswith(POOL_PREFIX):
                end = int(chunk.get("offset", 0)) + int(chunk.get("nbytes", 0))
                ends[name] = max(ends.get(name, 0), end)
    usable = set()
    for name, end in ends.items():
        path = chunk_file_path(fs, directory, name)
        try:
            if path is not None and fs.size(path) >= end:
                usable.add(name)
        except TorchkeepError:
            continue
    return usable


@dataclass(slots=True)
class NewChunk:
    """A chunk to write: its manifest entry (``file`` and ``offset`` set when written)
    and its bytes."""

    chunk: dict[str, Any]
    data: memoryview
    #: where the chunk starts in its tensor's bytes, when it is one of several: written at
    #: the same place in a page, so a restore maps it over the tensor's other bytes
    #: instead of copying it (storage/fixedmap.py)
    phase: int | None = None


@dataclass(slots=True)
class Delta:
    """What an incremental save writes: every tensor's entry, the new chunks, and the
    versions to remember once it is committed."""

    entries: dict[str, dict[str, Any]]
    new: list[NewChunk]
    versions: dict[str, Version]
    full: bool
    #: bytes of the chunks taken from earlier steps
    shared_bytes: int = 0
    #: tensors found unchanged by their version counter (never read)
    untouched: int = 0

    @property
    def new_bytes(self) -> int:
        """Bytes of the chunks this save writes."""
        return sum(c.data.nbytes for c in self.new)


def diff(
    payloads: list[TensorPayload],
    originals: dict[str, Any],
    storage_bytes: Callable[[StorageRef], Any],
    base: Base | None,
    *,
    chunk_bytes: int,
    usable: Callable[[str], bool],
    trust_versions: bool = True,
) -> Delta:
    """Compare a save's tensors with ``base`` (None: a full save writes every chunk).

    ``usable(file)`` says whether a file of the base's chunks is still there whole; chunks
    of other files are written again.
    """
    entries: dict[str, dict[str, Any]] = {}
    new: list[NewChunk] = []
    versions: dict[str, Version] = {}
    shared = untouched = 0
    for payload in payloads:
        ref = payload.ref
        version = version_of(originals.get(payload.name))
        if version is not None:
            versions[payload.name] = version
        boxes = plan_chunks(tuple(ref.shape), ref.dtype.itemsize, chunk_bytes)
        previous = _comparable(base, payload, boxes)
        entry: dict[str, Any] = {
            "dtype": ref.dtype.name,
            "shape": list(ref.shape),
            **({"requires_grad": True} if ref.requires_grad else {}),
            **({"parameter": True} if ref.parameter else {}),
        }
        if (previous is not None and trust_versions and base is not None
                and _same(version, base.versions.get(payload.name))
                and all(usable(c["file"]) for c in previous)):
            entry["chunks"] = [dict(c) for c in previous]
            shared += sum(c["nbytes"] for c in previous)
            untouched += 1
            entries[payload.name] = entry
            continue
        data = payload.bytes(storage_bytes)
        chunks = []
        for index, (offsets, sizes, start, n) in enumerate(boxes):
            piece = data[start : start + n]
            digest = checksum(piece)
            old = previous[index] if previous is not None else None
            if old is not None and old["xxh3"] == digest and usable(old["file"]):
                chunks.append(dict(old))
                shared += n
                continue
            chunk = {"offsets": offsets, "shape": sizes, "file": "", "offset": 0,
                     "nbytes": n, "xxh3": digest}
            chunks.append(chunk)
            new.append(NewChunk(chunk, piece, start if len(boxes) > 1 else None))
        entry["chunks"] = chunks
        entries[payload.name] = entry
    return Delta(entries, new, versions, base is None, shared, untouched)


def _comparable(base: Base | None, payload: TensorPayload,
                boxes: list[Box]) -> list[dict[str, Any]] | None:
    """The base's chunks of the same tensor when they are cut the same way and lie in the
    shared folder, else None."""
    if base is None:
        return None
    entry = base.entries.get(payload.name)
    if not isinstance(entry, dict) or entry.get("dtype") != payload.ref.dtype.name \
            or entry.get("shape") != list(payload.ref.shape):
        return None
    chunks = entry.get("chunks")
    if not isinstance(chunks, list) or len(chunks) != len(boxes):
        return None
    for chunk, (offsets, sizes, _, n) in zip(chunks, boxes, strict=True):
        if not isinstance(chunk, dict) or chunk.get("offsets") != offsets \
                or chunk.get("shape") != sizes or chunk.get("nbytes") != n \
                or not str(chunk.get("file", "")).startswith(POOL_PREFIX):
            return None
    return chunks


def write_chunks(fs: FileSystem, path: str, file_ref: str, new: list[NewChunk], *,
                 fsync: bool) -> None:
    """Write the new chunks into data file ``path`` and point their entries at it as
    ``file_ref``: each 64-byte aligned, or at its ``phase`` in a page (the chunks of one
    tensor written in a row need no padding between them)."""

    def produce(write: Callable[[Any], Any]) -> None:
        offset = 0
        for item in new:
            phase, unit = (0, ALIGNMENT) if item.phase is None else (item.phase, PAGE_PHASE)
            pad = (phase - offset) % unit
            if pad:
                write(b"\0" * pad)
                offset += pad
            if item.data.nbytes:
                write(item.data)
            item.chunk["file"] = file_ref
            item.chunk["offset"] = offset
            offset += item.data.nbytes

    fs.write_file(path, produce, fsync=fsync)


class ShardedDiff:
    """One rank's side of an incremental sharded save: DCP hands each chunk of the rank's
    tensors to ``pieces``, which cuts it like ``plan_chunks`` and compares the pieces with
    the base step's at the same global offsets; ``write`` puts the new ones into this
    rank's file of the shared folder. StepWriter (torchkeep.distributed) calls both.

    Every piece is hashed, never trusted by its version counter: the shard tensors DCP
    hands over kept their storage, view and counter across an FSDP2 optimizer step that
    changed them (measured: a step trusted that way kept the old weights)."""

    def __init__(self, *, step: int, rank: int, base: Base | None, chunk_bytes: int,
                 usable: set[str]) -> None:
        self.step = step
        self.rank = rank
        self.base = base
        self.chunk_bytes = chunk_bytes
        self.usable = usable
        #: the files this rank wrote (removed when the save fails)
        self.written: list[tuple[FileSystem, str]] = []
        self._pieces: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        for fqn, entry in (base.entries.items() if base is not None else ()):
            for chunk in entry.get("chunks") or ():
                name = str(chunk.get("file", ""))
                if name.startswith(POOL_PREFIX) and name in usable:
                    self._pieces[(fqn, tuple(chunk.get("offsets") or ()))] = chunk

    def pieces(self, fqn: str, offsets: list[int], tensor: torch.Tensor,
               raw: Callable[[], memoryview]) -> tuple[list[dict[str, Any]], list[NewChunk]]:
        """The manifest chunks of one DCP chunk (global ``offsets``) and those to write;
        ``raw()`` gives its C-contiguous CPU bytes."""
        boxes = plan_chunks(tuple(tensor.shape), tensor.element_size(), self.chunk_bytes)
        placed = [[o + b for o, b in zip(offsets, box, strict=True)] for box, *_ in boxes]
        previous = []
        for at, (_, sizes, _, n) in zip(placed, boxes, strict=True):
            old = self._pieces.get((fqn, tuple(at)))
            ok = old is not None and old.get("shape") == sizes and old.get("nbytes") == n
            previous.append(old if ok else None)
        data = raw()
        chunks: list[dict[str, Any]] = []
        new: list[NewChunk] = []
        for at, (_, sizes, start, n), old in zip(placed, boxes, previous, strict=True):
            piece = data[start : start + n]
            digest = checksum(piece)
            if old is not None and old["xxh3"] == digest:
                chunks.append(dict(old))
                continue
            chunk = {"offsets": at, "shape": sizes, "file": "", "offset": 0, "nbytes": n,
                     "xxh3": digest, "new": True}
            chunks.append(chunk)
            # a piece of a sharded tensor: its place in the whole tensor is not known here,
            # its place in the rank's chunk stands for it (the same for row-wise shards)
            phase = start if len(boxes) > 1 or any(offsets) or n >= PAGE_ALIGNED_BYTES else None
            new.append(NewChunk(chunk, piece, phase))
        return chunks, new

    def write(self, fs: FileSystem, step_path: str, new: list[NewChunk], *,
              fsync: bool) -> None:
        """Write this rank's new chunks into a new file of the shared folder beside the
        step folder ``step_path``."""
        if not new:
            return
        pool = fs.join(fs.parent(step_path), POOL_NAME)
        fs.makedirs(pool)
        name = pool_file_name(self.step, self.rank)
        path = fs.join(pool, name)
        self.written.append((fs, path))
        write_chunks(fs, path, POOL_PREFIX + name, new, fsync=fsync)
        if fsync:
            fs.fsync_dir(pool)

    def discard(self) -> None:
        """Remove what this rank wrote (the save failed)."""
        for fs, path in self.written:
            try:
                if fs.exists(path):
                    fs.remove(path)
            except Exception:  # best effort: the next manager to open the run collects it
                continue
        self.written.clear()
