"""Stock ``torch.distributed.checkpoint`` (DCP) directories, read without torch.

::

    ckpt/                      dcp.save(state_dict, checkpoint_id="ckpt")
        .metadata              a pickle (protocol 4) of DCP's Metadata, written last
        __0_0.distcp ...       per rank (and writer thread): items back to back

``.metadata`` is read by the restricted interpreter with an allowlist of DCP's own
metadata classes (typed, validated records built here: nothing is imported), torch.Size,
dtypes, layouts and paths; any other global raises UnsafeCheckpointError. Each item of a
data file is a complete ``torch.save`` zip archive: a tensor chunk (its ``data/0`` record
holds the chunk's bytes) or a non-tensor value (``BYTE_IO``), which is read by the same
restricted loader as a ``.pt`` file. A tensor saved whole is a plain record pointing into
its data file; a sharded one is assembled from its chunks, which must tile it exactly.
``planner_data`` (DCP's flattening map: fqn -> path of str keys and int list indices)
puts the values back into the nested tree that was saved.

DCP records no checksums of its own; the zip records inside each item carry the CRC-32s
``torch.save`` computed, which ``torchkeep verify`` checks.
"""

from __future__ import annotations

import functools
import math
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchkeep.dtypes import DType
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    shown,
)
from torchkeep.formats.chunks import assemble as assemble_chunks
from torchkeep.formats.chunks import tiling_problem
from torchkeep.formats.detect import detect
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.formats.torch_legacy import read_torch_legacy
from torchkeep.formats.torch_zip import read_torch_zip
from torchkeep.formats.treejson import contiguous_strides
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.filesystem import FileSystem, open_filesystem
from torchkeep.storage.source import Source, open_source
from torchkeep.tree import (
    SparseRef,
    StorageRef,
    StorageView,
    Symbol,
    TensorRef,
    walk_tree,
)
from torchkeep.unpickle import Allowlist, unpickle
from torchkeep.unpickle.allowlist import canonical, dangerous
from torchkeep.unpickle.entries import Entry, Machine

__all__ = [
    "DATA_SUFFIX",
    "FORMAT_NAME",
    "METADATA_NAME",
    "STEP_FILES",
    "DcpMetadata",
    "is_dcp_dir",
    "is_dcp_listing",
    "read_dcp_dir",
    "read_dcp_metadata",
]

FORMAT_NAME = "dcp"
METADATA_NAME = ".metadata"
DATA_SUFFIX = ".distcp"
#: DCP metadata versions read here (``Metadata.version``; absent before torch 2.4)
SUPPORTED_VERSIONS = re.compile(r"^1\.\d+\.\d+$")
_RANK_METADATA = re.compile(r"^__\d+\.metadata$")  # dcp.save(use_collectives=False)
STEP_FILES = ("COMMITTED", "manifest.json")  # a torchkeep step directory, not DCP
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"


def is_dcp_dir(fs: FileSystem, directory: str) -> bool:
    """True when ``directory`` is a DCP checkpoint: it holds ``.metadata`` (or only the
    per-rank ``__N.metadata`` of ``use_collectives=False``) and is not a torchkeep step."""
    return is_dcp_listing(fs.listdir(directory))


def is_dcp_listing(names: list[str]) -> bool:
    """:func:`is_dcp_dir` for a directory's listing."""
    if set(names).intersection(STEP_FILES):
        return False
    return METADATA_NAME in names or any(_RANK_METADATA.match(n) for n in names)


# -- the records .metadata is made of ---------------------------------------------------------


def _malformed(what: str, detail: str) -> ValueError:
    # the interpreter turns a ValueError into CorruptCheckpointError at the BUILD's offset
    return ValueError(f"{what}: {detail}")


def _state_dict(what: str, state: Any, known: tuple[str, ...], *, strict: bool) -> dict[str, Any]:
    if state is None:
        return {}
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise _malformed(what, f"BUILD state must be a dict with str keys, got {shown(state)}")
    unknown = sorted(set(state) - set(known))
    if unknown and strict:
        raise UnsupportedFormatError(
            f"DCP {what} has fields this reader does not know: {shown(unknown)}")
    return state


def _ints(what: str, value: Any, *, optional: bool = False) -> tuple[int, ...] | None:
    if value is None and optional:
        return None
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _malformed(what, f"expected a tuple of ints, got {shown(value)}")
    if any(v < 0 for v in value):
        raise _malformed(what, f"negative value in {list(value)}")
    return tuple(value)


