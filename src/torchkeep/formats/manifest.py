"""The step directory: tensor data files, a JSON manifest, and a commit marker written last.

::

    step-000000000120/
        data-00000.bin     tensor bytes, each tensor 64-byte aligned (one file per writer)
        manifest.json      the tree (JSON, no pickle), per-tensor entries and checksums,
                           metrics, versions, time
        COMMITTED          written last: the step and the manifest's checksum

A tensor entry holds its dtype, global shape and a list of chunks, each with its offsets
in the global tensor, its shape, file, byte range and xxh3-64 checksum. A tensor saved
whole has one chunk; a sharded save writes several (one per writer), each writer into its
own data file of the same directory.

An incremental step (CheckpointManager(incremental=True), docs/manager.md) keeps no data
of its own: its chunks name data files of the run's shared ``chunks/`` folder as
``../chunks/step-000000000120-<token>-00000.bin``, the file the step that first wrote
those bytes created. Nothing else outside the step folder can be named. There each chunk
of a tensor cut in several lies at its place in a ``PAGE_PHASE`` block, so a reader can
map it over the tensor's other bytes (formats/loader.py); readers never rely on it.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import math
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

from torchkeep import dtypes
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatError,
    IntegrityError,
    UnsupportedFormatError,
    shown,
)
from torchkeep.formats.chunks import assemble as assemble_chunks
from torchkeep.formats.chunks import byte_range, ranges_problem, tiling_problem
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.formats.pickler import Describe
from torchkeep.formats.treejson import TreeDecoder, TreeEncoder, contiguous_strides
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.checksums import Overlapped
from torchkeep.storage.filesystem import FileSystem, open_filesystem
from torchkeep.storage.source import open_source
from torchkeep.tree import StorageRef, TensorRef

__all__ = [
    "FORMAT_NAME",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "POOL_NAME",
    "TensorPayload",
    "chunk_file_path",
    "commit_manifest",
    "plan_tensors",
    "read_manifest",
    "read_step_dir",
    "write_step",
]

FORMAT_NAME = "torchkeep-step"
FORMAT_VERSION = 1
#: a sharded step (torchkeep.distributed): tensors in several chunks, a flat table of
#: values and the nesting DCP flattened away
SHARDED_VERSION = 2
MANIFEST_NAME = "manifest.json"
MARKER_NAME = "COMMITTED"
ALIGNMENT = 64
#: a chunk of a tensor cut in several lies at its place in a block of this size (the
#: largest common memory page: 4 KiB on x86, 16 KiB on Apple, 64 KiB on some ARM servers),
#: so a restore can map it over the tensor's other bytes (storage/fixedmap.py)
PAGE_PHASE = 64 << 10
#: the run folder's shared data files of incremental steps (beside the step folders)
POOL_NAME = "chunks"
POOL_PREFIX = f"../{POOL_NAME}/"
_POOL_FILE = re.compile(r"^step-(\d{12,})-[0-9a-f]{8}-(\d{5})\.bin$")


def data_file_name(writer: int) -> str:
    """The data file of writer (rank) ``writer``."""
    return f"data-{writer:05d}.bin"


def pool_file_name(step: int, writer: int = 0) -> str:
    """A new data file of the shared folder for ``step`` (a random token: a save retried
    at the same step never meets the leftover of the failed one)."""
    return f"step-{step:012d}-{secrets.token_hex(4)}-{writer:05d}.bin"


def pool_file_step(name: str) -> int | None:
    """The step that wrote shared data file ``name``, or None when it is not one."""
    match = _POOL_FILE.match(name)
    return int(match.group(1)) if match else None


def chunk_file_path(fs: FileSystem, directory: str, file_name: str) -> str | None:
    """Where a chunk's ``file`` lies for the step in ``directory``: a data file of the step
    folder, or (incremental steps) one of the run's shared folder; None for any other
    name (no other path may be reached from a manifest)."""
    if file_name.startswith(POOL_PREFIX):
        base = file_name[len(POOL_PREFIX):]
        if pool_file_step(base) is None:
            return None
        return fs.join(fs.parent(directory), POOL_NAME, base)
    if ("/" in file_name or "\\" in file_name or file_name.startswith(".")
            or not file_name):
        return None
    return fs.join(directory, file_name)


def checksum(data: Any) -> str:
    """The checksum stored per chunk: xxh3-64 as 16 hex digits."""
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


# -- planning ------------------------------------------------------------------------------


@dataclass(slots=True)
class TensorPayload:
    """One tensor to write: its name, its view, and its contiguous bytes (when known)."""

    name: str
    ref: TensorRef
    data: Any = None  # a bytes-like of exactly ref.nbytes, C-contiguous

    def bytes(self, storage_bytes: Callable[[StorageRef], Any]) -> memoryview:
        """The tensor's values, C-contiguous, as bytes (a view where possible, else a copy)."""
        if self.data is not None:
            return memoryview(self.data).cast("B")
        return contiguous_bytes(self.ref, storage_bytes)


