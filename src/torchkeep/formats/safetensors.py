"""The .safetensors format: a strict reader, and a writer that also keeps the whole tree.

A file torchkeep writes is a plain safetensors file: every tensor under its
``/``-joined path. The rest of the tree (nesting, order, non-tensor values, views,
numpy arrays) goes as JSON into ``__metadata__["torchkeep"]``, so ``torchkeep.load``
gives back the original object while any safetensors reader still sees the tensors.

Views: a storage seen by one tensor that covers it contiguously is written under that
tensor's name. A storage shared by several tensors (tied weights) is written once,
under the first tensor that covers it; the others are views of it in the JSON, and a
plain reader sees only the first name. A storage no tensor covers whole (a slice, a
transpose, an expand) is written flat under ``<first view name>.__storage__``; plain
readers see that flat storage, not the view.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchkeep import dtypes
from torchkeep.dtypes import DType
from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedTypeError
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.formats.pickler import Describe
from torchkeep.formats.treejson import TreeDecoder, TreeEncoder, contiguous_strides, dump_tree
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source
from torchkeep.tree import MAX_DIMENSION, StorageRef, TensorRef, view_problem

__all__ = ["METADATA_KEY", "read_safetensors", "write_safetensors"]

METADATA_KEY = "torchkeep"

# The safetensors writer's order (descending Rust Dtype enum): biggest alignment first.
_ORDER = [
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8",
    "F6_E3M2", "F6_E2M3", "F4", "BOOL",
]
_RANK = {code: i for i, code in enumerate(_ORDER)}

#: dtypes safetensors has no code for, stored as pairs / raw bits (with a trailing dim).
_CARRIERS: dict[str, tuple[str, int]] = {
    "complex128": ("F64", 2),
    "complex32": ("F16", 2),
    "bits8": ("U8", 1),
    "bits1x8": ("U8", 1),
    "bits2x4": ("U8", 1),
    "bits4x2": ("U8", 1),
    "bits16": ("U16", 1),
}


# -- reading ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CorruptCheckpointError(f"safetensors header repeats the key {key!r}")
        result[key] = value
    return result


def read_header(source: Source, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where the byte buffer starts."""
    if source.size < 8:
        raise CorruptCheckpointError("safetensors file shorter than its 8-byte header length",
                                     source=source.name)
    (n,) = struct.unpack("<Q", source.read(0, 8))
    limits.check("max_header_bytes", n, "safetensors header bytes")
    if 8 + n > source.size:
        raise CorruptCheckpointError(
            f"safetensors header length {n} runs past the end of the file (truncated)",
            source=source.name,
        )
    raw = source.read(8, n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise e.with_source(source.name) from None
        raise CorruptCheckpointError(f"safetensors header is not valid JSON: {e}",
                                     source=source.name) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object",
                                     source=source.name)
    return header, 8 + n


