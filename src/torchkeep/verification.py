"""``torchkeep.verify``: are the bytes on disk the bytes the writer wrote?"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from torchkeep.api import parse_source, step_directory
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.formats.dcp import read_dcp_dir
from torchkeep.formats.detect import detect, directory_format
from torchkeep.formats.manifest import read_step_dir
from torchkeep.formats.ziparchive import ZipArchive
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.checksums import crc32
from torchkeep.storage.filesystem import FileSystem, open_filesystem
from torchkeep.storage.source import Source, open_source
from torchkeep.unpickle import Allowlist, AllowSpec

__all__ = ["Verification", "verify"]

_CHUNK = 16 << 20


@dataclass(slots=True)
class Verification:
    """What was checked, and the first problem found (None when intact)."""

    path: str
    format: str
    checked: int = 0
    checked_bytes: int = 0
    unchecked: list[str] = field(default_factory=list)
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        """True when every checksum matched and the structure is sound."""
        return self.problem is None


def _stream(source: Source, offset: int, size: int, progress: Callable[[int], None],
            update: Callable[[memoryview], None]) -> None:
    """Feed ``size`` bytes at ``offset`` to ``update`` in 16 MiB chunks (bounded memory)."""
    buffer = memoryview(bytearray(min(size, _CHUNK)))
    done = 0
    while done < size:
        n = min(_CHUNK, size - done)
        source.readinto(offset + done, buffer[:n])
        update(buffer[:n])
        done += n
        progress(n)


def _crc_of(source: Source, offset: int, size: int, progress: Callable[[int], None]) -> int:
    crc = [0]
    _stream(source, offset, size, progress, lambda chunk: crc.__setitem__(0, crc32(
        chunk, crc[0])))
    return crc[0]


def _xxh3_of(source: Source, offset: int, size: int, progress: Callable[[int], None]) -> str:
    digest = xxhash.xxh3_64()
    _stream(source, offset, size, progress, digest.update)
    return f"{digest.intdigest():016x}"


def verify(f: Any, *, limits: Limits = DEFAULT_LIMITS,
           progress: Callable[[int], None] | None = None) -> Verification:
    """Check every checksum ``f`` carries (zip CRC-32s, step-manifest xxh3s) and its
    structure (safetensors bounds, pickle, storage sizes). Never raises for corruption:
    the result names the first bad record or tensor."""
    tick = progress or (lambda n: None)
    hf = _hf_verification(f, limits, tick)
    if hf is not None:
        return hf
    directory = step_directory(f)
    if directory is not None:
        fs, path = open_filesystem(directory)
        if directory_format(fs, path) == "dcp":
            return _verify_dcp(fs, path, directory, limits, tick)
        return _verify_step(directory, limits, tick)
    return _verify_file(f, limits, tick, ())


def _verify_file(f: Any, limits: Limits, tick: Callable[[int], None],
                 allow: Iterable[AllowSpec]) -> Verification:
    source = open_source(f)
    try:
        fmt = detect(source)
        result = Verification(source.name, fmt)
        try:
            if fmt == "torch":
                _verify_zip(source, result, limits, tick)
            # structure: the full parse checks sizes, bounds, pickle and views
            parse_source(source, allowlist=Allowlist(allow), limits=limits)
        except CorruptCheckpointError as e:
            if result.problem is None:
                result.problem = e.reason
        if fmt == "safetensors":
            result.notes.append("safetensors carries no checksums: header and bounds checked")
        elif fmt in ("torch-legacy", "pickle"):
            result.notes.append(f"the {fmt} format carries no checksums: structure checked")
        return result
    finally:
        source.close()


def _hf_verification(f: Any, limits: Limits,
                     tick: Callable[[int], None]) -> Verification | None:
    """A Hugging Face folder or index, a Trainer or Accelerate folder: every file verified
    as the file it is, then the whole read as one checkpoint (an index checked against its
    shards: every name in its shard, none in two)."""
    from torchkeep.formats.hf_folder import hf_files, read_hf_index
    from torchkeep.formats.hf_training import TRANSFORMERS_RECORDS, read_training_folder

    try:
        found = hf_files(f)
    except CorruptCheckpointError as e:
        return Verification(str(f), "hf-index", problem=e.reason)
    if found is None:
        return None
    fs = found.fs
    if found.kind == "single":
        return verify(fs.describe(found.root), limits=limits, progress=tick)
    training = found.kind == "training"
    result = Verification(fs.describe(found.root), "hf-training" if training else "hf-index")
    allow = TRANSFORMERS_RECORDS if training else ()
    notes: dict[str, list[str]] = {}
    for path in found.files:
        name = path.rsplit("/", 1)[-1]
        if not fs.exists(path):
            result.problem = f"{name} named by the index is missing"
            return result
        part = _verify_file(fs.describe(path), limits, tick, allow)
        result.checked += part.checked
        result.checked_bytes += part.checked_bytes
        result.unchecked += part.unchecked
        for note in part.notes:
            notes.setdefault(note, []).append(name)
        if part.problem is not None:
            result.problem = f"{name}: {part.problem}"
            return result
    count = len(found.files)
    result.notes += [f"{note} ({len(names)} of {count} files)" if count > 1 else note
                     for note, names in notes.items()]
    try:
        if training:
            read_training_folder(fs, found.root, limits=limits).close()
        else:
            read_hf_index(fs, found.root, limits=limits).close()
    except CorruptCheckpointError as e:
        result.problem = e.reason
    return result


def _verify_zip(source: Source, result: Verification, limits: Limits,
                tick: Callable[[int], None]) -> None:
    archive = ZipArchive(source, limits=limits)
    for name in archive.order:
        member = archive.members[name]
        if member.crc == 0 and member.size:
            result.unchecked.append(name)
            continue
        if member.stored:
            actual = _crc_of(source, member.data_offset, member.size, tick)
        else:
            actual = crc32(archive.read(name, verify=False))
            tick(member.size)
        if actual != member.crc:
            result.problem = (f"record {name!r}: CRC-32 {actual:08x} does not match the "
                              f"recorded {member.crc:08x}")
            return
        result.checked += 1
        result.checked_bytes += member.size
    if result.unchecked:
        result.notes.append(f"{len(result.unchecked)} records carry no CRC-32 (written with "
                            "torch.serialization.set_crc32_options(False))")


def _verify_dcp(fs: FileSystem, path: str, directory: str, limits: Limits,
                tick: Callable[[int], None]) -> Verification:
    """A DCP directory: the structure (``.metadata``, every item's zip archive and bounds,
    chunk coverage), then the CRC-32 of every zip record of every item."""
    result = Verification(directory, "dcp")
    items: list[tuple[str, Source]] = []
    try:
        parsed = read_dcp_dir(path, fs=fs, limits=limits, items=items)
    except CorruptCheckpointError as e:
        result.problem = e.reason
        return result
    try:
        for label, item in items:
            part = Verification(label, "torch")
            _verify_zip(item, part, limits, tick)
            result.checked += part.checked
            result.checked_bytes += part.checked_bytes
            result.unchecked.extend(f"{label}: {name}" for name in part.unchecked)
            if part.problem is not None:
                result.problem = f"{label}: {part.problem}"
                break
    finally:
        parsed.close()
    if result.unchecked:
        result.notes.append(f"{len(result.unchecked)} item records carry no CRC-32")
    result.notes.append("DCP records no checksums of its own (.metadata has none): checked "
                        "are its structure, bounds and chunk coverage, and the CRC-32s "
                        "torch.save wrote into each item's zip records")
    return result


def _verify_step(directory: str, limits: Limits, tick: Callable[[int], None]) -> Verification:
    result = Verification(directory, "torchkeep")
    try:
        # the manifest's own checksum, every chunk's bounds and the tree's structure
        parsed = read_step_dir(directory, limits=limits)
    except (CorruptCheckpointError, KeyError, TypeError, ValueError) as e:
        result.problem = e.reason if isinstance(e, TorchkeepError) else f"malformed manifest ({e})"
        return result
    try:
        result.checked += 1
        for name, record in parsed.records.items():
            for part in record.parts or (record,):  # a sharded tensor: each of its chunks
                assert part.source is not None and part.offset is not None
                if _xxh3_of(part.source, part.offset, part.nbytes, tick) != part.xxh3:
                    where = f", {part.name}," if record.parts else ""
                    result.problem = f"tensor {name!r}{where} does not match its checksum"
                    break
                result.checked += 1
                result.checked_bytes += part.nbytes
            if result.problem:
                break
    finally:
        parsed.close()
    return result
