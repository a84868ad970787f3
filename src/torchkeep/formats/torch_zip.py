"""The torch zip format (``torch.save`` since 1.6): reading it into placeholders, writing it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError
from torchkeep.formats.detect import archive_format, unsupported
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.formats.pickler import Describe, TreePickler
from torchkeep.formats.ziparchive import ZipArchive, ZipMember
from torchkeep.formats.zipwrite import ZipWriter
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source
from torchkeep.tree import StorageRef, StorageView
from torchkeep.unpickle import Allowlist, unpickle
from torchkeep.unpickle.torch_globals import storage_pid

__all__ = ["archive_name_for", "archive_prefix", "read_torch_zip", "write_torch_zip"]

MIN_VERSION, MAX_VERSION = 1, 10  # what torch 2.13's reader accepts


def archive_prefix(archive: ZipArchive) -> str:
    """The top folder every record lives in (torch takes it from the first entry)."""
    if not archive.order:
        raise CorruptCheckpointError("zip archive has no records", source=archive.source.name)
    first = archive.order[0]
    prefix, slash, _ = first.partition("/")
    if not slash or not prefix:
        raise CorruptCheckpointError(
            f"record {first!r} is not inside a top folder, as torch checkpoints are",
            source=archive.source.name,
        )
    for name in archive.order:
        if not name.startswith(prefix + "/"):
            raise CorruptCheckpointError(
                f"record {name!r} is outside the archive folder {prefix!r}",
                source=archive.source.name,
            )
    return prefix


def read_torch_zip(
    source: Source, *, allowlist: Allowlist, limits: Limits = DEFAULT_LIMITS
) -> Parsed:
    """Parse a torch zip checkpoint into placeholders without reading tensor bytes."""
    # remote: large records' local headers are checked when their data is read
    archive = ZipArchive(source, limits=limits, defer_headers=True)
    kind = archive_format(archive.order)
    if kind != "torch":
        raise unsupported(kind, source.name)
    prefix = archive_prefix(archive)
    members = archive.members

    def member(record: str) -> ZipMember | None:
        return members.get(f"{prefix}/{record}")

    def small(record: str) -> bytes | None:
        found = member(record)
        if found is None:
            return None
        if found.size > 4096:
            raise CorruptCheckpointError(f"record {record!r} is too large", source=source.name)
        return archive.read(found.name)

    data_pkl = member("data.pkl")
    if data_pkl is None:
        raise unsupported("zip", source.name)
    version_raw = small(".data/version") or small("version")
    if version_raw is None:
        raise CorruptCheckpointError("missing the version record", source=source.name)
    try:
        version = int(version_raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptCheckpointError(
            f"version record {version_raw[:20]!r} is not a number", source=source.name
        ) from None
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise UnsupportedFormatError(
            f"archive version {version} is outside the supported {MIN_VERSION}..{MAX_VERSION}",
            source=source.name,
        )
    byteorder_raw = small("byteorder")
    byteorder = "little"
    if byteorder_raw is not None:
        byteorder = byteorder_raw.decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CorruptCheckpointError(
                f"unknown byte order {byteorder!r} in the byteorder record", source=source.name
            )

    storages: dict[str, StorageRef] = {}
    records: dict[str, Record] = {}

    def persistent_load(pid: Any) -> StorageView:
        storage_class, key, location, numel, _ = storage_pid(pid, 5)
        nbytes = numel * storage_class.dtype.itemsize
        found = storages.get(key)
        if found is not None:
            if found.nbytes != nbytes:
                raise CorruptCheckpointError(
                    f"storage {key} is declared with {found.nbytes} and {nbytes} bytes"
                )
            return StorageView(found, storage_class.dtype, storage_class.untyped)
        limits.check("max_tensor_bytes", nbytes, f"storage {key} bytes")
        rec = member(f"data/{key}")
        if rec is None:
            raise CorruptCheckpointError(f"storage record data/{key} is missing")
        if rec.size != nbytes:
            raise CorruptCheckpointError(
                f"record data/{key} has {rec.size} bytes, its storage declares {nbytes}"
            )
        archive.check_inflation(rec)
        ref = StorageRef(key, storage_class.dtype, nbytes, location)
        storages[key] = ref
        records[key] = _record(archive, rec)
        return StorageView(ref, storage_class.dtype, storage_class.untyped)

    limits.check("max_pickle_bytes", data_pkl.size, f"{data_pkl.name} size")
    result = unpickle(
        archive.read(data_pkl.name),
        allowlist=allowlist,
        persistent_load=persistent_load,
        limits=limits,
        what=f"{data_pkl.name}",
    )
    info: dict[str, Any] = {
        "archive_name": prefix,
        "version": version,
        "byteorder": byteorder if byteorder_raw is not None else None,
    }
    for name, record in ((".format_version", "format_version"),
                         (".storage_alignment", "storage_alignment")):
        raw = small(name)
        if raw is not None:
            info[record] = raw.decode("ascii", "replace").strip()
    serial = small(".data/serialization_id")
    if serial is not None:
        info["serialization_id"] = serial.decode("ascii", "replace")
    info["records"] = len(archive.order)
    info["compressed_records"] = sum(1 for m in members.values() if not m.stored)
    return Parsed("torch", result.value, source, records, byteorder, info)


def _record(archive: ZipArchive, member: ZipMember) -> Record:
    if member.stored:
        return Record(member.size, offset=member.data_offset, crc32=member.crc, name=member.name)
    return Record(
        member.size,
        decode=lambda: archive.read(member.name, verify=True),
        crc32=member.crc,
        name=member.name,
    )


def archive_name_for(f: Any) -> str:
    """The top folder torch.save would use: the file's base name minus its last suffix.

    ``archive`` for file objects, non-ASCII names and names that would leave nothing
    (``.hidden``, where torch.save itself fails).
    """
    import os

    if not isinstance(f, (str, os.PathLike)):
        return "archive"
    text = os.fspath(f)
    if isinstance(text, bytes):
        return "archive"
    base = text.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    if not stem or not stem.isascii():
        return "archive"
    return stem


def write_torch_zip(
    obj: Any,
    write: Callable[[Any], Any],
    *,
    describe: Describe | None,
    storage_bytes: Callable[[StorageRef], Any],
    archive_name: str = "archive",
    alignment: int = 64,
    checksum: bool = True,
) -> int:
    """Write ``obj`` in torch's zip format, as ``torch.save`` lays it out; returns bytes written.

    Pickles with torchkeep's own (torch-free) pickler; see ``write_torch_zip_records``.
    """
    pickler = TreePickler(describe=describe)
    pickle_bytes = pickler.dump(obj)
    storages = [(ref.nbytes, functools.partial(storage_bytes, ref)) for ref in pickler.storages]
    return write_torch_zip_records(write, pickle_bytes, storages, archive_name=archive_name,
                                   alignment=alignment, checksum=checksum)


def write_torch_zip_records(
    write: Callable[[Any], Any],
    pickle_bytes: bytes,
    storages: Sequence[tuple[int, Callable[[], Any]]],
    *,
    archive_name: str = "archive",
    alignment: int = 64,
    checksum: bool = True,
) -> int:
    """The records of a torch zip checkpoint: data.pkl, .format_version,
    .storage_alignment, byteorder, data/<key> for each ``(nbytes, get_bytes)`` in key order
    (payloads ``alignment``-aligned, native byte order), version, .data/serialization_id.
    CRC-32s are computed on a second core while each record is written.
    """
    import sys

    from torchkeep.storage.checksums import crc32_overlapped

    zw = ZipWriter(write, archive_name, alignment=alignment, compute_crc=checksum)
    zw.add("data.pkl", pickle_bytes)
    zw.add(".format_version", b"1")
    zw.add(".storage_alignment", str(alignment).encode("ascii"))
    zw.add("byteorder", sys.byteorder.encode("ascii"))
    for index, (nbytes, get_bytes) in enumerate(storages):
        data = memoryview(get_bytes()).cast("B")
        if data.nbytes != nbytes:
            raise CorruptCheckpointError(f"storage {index} changed size while saving")
        zw.begin(f"data/{index}", data.nbytes)
        if checksum and data.nbytes:
            with crc32_overlapped(data) as crc:  # a failed write waits for the CRC too
                zw.payload(data)  # written while the CRC runs on the other core
            zw.end(crc.result())
        else:
            zw.payload(data)
            zw.end(0)
    zw.add("version", b"3\n")
    return zw.finish()