def read_safetensors(source: Source, *, limits: Limits = DEFAULT_LIMITS) -> Parsed:
    """Parse a .safetensors file: validate the header the way the safetensors library does."""
    header, data_start = read_header(source, limits)

    def fail(message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(message, source=source.name)

    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise fail("__metadata__ must map strings to strings")
    buffer_size = source.size - data_start
    refs: dict[str, TensorRef] = {}
    records: dict[str, Record] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"tensor {name!r}: entry is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str):
            raise fail(f"tensor {name!r}: missing dtype")
        dtype = dtypes.by_safetensors(code)
        if dtype is None:
            raise UnsupportedFormatError(
                f"tensor {name!r}: dtype {code} has no torch equivalent", source=source.name
            )
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise fail(f"tensor {name!r}: shape must be a list of non-negative ints")
        limits.check("max_tensor_dims", len(shape), f"tensor {name!r} dimensions")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise fail(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
        begin, end = offsets
        if code == "F4":  # shape counts 4-bit values; torch's element packs two
            if shape and shape[-1] % 2:
                raise fail(f"tensor {name!r}: F4 last dimension must be even")
            shape = [*shape[:-1], shape[-1] // 2] if shape else shape
        numel = math.prod(shape)
        limits.check("max_tensor_elements", numel, f"tensor {name!r} elements")
        if numel * dtype.itemsize != end - begin:
            raise fail(
                f"tensor {name!r}: {code}{shape} needs {numel * dtype.itemsize} bytes, "
                f"its data_offsets span {end - begin}"
            )
        storage = StorageRef(name, dtype, end - begin)
        refs[name] = TensorRef(storage, dtype, 0, tuple(shape), contiguous_strides(tuple(shape)))
        records[name] = Record(end - begin, offset=data_start + begin, name=name)
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise fail(f"tensor {name!r}: data starts at {begin}, expected {expected} "
                       "(tensors must tile the buffer with no gap or overlap)")
        expected = end
    if expected != buffer_size:
        raise fail(f"tensors cover {expected} bytes of a {buffer_size}-byte buffer "
                   "(truncated, or trailing bytes)")
    info: dict[str, Any] = {"metadata": dict(metadata or {}), "header_bytes": data_start - 8}
    tree: Any
    encoded = (metadata or {}).get(METADATA_KEY)
    if encoded is not None:
        resolve = _view_resolver(refs, source.name, limits)
        tree = TreeDecoder(resolve, source.name, limits).decode(encoded)
        info["writer"] = "torchkeep"
    else:
        tree = {name: refs[name] for name in sorted(refs)}
    return Parsed("safetensors", tree, source, records, "little", info)


def _view_resolver(refs: dict[str, TensorRef], source_name: str, limits: Limits) -> Callable[
        [Any, dict[str, Any]], TensorRef]:
    """How a tree node views a record: every view of one record shares its storage."""

    def fail(message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"torchkeep tree metadata: {message}", source=source_name)

    def resolve(name: Any, whole: dict[str, Any]) -> TensorRef:
        base = refs.get(name) if isinstance(name, str) else None
        if base is None or base.storage is None:
            raise fail(f"refers to tensor {name!r}, which the file does not hold")
        storage = base.storage  # every view of a record shares its one storage
        dtype_name = whole.get("dtype", base.dtype.name)
        if not isinstance(dtype_name, str):
            raise fail(f"view of {name!r}: dtype must be a string")
        dtype = dtypes.by_name(dtype_name)
        shape, stride = whole.get("shape", list(base.shape)), whole.get("stride")
        if not isinstance(shape, list) or not (stride is None or isinstance(stride, list)):
            raise fail(f"view of {name!r}: shape and stride must be lists")
        shape_t = tuple(shape)
        if stride is None and all(type(s) is int and 0 <= s < MAX_DIMENSION for s in shape_t):
            stride = list(contiguous_strides(shape_t))
        offset = whole.get("offset", 0)
        problem = view_problem(storage.nbytes, dtype, offset, shape_t, tuple(stride or ()),
                               limits)
        if problem is not None:
            raise fail(f"view of {name!r}: {problem}")
        return TensorRef(
            storage, dtype, offset, shape_t, tuple(stride or ()),
            requires_grad=bool(whole.get("requires_grad", False)),
            parameter=bool(whole.get("parameter", False)),
        )

    return resolve


# -- writing ----------------------------------------------------------------------------

StorageBytes = Callable[[StorageRef], Any]


@dataclass(slots=True)
class _Entry:
    name: str
    code: str
    shape: list[int]
    ref: StorageRef
    data: Any = None  # bytes-like, set for numpy arrays


def write_safetensors(
    obj: Any,
    write: Callable[[Any], Any],
    *,
    describe: Describe | None,
    storage_bytes: StorageBytes,
    extra_metadata: dict[str, str] | None = None,
) -> int:
    """Write ``obj`` as a safetensors file; returns the bytes written."""
    encoder = TreeEncoder(describe)
    skeleton = encoder.encode(obj)
    entries, views = _plan(encoder)
    _apply_views(skeleton, views)
    metadata = {"format": "pt", **(extra_metadata or {})}
    metadata[METADATA_KEY] = dump_tree(skeleton)
    entries.sort(key=lambda e: (_RANK[e.code], e.name))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.code, "shape": entry.shape,
                              "data_offsets": [offset, offset + entry.ref.nbytes]}
        offset += entry.ref.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    write(struct.pack("<Q", len(raw)) + raw)
    total = 8 + len(raw)
    for entry in entries:
        data = entry.data if entry.data is not None else storage_bytes(entry.ref)
        view = memoryview(data).cast("B")
        if view.nbytes != entry.ref.nbytes:
            raise CorruptCheckpointError(f"tensor {entry.name!r} changed size while saving")
        if sys.byteorder == "big" and entry.ref.dtype.itemsize > 1:
            import numpy as np

            unit = entry.ref.dtype.swap_unit
            swapped = np.frombuffer(view, dtype=f">u{unit}").astype(f"<u{unit}")
            view = memoryview(swapped)  # type: ignore[arg-type]
        if view.nbytes:
            write(view)
        total += view.nbytes
    return total


def _plan(encoder: TreeEncoder) -> tuple[list[_Entry], dict[str, dict[str, Any]]]:
    """Decide which record holds each storage, and how each tensor views it."""
    groups: dict[int, list[tuple[str, TensorRef, Any]]] = {}
    for item in encoder.tensors:
        assert item[1].storage is not None
        groups.setdefault(id(item[1].storage), []).append(item)
    entries: list[_Entry] = []
    views: dict[str, dict[str, Any]] = {}
    for members in groups.values():
        owner = next((m for m in members if m[1].covers_storage()), None)
        storage = members[0][1].storage
        assert storage is not None
        if owner is not None:
            record, ref = owner[0], owner[1]
            code, shape = _code_and_shape(ref.dtype, list(ref.shape))
        else:
            record = f"{members[0][0]}.__storage__"
            while record in encoder.names:
                record += "_"
            dtype = members[0][1].dtype
            code, shape = _code_and_shape(dtype, [storage.nbytes // dtype.itemsize])
        entries.append(_Entry(record, code, shape, storage, owner[2] if owner else None))
        for name, ref, _ in members:
            view: dict[str, Any] = {"$tensor": record}
            exact = owner is not None and name == record and ref.dtype.safetensors is not None
            if not exact:
                view.update(dtype=ref.dtype.name, offset=ref.offset, shape=list(ref.shape),
                            stride=list(ref.stride))
            if ref.requires_grad:
                view["requires_grad"] = True
            if ref.parameter:
                view["parameter"] = True
            if ref.conj:
                view["conj"] = True
            if ref.neg:
                view["neg"] = True
            views[name] = view
    return entries, views


def _code_and_shape(dtype: DType, shape: list[int]) -> tuple[str, list[int]]:
    if dtype.safetensors is not None:
        if dtype.safetensors == "F4" and shape:
            shape = [*shape[:-1], shape[-1] * 2]
        return dtype.safetensors, shape
    carrier = _CARRIERS.get(dtype.name)
    if carrier is None:
        raise UnsupportedTypeError(f"{dtype.name} tensors cannot be saved as safetensors")
    code, extra = carrier
    return code, [*shape, extra] if extra > 1 else shape


def _apply_views(node: Any, views: dict[str, dict[str, Any]]) -> None:
    """Replace each ``{"$tensor": name}`` / ``{"$ndarray": name}`` node with its full view."""
    stack = [node]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, list):
            stack.extend(current)
        elif isinstance(current, dict):
            for tag in ("$tensor", "$ndarray"):
                name = current.get(tag)
                if isinstance(name, str) and name in views:
                    view = dict(views[name])
                    record = view.pop("$tensor")
                    current[tag] = record
                    current.update(view)
                    if "attrs" in current:
                        stack.append(current["attrs"])
                    break
            else:
                stack.extend(current.values())
