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

import base64
import json
import math
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from torchkeep import dtypes
from torchkeep.dtypes import DType
from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedTypeError
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.formats.pickler import Describe, render_path
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source
from torchkeep.tree import Device, Size, StorageRef, TensorRef

__all__ = ["METADATA_KEY", "read_safetensors", "write_safetensors"]

METADATA_KEY = "torchkeep"
TREE_VERSION = 1

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
        refs[name] = TensorRef(storage, dtype, 0, tuple(shape), _contiguous(tuple(shape)))
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
        tree = _TreeDecoder(refs, source.name, limits).decode(encoded)
        info["writer"] = "torchkeep"
    else:
        tree = {name: refs[name] for name in sorted(refs)}
    return Parsed("safetensors", tree, source, records, "little", info)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


class _TreeDecoder:
    def __init__(self, refs: dict[str, TensorRef], name: str, limits: Limits) -> None:
        self.refs = refs
        self.name = name
        self.limits = limits
        self.used: set[str] = set()

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"torchkeep tree metadata: {message}", source=self.name)

    def decode(self, encoded: str) -> Any:
        try:
            doc = json.loads(encoded)
        except (ValueError, RecursionError) as e:
            raise self.fail(f"not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("version") != TREE_VERSION or "tree" not in doc:
            raise UnsupportedFormatError(
                "torchkeep tree metadata of an unknown version", source=self.name
            )
        return self.node(doc["tree"], 0)

    def node(self, value: Any, depth: int) -> Any:
        if depth > self.limits.max_depth:
            self.limits.check("max_depth", depth, "tree nesting")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.node(v, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) < 1:
            raise self.fail(f"unexpected node {type(value).__name__}")
        tag = next(iter(value))
        body = value[tag]
        try:
            return self.tagged(tag, body, value, depth)
        except (TypeError, ValueError, KeyError, IndexError) as e:
            if isinstance(e, CorruptCheckpointError):
                raise
            raise self.fail(f"bad {tag} node ({e})") from None

    def pairs(self, body: Any, depth: int) -> list[tuple[Any, Any]]:
        if isinstance(body, dict):
            return [(k, self.node(v, depth + 1)) for k, v in body.items()]
        return [(_hashable(self.node(k, depth + 1)), self.node(v, depth + 1)) for k, v in body]

    def tagged(self, tag: str, body: Any, whole: dict[str, Any], depth: int) -> Any:
        if tag == "$dict":
            return dict(self.pairs(body, depth))
        if tag == "$odict":
            result: Any = OrderedDict(self.pairs(body, depth))
            if "$metadata" in whole:
                result._metadata = self.node(whole["$metadata"], depth + 1)
            return result
        if tag == "$tuple":
            return tuple(self.node(v, depth + 1) for v in body)
        if tag == "$set":
            return {_hashable(self.node(v, depth + 1)) for v in body}
        if tag == "$frozenset":
            return frozenset(_hashable(self.node(v, depth + 1)) for v in body)
        if tag == "$float":
            return float(body)
        if tag == "$int":
            return int(body)
        if tag == "$complex":
            return complex(float(body[0]), float(body[1]))
        if tag == "$bytes":
            return base64.b64decode(body, validate=True)
        if tag == "$bytearray":
            return bytearray(base64.b64decode(body, validate=True))
        if tag == "$size":
            return Size(int(v) for v in body)
        if tag == "$dtype":
            return dtypes.by_name(body)
        if tag == "$device":
            kind, _, index = str(body).partition(":")
            return Device(kind, int(index) if index else None)
        if tag == "$tensor":
            return self.tensor(body, whole)
        if tag == "$ndarray":
            return self.tensor(body, whole).with_(numpy=True)
        if tag == "$ndbytes":
            dtype = np.dtype(whole["npdtype"])
            if dtype.hasobject:
                raise self.fail("object arrays are not allowed")
            raw = base64.b64decode(body, validate=True)
            shape = tuple(int(s) for s in whole["shape"])
            if len(raw) != math.prod(shape) * dtype.itemsize:
                raise self.fail("numpy array bytes do not match its shape")
            return np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        if tag == "$npscalar":
            dtype = np.dtype(whole["npdtype"])
            raw = base64.b64decode(body, validate=True)
            if dtype.hasobject or len(raw) != dtype.itemsize:
                raise self.fail("bad numpy scalar")
            return np.frombuffer(raw, dtype=dtype)[0]
        raise self.fail(f"unknown tag {tag!r}")

    def tensor(self, name: Any, whole: dict[str, Any]) -> TensorRef:
        base = self.refs.get(name)
        if base is None or base.storage is None:
            raise self.fail(f"refers to tensor {name!r}, which the file does not hold")
        storage = base.storage  # every view of a record shares its one storage
        dtype = dtypes.by_name(whole["dtype"]) if "dtype" in whole else base.dtype
        shape = tuple(int(s) for s in whole.get("shape", base.shape))
        stride = tuple(int(s) for s in whole["stride"]) if "stride" in whole else (
            _contiguous(shape)
        )
        offset = int(whole.get("offset", 0))
        if len(shape) != len(stride) or offset < 0 or any(s < 0 for s in (*shape, *stride)):
            raise self.fail(f"bad view of {name!r}")
        if not dtype.has_tensors:
            raise self.fail(f"dtype {dtype.name} cannot back a tensor")
        if math.prod(shape):
            last = offset + sum((a - 1) * b for a, b in zip(shape, stride, strict=True))
            if (last + 1) * dtype.itemsize > storage.nbytes:
                raise self.fail(f"view of {name!r} lies outside its {storage.nbytes} bytes")
        elif offset * dtype.itemsize > storage.nbytes:
            raise self.fail(f"view of {name!r} starts outside its {storage.nbytes} bytes")
        return TensorRef(
            storage, dtype, offset, shape, stride,
            requires_grad=bool(whole.get("requires_grad", False)),
            parameter=bool(whole.get("parameter", False)),
        )


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


# -- writing ----------------------------------------------------------------------------

StorageBytes = Callable[[StorageRef], Any]


@dataclass(slots=True)
class _Entry:
    name: str
    code: str
    shape: list[int]
    ref: StorageRef
    data: Any = None  # bytes-like, set for numpy arrays


class _TreeEncoder:
    """Walks the tree once: JSON skeleton out, tensor leaves collected with their paths."""

    def __init__(self, describe: Describe | None) -> None:
        self.describe = describe
        self.path: list[Any] = []
        self.active: set[int] = set()
        self.tensors: list[tuple[str, TensorRef, Any]] = []  # (name, ref, ndarray|None)
        self.names: set[str] = set()
        self.nodes: dict[int, Any] = {}

    def fail(self, message: str) -> UnsupportedTypeError:
        return UnsupportedTypeError(f"{render_path(self.path)}: {message}")

    def unique_name(self) -> str:
        base = "/".join(str(p) for p in self.path) or "tensor"
        if base == "__metadata__":
            base = "__metadata__/0"
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}#{n}"
        self.names.add(name)
        return name

    def encode(self, obj: Any) -> Any:
        if obj is None or type(obj) in (bool, str):
            return obj
        if type(obj) is int:
            return obj if -(2**63) <= obj < 2**63 else {"$int": str(obj)}
        if type(obj) is float:
            return obj if math.isfinite(obj) else {"$float": repr(obj)}
        oid = id(obj)
        if isinstance(obj, (dict, list, tuple, set, frozenset)):
            if oid in self.active:
                raise self.fail("a container that contains itself cannot be saved as safetensors")
            if len(self.path) > 200:
                raise self.fail("nesting deeper than 200 levels")
            self.active.add(oid)
            try:
                return self.container(obj)
            finally:
                self.active.discard(oid)
        return self.leaf(obj)

    def child(self, key: Any, value: Any) -> Any:
        self.path.append(key)
        try:
            return self.encode(value)
        finally:
            self.path.pop()

    def key(self, key: Any) -> Any:
        if key is None or type(key) in (bool, int, float, str):
            return self.encode(key)
        if type(key) is tuple:
            return {"$tuple": [self.key(k) for k in key]}
        raise self.fail(f"dict key of type {type(key).__name__} cannot be saved as safetensors")

    def items(self, obj: dict[Any, Any]) -> Any:
        if all(type(k) is str for k in obj):
            return {k: self.child(k, v) for k, v in obj.items()}
        return [[self.key(k), self.child(k, v)] for k, v in obj.items()]

    def container(self, obj: Any) -> Any:
        if type(obj) is dict:
            return {"$dict": self.items(obj)}
        if isinstance(obj, OrderedDict):
            node: dict[str, Any] = {"$odict": self.items(obj)}
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                self.path.append("_metadata")
                node["$metadata"] = self.encode(meta)
                self.path.pop()
            return node
        if type(obj) is list:
            return [self.child(i, v) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {"$tuple": [self.child(i, v) for i, v in enumerate(obj)]}
        if isinstance(obj, Size):
            return {"$size": list(obj)}
        if type(obj) is set:
            return {"$set": [self.key(v) for v in obj]}
        if type(obj) is frozenset:
            return {"$frozenset": [self.key(v) for v in obj]}
        if isinstance(obj, dict):
            return {"$dict": self.items(obj)}
        placeholder = self.describe(obj) if self.describe is not None else None
        if placeholder is not None:
            return self.leaf(placeholder, original=obj)
        raise self.fail(f"unsupported type {type(obj).__qualname__}")

    def leaf(self, obj: Any, original: Any = None) -> Any:
        original = obj if original is None else original
        if isinstance(obj, TensorRef):
            return self.tensor(obj, original)
        if isinstance(obj, dtypes.DType):
            return {"$dtype": obj.name}
        if isinstance(obj, Size):
            return {"$size": list(obj)}
        if isinstance(obj, Device):
            return {"$device": str(obj)}
        if isinstance(obj, complex):
            return {"$complex": [repr(obj.real), repr(obj.imag)]}
        if isinstance(obj, bytes):
            return {"$bytes": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, bytearray):
            return {"$bytearray": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, np.ndarray):
            return self.ndarray(obj)
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise self.fail("numpy object scalars cannot be saved")
            return {"$npscalar": base64.b64encode(obj.tobytes()).decode("ascii"),
                    "npdtype": obj.dtype.str}
        if self.describe is not None and original is obj:
            try:
                placeholder = self.describe(obj)
            except UnsupportedTypeError as e:
                raise self.fail(e.reason) from None
            if placeholder is not None:
                return self.leaf(placeholder, original=obj)
        raise self.fail(
            f"unsupported type {type(original).__module__}.{type(original).__qualname__}"
        )

    def tensor(self, ref: TensorRef, original: Any) -> Any:
        if ref.storage is None or ref.quantizer is not None or not ref.dtype.has_tensors:
            raise self.fail("this tensor kind cannot be saved as safetensors")
        node = self.nodes.get(id(original))
        if node is not None:
            return node
        name = self.unique_name()
        self.tensors.append((name, ref, None))
        node = {"$tensor": name}
        self.nodes[id(original)] = node
        return node

    def ndarray(self, array: np.ndarray[Any, Any]) -> Any:
        if array.dtype.hasobject:
            raise self.fail("numpy arrays of Python objects cannot be saved")
        dtype = dtypes.from_numpy(array.dtype)
        if dtype is None:
            if array.dtype.names is not None:
                raise self.fail("structured numpy arrays cannot be saved")
            data = np.ascontiguousarray(array)
            return {"$ndbytes": base64.b64encode(data.tobytes()).decode("ascii"),
                    "npdtype": array.dtype.str, "shape": list(array.shape)}
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")
                                    if array.dtype.byteorder == ">" else array.dtype)
        name = self.unique_name()
        ref = TensorRef(StorageRef(name, dtype, data.nbytes), dtype, 0, tuple(array.shape),
                        _contiguous(tuple(array.shape)))
        self.tensors.append((name, ref, data))
        return {"$ndarray": name}