def contiguous_bytes(ref: TensorRef, storage_bytes: Callable[[StorageRef], Any]) -> memoryview:
    """The values of view ``ref``, C-contiguous: a slice of its storage when it is one."""
    if ref.storage is None:
        raise FormatError("a tensor without storage has no bytes")
    whole = memoryview(storage_bytes(ref.storage)).cast("B")
    itemsize = ref.dtype.itemsize
    start = ref.offset * itemsize
    if ref.is_contiguous():
        return whole[start : start + ref.nbytes]
    import numpy as np

    raw = np.ndarray(ref.shape, dtype=np.dtype(f"V{itemsize}"), buffer=whole, offset=start,
                     strides=tuple(s * itemsize for s in ref.stride))
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1).data.cast("B")


def plan_tensors(
    tree: Any, describe: Describe | None
) -> tuple[Any, list[TensorPayload], dict[str, Any]]:
    """The tree's JSON skeleton, the tensors to write (in tree order), and the object
    each tensor name came from."""
    encoder = TreeEncoder(describe)
    skeleton = encoder.encode(tree)
    payloads = [TensorPayload(name, ref, array) for name, ref, array in encoder.tensors]
    return skeleton, payloads, encoder.originals


# -- writing ---------------------------------------------------------------------------------


def _write_data(
    write: Callable[[Any], Any],
    payloads: Iterable[TensorPayload],
    storage_bytes: Callable[[StorageRef], Any],
    file_name: str,
    progress: Callable[[int], None] | None,
) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for payload in payloads:
        data = payload.bytes(storage_bytes)
        with Overlapped(checksum, data) as digest:  # runs while data is written; a
            pad = -offset % ALIGNMENT              # failed write waits for it too
            if pad:
                write(b"\0" * pad)
                offset += pad
            if data.nbytes:
                write(data)
        ref = payload.ref
        entries[payload.name] = {
            "dtype": ref.dtype.name,
            "shape": list(ref.shape),
            **({"requires_grad": True} if ref.requires_grad else {}),
            **({"parameter": True} if ref.parameter else {}),
            "chunks": [{
                "offsets": [0] * len(ref.shape),
                "shape": list(ref.shape),
                "file": file_name,
                "offset": offset,
                "nbytes": data.nbytes,
                "xxh3": digest.result(),
            }],
        }
        offset += data.nbytes
        if progress is not None:
            progress(data.nbytes)
    return entries


