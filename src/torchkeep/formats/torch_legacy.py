"""The legacy "magic number" stream (``torch.save(..., _use_new_zipfile_serialization=False)``).

Layout: pickle(magic) pickle(1001) pickle(sys_info) pickle(object) pickle(sorted keys),
then for each key an int64 little-endian element count and the storage's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from torchkeep.dtypes import DType
from torchkeep.errors import CorruptCheckpointError, FormatError, UnsafeCheckpointError, shown
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.formats.pickler import Describe, TreePickler
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source
from torchkeep.tree import StorageRef, StorageView
from torchkeep.unpickle import Allowlist, unpickle
from torchkeep.unpickle.torch_globals import storage_pid

__all__ = ["MAGIC_NUMBER", "PROTOCOL_VERSION", "read_torch_legacy", "write_torch_legacy"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_MAGIC_PICKLE = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little") + b"."


def is_legacy(head: bytes) -> bool:
    """True when ``head`` starts with the pickled magic number."""
    return head.startswith(_MAGIC_PICKLE)


def stream_bytes(source: Source) -> Any:
    """The whole input as an indexable, searchable object (a read-only map for files:
    for ``scan``, which accepts that a file truncated under it crashes the process)."""
    memory = source.memory()
    if memory is not None:
        return bytes(memory)
    whole = source.read_only_map()
    return whole if whole is not None else source.read(0, source.size)


_FIRST_PREFIX = 64 << 10  # read-ahead past the pickles is at most this much


def read_torch_legacy(
    source: Source, *, allowlist: Allowlist, limits: Limits = DEFAULT_LIMITS
) -> Parsed:
    """Parse a legacy-format checkpoint into placeholders.

    The pickles come first and the storages after them; the input is read in growing
    prefixes until the pickles fit, so its tensor bytes are never read (nor mapped: a
    map of a file rewritten in place would crash the process).
    """
    memory = source.memory()
    if memory is not None:
        return _read_legacy(bytes(memory), source, allowlist, limits)
    size = min(source.size, _FIRST_PREFIX)
    while True:
        try:
            return _read_legacy(source.read(0, size), source, allowlist, limits)
        except CorruptCheckpointError:
            # a prefix fails where the whole input does, or where the prefix ends; only
            # the whole input's error is the input's own
            if size >= source.size:
                raise
            # a failed prefix costs a parse of its length: grow fast, and take the whole
            # file once half of it would be read anyway
            size = size * 8 if size * 16 < source.size else source.size


def _read_legacy(data: Any, source: Source, allowlist: Allowlist, limits: Limits) -> Parsed:
    plain = Allowlist()
    pos = 0

    def header(what: str) -> Any:
        nonlocal pos
        result = unpickle(data, allowlist=plain, start=pos, limits=limits, what=what)
        pos = result.end
        return result.value

    if header("magic number") != MAGIC_NUMBER:
        raise CorruptCheckpointError("invalid magic number", source=source.name)
    version = header("protocol version")
    if version != PROTOCOL_VERSION:
        raise CorruptCheckpointError(f"unsupported legacy protocol version {shown(version)}",
                                     source=source.name)
    sys_info = header("sys_info")
    storages: dict[str, StorageRef] = {}
    declared: dict[str, int] = {}  # key -> element count
    elem_dtype: dict[str, DType] = {}

    def persistent_load(pid: Any) -> StorageView:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            raise UnsafeCheckpointError(
                "the file pickles a whole nn.Module with its source code; torchkeep loads data "
                "only (save model.state_dict() instead)"
            )
        storage_class, key, location, numel, (view,) = storage_pid(pid, 6)
        dtype = storage_class.dtype
        root = storages.get(key)
        if root is None:
            nbytes = numel * dtype.itemsize
            limits.check("max_tensor_bytes", nbytes, f"storage {key} bytes")
            root = StorageRef(key, dtype, nbytes, location)
            storages[key] = root
            declared[key] = numel
            elem_dtype[key] = dtype
        elif root.nbytes != numel * dtype.itemsize:
            raise CorruptCheckpointError(f"storage {key} is declared with two sizes")
        if view is None:
            return StorageView(root, dtype, storage_class.untyped)
        if (not isinstance(view, tuple) or len(view) != 3 or type(view[0]) is not str
                or type(view[1]) is not int or type(view[2]) is not int
                or view[1] < 0 or view[2] < 0):
            raise CorruptCheckpointError("malformed legacy view metadata")
        view_key, offset, size = view
        found = storages.get(view_key)
        if found is None:
            if (offset + size) * dtype.itemsize > root.nbytes:
                raise CorruptCheckpointError(f"view storage {view_key} lies outside {key}")
            found = StorageRef(view_key, dtype, size * dtype.itemsize, location, root,
                               offset * dtype.itemsize)
            storages[view_key] = found
        return StorageView(found, dtype, storage_class.untyped)

    main = unpickle(data, allowlist=allowlist, persistent_load=persistent_load, start=pos,
                    limits=limits, what="pickle")
    pos = main.end
    keys = header("storage keys")
    if not isinstance(keys, list) or not all(type(k) is str for k in keys):
        raise CorruptCheckpointError("the storage key list is malformed", source=source.name)
    roots = {k for k, ref in storages.items() if ref.base is None}
    if set(keys) != roots or len(keys) != len(roots):
        raise CorruptCheckpointError(
            "the storage key list does not match the storages the pickle uses",
            source=source.name,
        )
    records: dict[str, Record] = {}
    for key in keys:
        if pos + 8 > source.size:
            raise CorruptCheckpointError(f"truncated before storage {key}", source=source.name)
        (count,) = struct.unpack("<q", source.read(pos, 8))
        if count != declared[key]:
            raise CorruptCheckpointError(
                f"storage {key} has {count} elements on disk, the pickle declares {declared[key]}",
                source=source.name,
            )
        nbytes = storages[key].nbytes
        if pos + 8 + nbytes > source.size:
            raise CorruptCheckpointError(f"storage {key} runs past the end of the file (truncated)",
                                         source=source.name)
        records[key] = Record(nbytes, offset=pos + 8, name=key)
        pos += 8 + nbytes
    info = {"sys_info": sys_info if isinstance(sys_info, dict) else None,
            "trailing_bytes": source.size - pos}
    return Parsed("torch-legacy", main.value, source, records, "little", info)


def write_torch_legacy(
    obj: Any,
    write: Callable[[Any], Any],
    *,
    describe: Describe | None,
    storage_bytes: Callable[[StorageRef], Any],
) -> int:
    """Write ``obj`` in the legacy format (what ``_use_new_zipfile_serialization=False`` does)."""
    import sys

    if sys.byteorder != "little":
        raise FormatError("writing the legacy format is only supported on little-endian hosts")
    write(_MAGIC_PICKLE)
    write(b"\x80\x02M\xe9\x03.")
    total = len(_MAGIC_PICKLE) + 6
    sys_info = TreePickler().dump(
        {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
         "type_sizes": {"short": 2, "int": 4, "long": 4}}
    )
    pickler = TreePickler(describe=describe, legacy=True)
    body = pickler.dump(obj)
    keys = sorted(str(i) for i in range(len(pickler.storages)))
    key_list = TreePickler().dump(keys)
    for part in (sys_info, body, key_list):
        write(part)
        total += len(part)
    for key in keys:
        ref = pickler.storages[int(key)]
        itemsize = pickler.storage_dtype(ref).itemsize
        data = memoryview(storage_bytes(ref)).cast("B")
        write(struct.pack("<q", data.nbytes // itemsize))
        if data.nbytes:
            write(data)
        total += 8 + data.nbytes
    return total