def write_safetensors(
    obj: Any,
    write: Callable[[Any], Any],
    *,
    describe: Describe | None,
    storage_bytes: StorageBytes,
    extra_metadata: dict[str, str] | None = None,
) -> int:
    """Write ``obj`` as a safetensors file; returns the bytes written."""
    encoder = _TreeEncoder(describe)
    skeleton = encoder.encode(obj)
    entries, views = _plan(encoder)
    _apply_views(skeleton, views)
    metadata = {"format": "pt", **(extra_metadata or {})}
    metadata[METADATA_KEY] = json.dumps(
        {"version": TREE_VERSION, "tree": skeleton}, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False,
    )
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
            unit = entry.ref.dtype.itemsize // (2 if entry.ref.dtype.kind == "complex" else 1)
            swapped = np.frombuffer(view, dtype=f">u{unit}").astype(f"<u{unit}")
            view = memoryview(swapped)  # type: ignore[arg-type]
        if view.nbytes:
            write(view)
        total += view.nbytes
    return total


def _plan(encoder: _TreeEncoder) -> tuple[list[_Entry], dict[str, dict[str, Any]]]:
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
                if isinstance(name, str) and name in views and len(current) <= 2:
                    view = dict(views[name])
                    record = view.pop("$tensor")
                    current[tag] = record
                    current.update(view)
                    break
            else:
                stack.extend(current.values())