def write_step(
    fs: FileSystem,
    directory: str,
    *,
    step: int,
    skeleton: Any,
    payloads: list[TensorPayload],
    storage_bytes: Callable[[StorageRef], Any],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    fsync: bool = True,
    writer: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write a complete step into ``directory`` (which should be a temporary name):
    the data file, the manifest, then the commit marker; returns the manifest.
    """
    fs.makedirs(directory)
    file_name = data_file_name(writer)
    entries: dict[str, dict[str, Any]] = {}

    def produce(write: Callable[[Any], Any]) -> None:
        entries.update(_write_data(write, payloads, storage_bytes, file_name, progress))

    fs.write_file(fs.join(directory, file_name), produce, fsync=fsync)
    return commit_manifest(fs, directory, step=step, skeleton=skeleton, entries=entries,
                           metrics=metrics, extra=extra, fsync=fsync)


def commit_manifest(
    fs: FileSystem,
    directory: str,
    *,
    step: int,
    skeleton: Any,
    entries: dict[str, dict[str, Any]],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    fsync: bool = True,
) -> dict[str, Any]:
    """Write the manifest of a step whose data is written, then its commit marker, into
    ``directory`` (which exists); returns the manifest."""
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics or {},
        **(extra or {}),
        "tree": skeleton,
        "tensors": entries,
    }
    raw = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    encoded = raw.encode("utf-8")
    fs.write_file(fs.join(directory, MANIFEST_NAME), lambda w: w(encoded), fsync=fsync)
    marker = json.dumps({"step": step, "manifest_xxh3": checksum(encoded)}).encode()
    fs.write_file(fs.join(directory, MARKER_NAME), lambda w: w(marker), fsync=fsync)
    if fsync:
        fs.fsync_dir(directory)
    return manifest


# -- reading ----------------------------------------------------------------------------------


def read_manifest(fs: FileSystem, directory: str, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a committed step; CorruptCheckpointError when there is none."""
    name = fs.describe(directory)
    if not fs.exists(fs.join(directory, MARKER_NAME)):
        raise CorruptCheckpointError(
            "no commit marker: not a committed torchkeep step (an interrupted save?)",
            source=name,
        )
    try:
        marker = json.loads(fs.read_bytes(fs.join(directory, MARKER_NAME)))
        raw = fs.read_bytes(fs.join(directory, MANIFEST_NAME))
    except (ValueError, RecursionError) as e:  # a UnicodeDecodeError is a ValueError
        raise CorruptCheckpointError(f"commit marker is not JSON ({e})", source=name) from None
    if verify and isinstance(marker, dict) and marker.get("manifest_xxh3") != checksum(raw):
        raise IntegrityError("manifest.json does not match its checksum in the commit marker",
                             source=name)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:  # nesting past the parser's own stack
        raise CorruptCheckpointError(f"manifest.json is not JSON ({e})", source=name) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError("manifest.json is not a torchkeep step manifest",
                                     source=name)
    if manifest.get("version") not in (FORMAT_VERSION, SHARDED_VERSION):
        raise UnsupportedFormatError(
            f"step manifest version {shown(manifest.get('version'))} is not supported", source=name
        )
    return manifest


def _json_int(value: Any) -> int:
    """An integer field of a manifest: a JSON integer, nothing else (not 4.0, "4", 1e400)."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {shown(value)}")
    return value


def read_step_dir(
    directory: Any,
    *,
    fs: FileSystem | None = None,
    limits: Limits = DEFAULT_LIMITS,
    verify: bool = True,
    manifest: dict[str, Any] | None = None,
) -> Parsed:
    """Parse a committed step directory into placeholders.

    With ``verify`` every tensor's checksum is checked when its bytes are read, and a
    mismatch raises IntegrityError naming the tensor and the step. ``manifest``: the
    directory's manifest as ``read_manifest`` returned it, when the caller has it already.
    """
    if fs is None:
        fs, directory = open_filesystem(directory)
    name = fs.describe(directory)
    if manifest is None:
        manifest = read_manifest(fs, directory, verify=verify)
    step = manifest.get("step")
    entries = manifest.get("tensors")
    if not isinstance(entries, dict):
        raise CorruptCheckpointError("manifest has no tensor table", source=name)
    sources: dict[str, Any] = {}
    paths: dict[str, str | None] = {}
    records: dict[str, Record] = {}
    refs: dict[str, TensorRef] = {}

    def fail(message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"manifest: {message}", source=name)

    def chunk_record(tensor_name: str, shape: tuple[int, ...], itemsize: int, index: int,
                     chunk: Any) -> Record:
        try:
            offsets = tuple(_json_int(o) for o in chunk["offsets"])
            extent = tuple(_json_int(s) for s in chunk["shape"])
            file_name = str(chunk["file"])
            offset = _json_int(chunk["offset"])
            size = _json_int(chunk["nbytes"])
            digest = str(chunk["xxh3"])
        except (KeyError, TypeError, ValueError) as e:
            raise fail(f"tensor {tensor_name!r}: malformed chunk ({e})") from None
        if len(offsets) != len(shape) or len(extent) != len(shape) or any(
                o < 0 or n < 0 or o + n > s
                for o, n, s in zip(offsets, extent, shape, strict=True)):
            raise fail(f"tensor {tensor_name!r}: chunk {index} lies outside the tensor")
        if file_name not in paths:  # checked once per file, not per chunk
            paths[file_name] = chunk_file_path(fs, directory, file_name)
        path = paths[file_name]
        if size != math.prod(extent) * itemsize or offset < 0 or path is None:
            raise fail(f"tensor {tensor_name!r}: chunk {index} does not match the tensor")
        if file_name not in sources:
            try:
                sources[file_name] = fs.source(path)
            except CheckpointNotFoundError:  # the step is committed: its data is missing
                raise CorruptCheckpointError(
                    f"tensor {tensor_name!r}: its data file {file_name} is missing",
                    source=name) from None
        source = sources[file_name]
        if offset + size > source.size:
            raise CorruptCheckpointError(
                f"tensor {tensor_name!r} runs past the end of {file_name} (truncated)",
                source=name,
            )
        return Record(size, offset=offset, name=f"chunk {index} at {file_name}:{offset}",
                      source=source, xxh3=digest)

    def check_coverage(tensor_name: str, shape: tuple[int, ...], chunks: list[Any]) -> None:
        """The chunks tile the tensor exactly: every element in one chunk, none in two."""
        boxes = [(c["offsets"], c["shape"]) for c in chunks]
        problem = tiling_problem(shape, boxes, limits, f"tensor {tensor_name!r}")
        if problem:
            raise fail(f"tensor {tensor_name!r}: {problem}")

    def assemble(tensor_name: str, shape: tuple[int, ...], itemsize: int, chunks: list[Any],
                 parts: tuple[Record, ...]) -> bytes:
        """The whole tensor from its chunks, each checked against its checksum."""

        def pieces() -> Any:
            import numpy as np

            for chunk, part in zip(chunks, parts, strict=True):
                assert part.source is not None and part.offset is not None
                raw = part.source.read(part.offset, part.nbytes)
                if verify and checksum(raw) != part.xxh3:
                    raise IntegrityError(
                        f"tensor {tensor_name!r} of step {step}: {part.name} does not match "
                        "its checksum", source=name)
                extent = tuple(chunk["shape"])
                values = np.frombuffer(raw, dtype=np.dtype(f"V{itemsize}")).reshape(extent)
                yield chunk["offsets"], extent, values

        return assemble_chunks(shape, itemsize, pieces())

    def read_runs(tensor_name: str, nbytes: int, runs: list[tuple[int, int]],
                  parts: tuple[Record, ...]) -> Any:
        """The whole tensor from chunks that are contiguous runs of its bytes: each read
        straight into its place (one copy, as for a tensor in one chunk), then checked."""
        import numpy as np

        out = np.empty(nbytes, dtype=np.uint8)
        for (start, size), part in zip(runs, parts, strict=True):
            assert part.source is not None and part.offset is not None
            if not size:
                continue
            view = out[start : start + size]
            part.source.readinto(part.offset, view.data)
            if verify and checksum(view) != part.xxh3:
                raise IntegrityError(
                    f"tensor {tensor_name!r} of step {step}: {part.name} does not match "
                    "its checksum", source=name)
        return out

    for tensor_name, entry in entries.items():
        try:
            dtype = dtypes.by_name(entry["dtype"])
            shape = tuple(_json_int(s) for s in entry["shape"])
            chunks = entry["chunks"]
        except (KeyError, TypeError, ValueError) as e:
            raise fail(f"tensor {tensor_name!r}: malformed entry ({e})") from None
        if any(s < 0 for s in shape):
            raise fail(f"tensor {tensor_name!r}: negative dimension")
        limits.check("max_tensor_dims", len(shape), f"tensor {tensor_name!r} dimensions")
        nbytes = math.prod(shape) * dtype.itemsize
        limits.check("max_tensor_bytes", nbytes, f"tensor {tensor_name!r} bytes")
        if not isinstance(chunks, list) or not chunks:
            raise fail(f"tensor {tensor_name!r}: its chunks are not a list")
        parts = tuple(chunk_record(tensor_name, shape, dtype.itemsize, i, chunk)
                      for i, chunk in enumerate(chunks))
        storage = StorageRef(tensor_name, dtype, nbytes)
        refs[tensor_name] = TensorRef(
            storage, dtype, 0, shape, contiguous_strides(shape),
            requires_grad=bool(entry.get("requires_grad", False)),
            parameter=bool(entry.get("parameter", False)),
        )
        if len(parts) == 1 and parts[0].nbytes == nbytes:
            whole = parts[0]
            records[tensor_name] = Record(nbytes, offset=whole.offset, name=tensor_name,
                                          source=whole.source, xxh3=whole.xxh3)
        elif (runs := _byte_runs(shape, dtype.itemsize, chunks)) is not None:
            problem = ranges_problem(nbytes, runs)
            if problem:
                raise fail(f"tensor {tensor_name!r}: {problem}")
            anchor = _anchor(runs, parts, nbytes)
            if anchor is not None:  # most chunks lie in place in one file (the step that
                # wrote the tensor whole): read or mapped as one range, the other chunks
                # copied over it, every chunk checked against its checksum
                source, offset = anchor
                patches = tuple((start, part) for (start, _), part in zip(runs, parts,
                                                                          strict=True)
                                if part.source is not source or part.offset != offset + start)
                records[tensor_name] = Record(nbytes, offset=offset, name=tensor_name,
                                              source=source, parts=parts, patches=patches)
            else:
                records[tensor_name] = Record(
                    nbytes, name=tensor_name, parts=parts,
                    decode=functools.partial(read_runs, tensor_name, nbytes, runs, parts))
        else:
            check_coverage(tensor_name, shape, chunks)
            records[tensor_name] = Record(
                nbytes, name=tensor_name, parts=parts,
                decode=functools.partial(assemble, tensor_name, shape, dtype.itemsize, chunks,
                                         parts))

    def resolve(ref_name: Any, node: dict[str, Any]) -> TensorRef:
        found = refs.get(ref_name) if isinstance(ref_name, str) else None
        if found is None:
            raise fail(f"the tree refers to tensor {ref_name!r}, which has no entry")
        return found

    decoder = TreeDecoder(resolve, name, limits)
    if manifest.get("version") == SHARDED_VERSION:
        tree = sharded_tree(manifest, decoder, refs, fail)
    else:
        tree = decoder.node(manifest.get("tree"), 0)

    def check(storage: StorageRef, data: memoryview) -> None:
        record = records[storage.key]
        if record.parts and record.offset is not None:  # chunks lying in place, in order
            at = 0
            for part in record.parts:
                if checksum(data[at : at + part.nbytes]) != part.xxh3:
                    raise IntegrityError(
                        f"tensor {storage.key!r} of step {step}: {part.name} does not match "
                        "its checksum", source=name)
                at += part.nbytes
            return
        expected = record.xxh3
        if expected is not None and checksum(data) != expected:
            raise IntegrityError(
                f"tensor {storage.key!r} of step {step} does not match its checksum",
                source=name,
            )

    info = {k: manifest.get(k) for k in ("step", "created", "metrics", "torch_version",
                                         "torchkeep_version")}
    manifest_source = open_source(b"")  # stands for the directory: only its name is used
    manifest_source.name = name
    parsed = Parsed("torchkeep", tree, manifest_source, records, "little", info,
                    verify=check if verify else None)
    parsed.extra_sources = list(sources.values())
    return parsed



def _byte_runs(shape: tuple[int, ...], itemsize: int,
               chunks: list[Any]) -> list[tuple[int, int]] | None:
    """Each chunk's ``(start, nbytes)`` in the tensor's bytes when every chunk is one
    contiguous run of them (incremental steps cut tensors so), else None."""
    runs = []
    for chunk in chunks:
        found = byte_range(shape, chunk["offsets"], chunk["shape"], itemsize)
        if found is None:
            return None
        runs.append(found)
    return runs


def _anchor(runs: list[tuple[int, int]], parts: tuple[Record, ...],
            nbytes: int) -> tuple[Any, int] | None:
    """The file and offset where most chunks lie at their place in the tensor's bytes,
    when the whole tensor's range fits in that file and the chunks come in byte order;
    else None."""
    if [start for start, _ in runs] != sorted(start for start, _ in runs):
        return None
    votes: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], tuple[Any, int]] = {}
    for (start, _), part in zip(runs, parts, strict=True):
        if part.source is None or part.offset is None:
            return None
        key = (id(part.source), part.offset - start)
        votes[key] = votes.get(key, 0) + 1
        where[key] = (part.source, part.offset - start)
    source, offset = where[max(votes, key=lambda k: votes[k])]
    if offset < 0 or offset + nbytes > source.size:
        return None
    return source, offset


def sharded_tree(manifest: dict[str, Any], decoder: TreeDecoder, refs: dict[str, TensorRef],
                 fail: Callable[[str], CorruptCheckpointError]) -> Any:
    """The nested tree of a sharded step: each flat key (DCP's fully qualified name) put
    back at its path, tensors from the tensor table and values from the value table."""
    paths = manifest.get("paths")
    values = manifest.get("values")
    if not isinstance(paths, dict) or not isinstance(values, dict):
        raise fail("a sharded step needs its path and value tables")
    root: dict[Any, Any] = {}
    for key, path in paths.items():
        if key in refs:
            leaf: Any = refs[key]
        elif key in values:
            leaf = decoder.node(values[key], 1)
        else:
            raise fail(f"key {key!r} is neither a tensor nor a value")
        if not isinstance(path, list) or not path or not all(
                isinstance(p, str) or type(p) is int for p in path):
            raise fail(f"key {key!r}: malformed path")
        place(root, path, leaf, fail)
    return root


def place(root: dict[Any, Any], path: list[Any], leaf: Any,
          fail: Callable[[str], CorruptCheckpointError]) -> None:
    """Put ``leaf`` at ``path`` (str keys are dict keys; int keys index lists, as in DCP's
    flattening), creating the containers on the way."""
    node: Any = root
    for here, after in itertools.pairwise(path):
        child = _child(node, here, fail)
        if child is None:
            child = [] if type(after) is int else {}
            _set(node, here, child, fail)
        node = child
    if _child(node, path[-1], fail) is not None:
        raise fail(f"path {path!r} is given twice")
    _set(node, path[-1], leaf, fail)


def _child(node: Any, key: Any, fail: Callable[[str], CorruptCheckpointError]) -> Any:
    if isinstance(node, list):
        if type(key) is not int or key < 0:
            raise fail("a list is indexed by a non-negative int")
        return node[key] if key < len(node) else None
    if not isinstance(node, dict):
        raise fail("a path goes through a value")
    return node.get(key)


def _set(node: Any, key: Any, value: Any, fail: Callable[[str], CorruptCheckpointError]) -> None:
    if isinstance(node, list):
        if key > len(node) + 1_000_000:
            raise fail("a list index far past its length")
        node.extend([None] * (key + 1 - len(node)))
        node[key] = value
    else:
        node[key] = value