def _int(what: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if type(value) is not int:
        raise _malformed(what, f"expected an int, got {shown(value)}")
    return value


def _str(what: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if type(value) is not str:
        raise _malformed(what, f"expected a str, got {shown(value)}")
    return value


def _bool(what: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _malformed(what, f"expected a bool, got {shown(value)}")
    return value


@dataclass(eq=False, slots=True)
class MemoryFormat:
    """``_MEM_FORMAT_ENCODING``: contiguous (0), channels_last (1), preserve (2)."""

    value: int

    NAMES = ("contiguous_format", "channels_last", "preserve_format")


@dataclass(eq=False, slots=True)
class TensorProperties:
    """``TensorProperties``: BUILD with the tuple its ``__getstate__`` returns."""

    dtype: DType | None = None
    layout: Symbol | None = None
    requires_grad: bool = False
    memory_format: MemoryFormat | None = None
    pin_memory: bool = False
    built: bool = False

    def __setstate__(self, state: Any) -> None:
        what = "TensorProperties"
        if type(state) is not tuple or len(state) != 5:
            raise _malformed(what, f"BUILD state must be a 5-tuple, got {shown(state)}")
        dtype, layout, requires_grad, memory_format, pin_memory = state
        if not isinstance(dtype, DType):
            raise _malformed(what, f"dtype must be a torch dtype, got {shown(dtype)}")
        if not isinstance(layout, Symbol) or layout.kind != "layout":
            raise _malformed(what, f"layout must be a torch layout, got {shown(layout)}")
        if not isinstance(memory_format, MemoryFormat):
            raise _malformed(what, f"memory format must be a _MEM_FORMAT_ENCODING, got "
                                   f"{shown(memory_format)}")
        self.dtype, self.layout, self.memory_format = dtype, layout, memory_format
        self.requires_grad = _bool(f"{what}.requires_grad", requires_grad)
        self.pin_memory = _bool(f"{what}.pin_memory", pin_memory)
        self.built = True


@dataclass(eq=False, slots=True)
class ChunkStorageMetadata:
    """One chunk of a tensor: its offsets in the whole tensor and its sizes."""

    offsets: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    built: bool = False

    def __setstate__(self, state: Any) -> None:
        state = _state_dict("ChunkStorageMetadata", state, ("offsets", "sizes"), strict=True)
        self.offsets = _ints("ChunkStorageMetadata.offsets", state.get("offsets")) or ()
        self.sizes = _ints("ChunkStorageMetadata.sizes", state.get("sizes")) or ()
        self.built = True


@dataclass(eq=False, slots=True)
class TensorStorageMetadata:
    """A tensor of the state dict: properties, whole size, and its chunks."""

    properties: TensorProperties | None = None
    size: tuple[int, ...] = ()
    chunks: list[Any] = field(default_factory=list)
    built: bool = False

    def __setstate__(self, state: Any) -> None:
        what = "TensorStorageMetadata"
        state = _state_dict(what, state, ("properties", "size", "chunks"), strict=True)
        properties = state.get("properties")
        if not isinstance(properties, TensorProperties):
            raise _malformed(what, f"properties must be TensorProperties, got {shown(properties)}")
        chunks = state.get("chunks")
        if type(chunks) is not list:
            raise _malformed(what, f"chunks must be a list, got {shown(chunks)}")
        self.properties = properties
        self.size = _ints(f"{what}.size", state.get("size")) or ()
        self.chunks = chunks  # its items are checked once the stream is done
        self.built = True


@dataclass(eq=False, slots=True)
class BytesStorageMetadata:
    """A non-tensor value of the state dict (a ``torch.save`` of it is the item)."""

    def __setstate__(self, state: Any) -> None:
        _state_dict("BytesStorageMetadata", state, (), strict=True)


@dataclass(eq=False, slots=True)
class MetadataIndex:
    """The key of ``storage_data``: an fqn and, for a tensor chunk, its offsets."""

    fqn: str = ""
    offset: tuple[int, ...] | None = None
    index: int | None = None
    built: bool = False

    def __setstate__(self, state: Any) -> None:
        state = _state_dict("MetadataIndex", state, ("fqn", "offset", "index"), strict=True)
        self.fqn = _str("MetadataIndex.fqn", state.get("fqn")) or ""
        self.offset = _ints("MetadataIndex.offset", state.get("offset"), optional=True)
        self.index = _int("MetadataIndex.index", state.get("index"), optional=True)
        self.built = True


@dataclass(eq=False, slots=True)
class StorageInfo:
    """``filesystem._StorageInfo``: where an item lies (file, offset, length)."""

    relative_path: str = ""
    offset: int = 0
    length: int = 0
    transform_descriptors: tuple[str, ...] = ()
    built: bool = False

    def __setstate__(self, state: Any) -> None:
        what = "_StorageInfo"
        state = _state_dict(what, state, ("relative_path", "offset", "length",
                                          "transform_descriptors"), strict=True)
        self.relative_path = _str(f"{what}.relative_path", state.get("relative_path")) or ""
        self.offset = _int(f"{what}.offset", state.get("offset")) or 0
        self.length = _int(f"{what}.length", state.get("length")) or 0
        descriptors = state.get("transform_descriptors")
        if descriptors is not None:
            if not isinstance(descriptors, (list, tuple)) or not all(
                    type(d) is str for d in descriptors):
                raise _malformed(what, "transform_descriptors must be a list of str")
            self.transform_descriptors = tuple(descriptors)
        self.built = True


@dataclass(eq=False, slots=True)
class StorageMeta:
    """Facts about the save: the writer's checkpoint id, save id, modules."""

    checkpoint_id: str | None = None
    save_id: str | None = None
    load_id: str | None = None
    modules: tuple[str, ...] = ()

    def __setstate__(self, state: Any) -> None:
        what = "StorageMeta"
        state = _state_dict(what, state, ("checkpoint_id", "save_id", "load_id", "modules"),
                            strict=False)
        checkpoint_id = state.get("checkpoint_id")
        if isinstance(checkpoint_id, pathlib.PurePath):
            checkpoint_id = str(checkpoint_id)
        self.checkpoint_id = _str(f"{what}.checkpoint_id", checkpoint_id, optional=True)
        self.save_id = _str(f"{what}.save_id", state.get("save_id"), optional=True)
        self.load_id = _str(f"{what}.load_id", state.get("load_id"), optional=True)
        modules = state.get("modules") or []
        if not isinstance(modules, list) or not all(type(m) is str for m in modules):
            raise _malformed(what, "modules must be a list of str")
        self.modules = tuple(modules)


@dataclass(eq=False, slots=True)
class DcpMetadata:
    """DCP's ``Metadata``: what every fqn is, where its items lie, and the nesting."""

    state_dict_metadata: dict[str, Any] = field(default_factory=dict)
    planner_data: Any = None
    storage_data: dict[Any, Any] = field(default_factory=dict)
    storage_meta: StorageMeta | None = None
    version: str | None = None
    built: bool = False

    def __setstate__(self, state: Any) -> None:
        what = "Metadata"
        # unknown fields of a newer writer are ignored (they are inert data)
        state = _state_dict(what, state, ("state_dict_metadata", "planner_data",
                                          "storage_data", "storage_meta", "version"),
                            strict=False)
        entries = state.get("state_dict_metadata")
        storage = state.get("storage_data")
        meta = state.get("storage_meta")
        if type(entries) is not dict:
            raise _malformed(what, f"state_dict_metadata must be a dict, got {shown(entries)}")
        if type(storage) is not dict:
            raise _malformed(what, f"storage_data must be a dict, got {shown(storage)}")
        if meta is not None and not isinstance(meta, StorageMeta):
            raise _malformed(what, f"storage_meta must be a StorageMeta, got {shown(meta)}")
        self.state_dict_metadata = entries
        self.storage_data = storage
        self.planner_data = state.get("planner_data")
        self.storage_meta = meta
        self.version = _str(f"{what}.version", state.get("version"), optional=True)
        self.built = True


# -- the allowlist of .metadata -----------------------------------------------------------------


def _newobj(qualname: str, cls: type) -> Callable[[Machine, tuple[Any, ...]], Any]:
    def new(m: Machine, args: tuple[Any, ...]) -> Any:
        if args:
            raise m.fail(f"{qualname} is built with NEWOBJ and no arguments, got "
                         f"{len(args)}")
        return cls()

    return new


def _memory_format(m: Machine, args: tuple[Any, ...]) -> MemoryFormat:
    if len(args) != 1 or type(args[0]) is not int or not 0 <= args[0] <= 2:
        raise m.fail(f"_MEM_FORMAT_ENCODING takes one of 0, 1, 2, got {shown(args)}")
    return MemoryFormat(args[0])


_RECORD_CLASSES: dict[str, type] = {
    f"{_METADATA_MODULE}.Metadata": DcpMetadata,
    f"{_METADATA_MODULE}.TensorStorageMetadata": TensorStorageMetadata,
    f"{_METADATA_MODULE}.BytesStorageMetadata": BytesStorageMetadata,
    f"{_METADATA_MODULE}.ChunkStorageMetadata": ChunkStorageMetadata,
    f"{_METADATA_MODULE}.TensorProperties": TensorProperties,
    f"{_METADATA_MODULE}.MetadataIndex": MetadataIndex,
    f"{_METADATA_MODULE}.StorageMeta": StorageMeta,
    f"{_FILESYSTEM_MODULE}._StorageInfo": StorageInfo,
}
_ENTRIES: dict[str, Entry] = {
    qualname: Entry(qualname, new=_newobj(qualname, cls), cls=cls)
    for qualname, cls in _RECORD_CLASSES.items()
}
_ENTRIES[f"{_METADATA_MODULE}._MEM_FORMAT_ENCODING"] = Entry(
    f"{_METADATA_MODULE}._MEM_FORMAT_ENCODING", call=_memory_format)
#: the globals of DCP's own metadata classes: safe in a .metadata (built as records)
METADATA_GLOBALS = frozenset(_ENTRIES)
_BY_CLASS = {entry.cls: entry for entry in _ENTRIES.values() if entry.cls is not None}
#: default-table globals .metadata may name besides dtypes and layouts
_PLAIN = frozenset({
    "torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath", "pathlib.WindowsPath",
    "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "pathlib.Path",
})
#: Python >= 3.13 pickles paths from pathlib._local
_ALIASES = {f"pathlib._local.{n}": f"pathlib.{n}" for n in (
    "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")}


class MetadataAllowlist(Allowlist):
    """What ``.metadata`` may name: DCP's metadata classes (built as the typed records
    above), torch.Size, dtypes, layouts and paths. Anything else is unsafe."""

    def resolve(self, m: Machine, module: str, name: str) -> Any:
        qualname = f"{canonical(module)}.{name}"
        found = _ENTRIES.get(qualname)
        if found is not None:
            return found
        qualname = _ALIASES.get(qualname, qualname)
        default = self.entry(qualname)
        if qualname in _PLAIN or isinstance(default, DType) or (
                isinstance(default, Symbol) and default.kind == "layout"):
            return default
        advice = (" It runs code when called: no DCP checkpoint names it; do not load this "
                  "directory unless you wrote it." if dangerous(qualname) else "")
        raise UnsafeCheckpointError(
            f"{m.what} offset {m.op_pos}: global {qualname} is not allowed in a DCP "
            f".metadata, which names only DCP's metadata classes, torch.Size, dtypes, "
            f"layouts and paths.{advice}", global_name=qualname)

    def user_class(self, kind: type) -> Entry | None:
        return _BY_CLASS.get(kind)


def read_dcp_metadata(data: bytes, *, limits: Limits = DEFAULT_LIMITS,
                      what: str = METADATA_NAME) -> DcpMetadata:
    """Parse the bytes of a ``.metadata`` into a DcpMetadata (validated, nothing imported)."""
    result = unpickle(data, allowlist=MetadataAllowlist(), limits=limits, what=what)
    value = result.value
    if not isinstance(value, DcpMetadata) or not value.built:
        raise CorruptCheckpointError(f"{what} does not hold a DCP Metadata (found "
                                     f"{type(value).__name__})")
    return value


# -- reading a directory ------------------------------------------------------------------------


class SliceSource(Source):
    """Bytes ``[start, start + size)`` of another source, read through it (an item of a
    data file, parsed as the zip archive it is). Closing it leaves the parent open."""

    def __init__(self, parent: Source, start: int, size: int, name: str) -> None:
        super().__init__(name=name, size=size)
        self._parent = parent
        self._start = start

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        return self._parent.read(self._start + offset, n)

    def readinto(self, offset: int, out: memoryview) -> None:
        self._check(offset, out.nbytes)
        self._parent.readinto(self._start + offset, out)

    @property
    def parallel_reads(self) -> bool:
        return self._parent.parallel_reads

    def memory(self) -> memoryview | None:
        whole = self._parent.memory()
        return None if whole is None else whole[self._start : self._start + self.size]

    def read_only_map(self) -> None:
        return None

    def close(self) -> None:
        pass


@dataclass(slots=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    ref: TensorRef  # the tensor inside the item (a view of its storage)
    record: Record  # the item's data/0, in the data file


def _safe_file_name(name: str) -> bool:
    return (bool(name) and name not in (".", "..") and ".." not in name
            and not any(c in name for c in "/\\:\0"))


class _Reader:
    def __init__(self, fs: FileSystem, directory: str, limits: Limits, allowlist: Allowlist,
                 items: list[tuple[str, Source]] | None) -> None:
        self.fs = fs
        self.directory = directory
        self.name = fs.describe(directory)
        self.limits = limits
        self.allowlist = allowlist
        self.tensor_allowlist = Allowlist()
        self.items = items
        self.sources: dict[str, Source] = {}
        self.records: dict[str, Record] = {}
        self.byteorder: str | None = None
        self.chunk_count = 0

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(message, source=self.name)

    # -- .metadata --

    def metadata(self) -> DcpMetadata:
        path = self.fs.join(self.directory, METADATA_NAME)
        if not self.fs.exists(path):
            if any(_RANK_METADATA.match(n) for n in self.fs.listdir(self.directory)):
                raise UnsupportedFormatError(
                    "only per-rank __N.metadata files (dcp.save(use_collectives=False)); "
                    "reading those is not supported", source=self.name, format=FORMAT_NAME)
            raise self.fail("no .metadata: not a complete DCP checkpoint (an interrupted "
                            "dcp.save?)")
        try:
            self.limits.check("max_pickle_bytes", self.fs.size(path), ".metadata size")
            metadata = read_dcp_metadata(self.fs.read_bytes(path), limits=self.limits)
        except TorchkeepError as e:
            e.with_source(f"{self.name}/{METADATA_NAME}")
            raise
        version = metadata.version
        if version is not None and not SUPPORTED_VERSIONS.match(version):
            raise UnsupportedFormatError(f"DCP metadata version {version!r} is not supported",
                                         source=self.name, format=FORMAT_NAME)
        return metadata

    def storage_table(self, metadata: DcpMetadata) -> dict[tuple[str, Any], StorageInfo]:
        table: dict[tuple[str, Any], StorageInfo] = {}
        for index, info in metadata.storage_data.items():
            if not isinstance(index, MetadataIndex) or not index.built:
                raise self.fail(f"storage_data key {shown(index)} is not a MetadataIndex")
            if not isinstance(info, StorageInfo) or not info.built:
                raise self.fail(f"storage_data of {index.fqn!r} is not a _StorageInfo")
            key = (index.fqn, index.offset)
            if key in table:
                raise self.fail(f"storage_data lists {index.fqn!r} at {index.offset} twice")
            table[key] = info
        return table

    # -- items --

    def source(self, relative_path: str) -> Source:
        found = self.sources.get(relative_path)
        if found is None:
            try:
                found = self.fs.source(self.fs.join(self.directory, relative_path))
            except CheckpointNotFoundError:
                raise self.fail(f"data file {relative_path} is missing") from None
            self.sources[relative_path] = found
        return found

    def item(self, fqn: str, info: StorageInfo) -> tuple[Source, SliceSource]:
        path = info.relative_path
        if not _safe_file_name(path):
            raise self.fail(f"item {fqn!r}: relative_path {path!r} is not a file name in the "
                            "checkpoint directory")
        if info.transform_descriptors:
            raise UnsupportedFormatError(
                f"item {fqn!r} is stored with transforms {list(info.transform_descriptors)} "
                f"(e.g. dcp.save with _extensions=[ZStandard()]); torchkeep reads untransformed "
                "items only", source=self.name, format=FORMAT_NAME)
        source = self.source(path)
        if info.offset < 0 or info.length < 0 or info.offset + info.length > source.size:
            end = info.offset + info.length
            raise self.fail(f"item {fqn!r} ({path} bytes {info.offset}..{end}) runs past the "
                            f"end of the file ({source.size} bytes): truncated")
        window = SliceSource(source, info.offset, info.length,
                        f"{self.name}/{path} (item {fqn!r} at {info.offset}+{info.length})")
        if self.items is not None:
            self.items.append((f"{path} item {fqn!r} at {info.offset}", window))
        return source, window

    def same_order(self, parsed: Parsed, label: str) -> None:
        if self.byteorder is None:
            self.byteorder = parsed.byteorder
        elif parsed.byteorder != self.byteorder:
            raise UnsupportedFormatError(f"{label} is {parsed.byteorder}-endian, other items "
                                         f"{self.byteorder}-endian", source=self.name)

    @staticmethod
    def rebase(record: Record, source: Source, start: int, name: str) -> Record:
        """An item's record as a record of the data file."""
        if record.offset is not None:
            return Record(record.nbytes, offset=start + record.offset, crc32=record.crc32,
                          name=name, source=source)
        return Record(record.nbytes, decode=record.decode, crc32=record.crc32, name=name)

    def chunk(self, fqn: str, entry: TensorStorageMetadata, chunk: ChunkStorageMetadata,
              info: StorageInfo) -> _Chunk:
        source, window = self.item(fqn, info)
        label = f"tensor {fqn!r} chunk at {list(chunk.offsets)}"
        try:
            parsed = read_torch_zip(window, allowlist=self.tensor_allowlist, limits=self.limits)
        except TorchkeepError as e:
            e.with_source(window.name)
            raise
        ref = parsed.tree
        if not isinstance(ref, TensorRef) or ref.storage is None:
            raise self.fail(f"{label}: the item holds {type(ref).__name__}, not a tensor")
        if ref.quantizer is not None or ref.device is not None or ref.storage.base is not None:
            raise UnsupportedFormatError(f"{label}: a quantized or device tensor item",
                                         source=self.name)
        assert entry.properties is not None and entry.properties.dtype is not None
        if ref.dtype.name != entry.properties.dtype.name:
            raise self.fail(f"{label}: the item is {ref.dtype.name}, the metadata says "
                            f"{entry.properties.dtype.name}")
        if tuple(ref.shape) != chunk.sizes:
            raise self.fail(f"{label}: the item's shape {list(ref.shape)} is not the chunk's "
                            f"{list(chunk.sizes)}")
        if ref.storage.nbytes < math.prod(chunk.sizes) * ref.dtype.itemsize:
            # DCP clones a chunk whose storage is not exactly its bytes: a smaller storage
            # (a stride-0 view) would make assembling it allocate more than the file holds
            raise self.fail(f"{label}: the item stores {ref.storage.nbytes} bytes, fewer than "
                            "the chunk holds")
        if list(parsed.records) != [ref.storage.key]:
            raise self.fail(f"{label}: the item holds {len(parsed.records)} storages, not one")
        self.same_order(parsed, label)
        record = self.rebase(parsed.records[ref.storage.key], source, info.offset, label)
        return _Chunk(chunk.offsets, chunk.sizes, ref, record)

    def tensor(self, fqn: str, entry: Any, table: dict[tuple[str, Any], StorageInfo]) -> TensorRef:
        what = f"tensor {fqn!r}"
        if not entry.built or entry.properties is None or not entry.properties.built:
            raise self.fail(f"{what}: its metadata was never filled in (no BUILD)")
        props = entry.properties
        assert props.dtype is not None and props.layout is not None
        if props.layout.name != "strided":
            raise UnsupportedFormatError(f"{what} has layout {props.layout.name}; only strided "
                                         "tensors are read", source=self.name)
        shape = entry.size
        self.limits.check("max_tensor_dims", len(shape), f"{what} dimensions")
        nbytes = math.prod(shape) * props.dtype.itemsize
        self.limits.check("max_tensor_bytes", nbytes, f"{what} bytes")
        self.limits.check("max_tensor_elements", math.prod(shape), f"{what} elements")
        boxes: list[ChunkStorageMetadata] = []
        for chunk in entry.chunks:
            if not isinstance(chunk, ChunkStorageMetadata) or not chunk.built:
                raise self.fail(f"{what}: a chunk is not a ChunkStorageMetadata")
            if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
                raise self.fail(f"{what}: chunk offsets {list(chunk.offsets)} / sizes "
                                f"{list(chunk.sizes)} do not match its {len(shape)} dimensions")
            if any(o + n > s for o, n, s in zip(chunk.offsets, chunk.sizes, shape, strict=True)):
                raise self.fail(f"{what}: chunk at {list(chunk.offsets)} of sizes "
                                f"{list(chunk.sizes)} lies outside its shape {list(shape)}")
            boxes.append(chunk)
        self.check_tiling(what, shape, boxes)
        chunks = []
        for chunk in boxes:
            info = table.get((fqn, chunk.offsets))
            if info is None:
                raise self.fail(f"{what}: no storage_data entry for its chunk at "
                                f"{list(chunk.offsets)}")
            chunks.append(self.chunk(fqn, entry, chunk, info))
            self.chunk_count += 1
        key = self.unique_key(fqn)
        if len(chunks) == 1 and chunks[0].sizes == shape:
            ref = chunks[0].ref
            assert ref.storage is not None
            storage = StorageRef(key, ref.storage.dtype, ref.storage.nbytes, ref.storage.location)
            self.records[key] = chunks[0].record
            return TensorRef(storage, ref.dtype, ref.offset, ref.shape, ref.stride,
                             requires_grad=props.requires_grad, conj=ref.conj, neg=ref.neg)
        if any(c.ref.conj or c.ref.neg for c in chunks):
            raise UnsupportedFormatError(f"{what}: sharded conjugate or negative-bit chunks",
                                         source=self.name)
        self.records[key] = Record(nbytes, name=what, decode=functools.partial(
            _assemble, shape, props.dtype.itemsize, chunks))
        return TensorRef(StorageRef(key, props.dtype, nbytes), props.dtype, 0, shape,
                         contiguous_strides(shape), requires_grad=props.requires_grad)

    def check_tiling(self, what: str, shape: tuple[int, ...],
                     chunks: list[ChunkStorageMetadata]) -> None:
        """The chunks cover the tensor exactly: none overlap, and together they hold every
        element (all lie inside it already)."""
        problem = tiling_problem(shape, [(c.offsets, c.sizes) for c in chunks], self.limits,
                                 what)
        if problem:
            raise self.fail(f"{what}: {problem}")

    def unique_key(self, key: str) -> str:
        found, n = key, 0
        while found in self.records:
            n += 1
            found = f"{key}#{n}"
        return found

    def value(self, fqn: str, info: StorageInfo) -> Any:
        """A BYTE_IO item: the torch.save of a non-tensor value, read as a .pt is."""
        source, window = self.item(fqn, info)
        label = f"value {fqn!r}"
        try:
            fmt = detect(window)
            if fmt == "torch":
                parsed = read_torch_zip(window, allowlist=self.allowlist, limits=self.limits)
            elif fmt == "torch-legacy":
                parsed = read_torch_legacy(window, allowlist=self.allowlist, limits=self.limits)
            else:
                raise self.fail(f"{label}: the item is not a torch.save archive ({fmt})")
        except TorchkeepError as e:
            e.with_source(window.name)
            raise
        if parsed.records:
            self.same_order(parsed, label)
            self.adopt(fqn, parsed, source, info.offset)
        return parsed.tree

    def adopt(self, fqn: str, parsed: Parsed, source: Source, start: int) -> None:
        """Take the storages of a value that holds tensors into this checkpoint's records,
        renamed so they cannot collide with other items'."""
        storages: dict[int, StorageRef] = {}

        def add(storage: StorageRef | None) -> None:
            while storage is not None:
                storages[id(storage)] = storage
                storage = storage.base

        def visit(leaf: Any) -> None:
            if isinstance(leaf, TensorRef):
                add(leaf.storage)
                for part in leaf.quantizer or ():
                    if isinstance(part, TensorRef):
                        add(part.storage)
            elif isinstance(leaf, SparseRef):
                for part in leaf.parts:
                    visit(part)
            elif isinstance(leaf, StorageView):
                add(leaf.storage)

        for _, leaf in walk_tree(parsed.tree, limits=self.limits,
                                 only=(TensorRef, SparseRef, StorageView)):
            visit(leaf)
        renamed: dict[str, str] = {}
        for old in sorted({s.key for s in storages.values()}):
            renamed[old] = self.unique_key(f"{fqn}/{old}")
            if old in parsed.records:
                self.records[renamed[old]] = self.rebase(parsed.records[old], source, start,
                                                          f"value {fqn!r} storage {old}")
        missing = set(parsed.records) - set(renamed)
        if missing:
            raise UnsupportedFormatError(f"value {fqn!r} holds storages outside its tree "
                                         f"({shown(sorted(missing))})", source=self.name)
        for storage in storages.values():
            storage.key = renamed[storage.key]

    # -- the tree --

    def nest(self, leaves: dict[str, Any], planner_data: Any) -> dict[Any, Any]:
        """The nested state dict: each fqn put back at its path in ``planner_data`` (str
        keys index dicts, ints index lists, as DCP's flattening writes them; list slots no
        path fills are None, as in DCP's own ``set_element``)."""
        if planner_data is None:
            return dict(leaves)
        if type(planner_data) is not dict:
            raise UnsupportedFormatError(
                f"planner_data is a {type(planner_data).__name__}, not DCP's flattening map "
                "(a custom planner?)", source=self.name, format=FORMAT_NAME)
        root: dict[Any, Any] = {}
        made: set[int] = {id(root)}  # the containers built here (a value is never entered)
        lists: list[list[Any]] = []
        bound = len(leaves)
        for fqn, value in leaves.items():
            path = planner_data.get(fqn, (fqn,))
            if (not isinstance(path, (tuple, list)) or not path or type(path[0]) is not str
                    or not all(type(p) is str or (type(p) is int and 0 <= p < bound)
                               for p in path)):
                raise self.fail(f"planner_data: the path of {fqn!r} is malformed "
                                f"({shown(path)})")
            if len(path) > self.limits.max_depth:
                self.limits.check("max_depth", len(path), f"the path of {fqn!r}")
            node: Any = root
            for i, key in enumerate(path):
                if isinstance(node, dict):
                    if type(key) is not str:
                        raise self.fail(f"planner_data: {fqn!r} indexes a dict with {key!r}")
                    child = node.get(key, _HOLE)
                else:
                    if type(key) is not int:
                        raise self.fail(f"planner_data: {fqn!r} indexes a list with {key!r}")
                    if key >= len(node):
                        node.extend([_HOLE] * (key + 1 - len(node)))
                    child = node[key]
                if i == len(path) - 1:
                    if child is not _HOLE:
                        raise self.fail(f"planner_data: two values at the path of {fqn!r}")
                    node[key] = value
                elif child is _HOLE:
                    child = [] if type(path[i + 1]) is int else {}
                    made.add(id(child))
                    if isinstance(child, list):
                        lists.append(child)
                    node[key] = child
                    node = child
                elif id(child) in made:
                    node = child
                else:
                    raise self.fail(f"planner_data: the path of {fqn!r} runs through a value")
        for items in lists:
            items[:] = [None if v is _HOLE else v for v in items]
        return root

    def read(self) -> Parsed:
        metadata = self.metadata()
        table = self.storage_table(metadata)
        leaves: dict[str, Any] = {}
        for fqn, entry in metadata.state_dict_metadata.items():
            if type(fqn) is not str:
                raise self.fail(f"state_dict_metadata key {shown(fqn)} is not a str")
            if isinstance(entry, TensorStorageMetadata):
                leaves[fqn] = self.tensor(fqn, entry, table)
            elif isinstance(entry, BytesStorageMetadata):
                where = table.get((fqn, None))
                if where is None:
                    raise self.fail(f"value {fqn!r} has no storage_data entry")
                leaves[fqn] = self.value(fqn, where)
            else:
                raise self.fail(f"state_dict_metadata of {fqn!r} is a {type(entry).__name__}")
        tree = self.nest(leaves, metadata.planner_data)
        meta = metadata.storage_meta
        info: dict[str, Any] = {
            "version": metadata.version,
            "checkpoint_id": meta.checkpoint_id if meta else None,
            "save_id": meta.save_id if meta else None,
            "data_files": len(self.sources),
            "items": len(metadata.storage_data),
            "chunks": self.chunk_count,
        }
        directory_source = open_source(b"")  # stands for the directory: only its name is used
        directory_source.name = self.name
        parsed = Parsed(FORMAT_NAME, tree, directory_source, self.records,
                        self.byteorder or "little", info)
        parsed.extra_sources = [s for s in self.sources.values() if s.size]
        for source in self.sources.values():
            if not source.size:
                source.close()
        return parsed

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


_HOLE = object()  # a list slot no path has filled yet


def _assemble(shape: tuple[int, ...], itemsize: int, chunks: list[_Chunk]) -> bytes:
    """The whole tensor's bytes (C order) from its chunks, each a view of its item's data."""
    import numpy as np

    kind = np.dtype(f"V{itemsize}")

    def pieces() -> Any:
        for chunk in chunks:
            if not math.prod(chunk.sizes):
                continue
            record = chunk.record
            if record.offset is not None:
                assert record.source is not None
                raw = record.source.read(record.offset, record.nbytes)
            else:
                assert record.decode is not None
                raw = record.decode()
            if len(raw) != record.nbytes:
                raise CorruptCheckpointError(f"{record.name}: decoded to the wrong size")
            ref = chunk.ref
            yield chunk.offsets, chunk.sizes, np.ndarray(
                ref.shape, dtype=kind, buffer=raw, offset=ref.offset * itemsize,
                strides=tuple(s * itemsize for s in ref.stride))

    return assemble_chunks(shape, itemsize, pieces())


def read_dcp_dir(
    directory: Any,
    *,
    fs: FileSystem | None = None,
    limits: Limits = DEFAULT_LIMITS,
    allowlist: Allowlist | None = None,
    items: list[tuple[str, Source]] | None = None,
) -> Parsed:
    """Parse a DCP checkpoint directory into placeholders (no tensor bytes read).

    ``allowlist`` is what the non-tensor values (BYTE_IO items) may name, as for a
    ``.pt`` file (default: torchkeep's default allowlist); ``.metadata`` always gets its
    own fixed one. ``items``, when given, receives ``(label, source)`` for every item read
    (each a complete torch.save zip archive), for ``verify``.
    """
    if fs is None:
        fs, directory = open_filesystem(directory)
    reader = _Reader(fs, directory, limits, allowlist or Allowlist(), items)
    try:
        return reader.read()
    except TorchkeepError as e:
        reader.close()
        e.with_source(reader.name)
        raise
    except BaseException:
        reader.close()
        raise
