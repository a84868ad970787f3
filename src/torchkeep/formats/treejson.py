"""The JSON form of a checkpoint tree: containers, values and tensor references, no pickle.

Used by the safetensors writer (in ``__metadata__``) and by manager step manifests.
Lists are JSON arrays; str, int (64-bit), finite float, bool and None are themselves;
everything else is a one-key object tagged with ``$``: ``$dict`` (an object when all
keys are strings, else ``[key, value]`` pairs), ``$odict`` (with ``$metadata``),
``$tuple``, ``$set``, ``$frozenset``, ``$int`` and ``$float`` (big or non-finite, as
text), ``$complex``, ``$bytes`` / ``$bytearray`` (base64), ``$size``, ``$dtype``,
``$device``, ``$tensor`` / ``$ndarray`` (a name the file resolves, plus view fields),
``$ndbytes`` and ``$npscalar`` (numpy data without a torch dtype, base64), ``$counter``,
and ``$reduce`` for the standard-library values the pickle reader takes (Namespace,
paths, datetimes, Decimal, slice: ``{"$reduce": "datetime.date", "args": [...]}``), built
back by the same checked constructors.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torchkeep import dtypes
from torchkeep.errors import (
    CorruptCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
    shown,
)
from torchkeep.formats.pickler import REDUCED_TYPES, Describe, reduction, render_path
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.tree import (
    Device,
    PickledObject,
    Size,
    StorageRef,
    TensorRef,
    join_path,
    plain_attribute_name,
)
from torchkeep.unpickle.allowlist import Allowlist, build

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TREE_VERSION", "TreeDecoder", "TreeEncoder", "contiguous_strides", "dump_tree"]

TREE_VERSION = 1

#: Makes the placeholder for ``{"$tensor": name, ...view fields}``.
Resolve = Callable[[Any, dict[str, Any]], TensorRef]


def dump_tree(skeleton: Any) -> str:
    """The JSON document for an encoded tree."""
    return json.dumps({"version": TREE_VERSION, "tree": skeleton}, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-contiguous strides (in elements) of ``shape``."""
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


class TreeDecoder:
    """Rebuilds a tree from its JSON form; ``resolve(name, node)`` makes each tensor."""

    def __init__(self, resolve: Resolve, name: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.resolve = resolve
        self.name = name
        self.limits = limits
        self.same: dict[str, Any] = {}

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"torchkeep tree metadata: {message}", source=self.name)

    def decode(self, encoded: str) -> Any:
        """The tree of a JSON document ``{"version": 1, "tree": ...}``."""
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
        except (TypeError, ValueError, KeyError, IndexError, AttributeError,
                OverflowError) as e:
            if isinstance(e, CorruptCheckpointError):
                raise
            raise self.fail(f"bad {tag} node ({e})") from None

    def tensor_node(self, tag: str, body: Any, whole: dict[str, Any], depth: int) -> TensorRef:
        """A tensor reference, with its conj/neg bits, Python attributes and identity."""
        ref = self.resolve(body, whole)
        changes: dict[str, Any] = {}
        if tag == "$ndarray":
            changes["numpy"] = True
        if whole.get("conj") or whole.get("neg"):
            if ref.dtype.kind != "complex" and whole.get("conj"):
                raise self.fail("the conjugate bit is set on a non-complex tensor")
            changes.update(conj=bool(whole.get("conj")), neg=bool(whole.get("neg")))
        if "attrs" in whole:
            attrs = self.node(whole["attrs"], depth + 1)
            if not isinstance(attrs, dict) or not all(map(plain_attribute_name, attrs)):
                raise self.fail("tensor attributes must be plain attribute names")
            changes["attrs"] = attrs
        if changes:
            ref = ref.with_(**changes)
        if "id" in whole:
            if not isinstance(whole["id"], str):
                raise self.fail("a tensor id must be a string")
            self.same[whole["id"]] = ref
        return ref

    def pairs(self, body: Any, depth: int) -> list[tuple[Any, Any]]:
        if isinstance(body, dict):
            return [(k, self.node(v, depth + 1)) for k, v in body.items()]
        return [(_hashable(self.node(k, depth + 1)), self.node(v, depth + 1)) for k, v in body]

    def tagged(self, tag: str, body: Any, whole: dict[str, Any], depth: int) -> Any:
        if tag == "$dict":
            return dict(self.pairs(body, depth))
        if tag == "$counter":
            return Counter(dict(self.pairs(body, depth)))
        if tag == "$reduce":
            return self.reduced(body, whole, depth)
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
            if not isinstance(body, str):
                raise self.fail("$dtype must be a string")
            return dtypes.by_name(body)
        if tag == "$device":
            kind, _, index = str(body).partition(":")
            return Device(kind, int(index) if index else None)
        if tag in ("$tensor", "$ndarray"):
            return self.tensor_node(tag, body, whole, depth)
        if tag == "$same":
            if not isinstance(body, str) or body not in self.same:
                raise self.fail(f"$same refers to {shown(body)}, which comes nowhere before it")
            return self.same[body]
        if tag == "$ndbytes":
            import numpy as np

            dtype = dtypes.plain_numpy_dtype(whole["npdtype"])
            raw = base64.b64decode(body, validate=True)
            shape = tuple(int(s) for s in whole["shape"])
            if len(raw) != math.prod(shape) * dtype.itemsize:
                raise self.fail("numpy array bytes do not match its shape")
            return np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        if tag == "$npscalar":
            import numpy as np

            dtype = dtypes.plain_numpy_dtype(whole["npdtype"])
            raw = base64.b64decode(body, validate=True)
            if len(raw) != dtype.itemsize:
                raise self.fail("bad numpy scalar")
            return np.frombuffer(raw, dtype=dtype)[0]
        raise self.fail(f"unknown tag {shown(tag)}")

    def reduced(self, name: Any, whole: dict[str, Any], depth: int) -> Any:
        """A standard-library value (``{"$reduce": "datetime.date", "args": [...]}``), built
        by the same checked code the pickle reader uses for that global."""
        if name not in _REDUCED_NAMES:
            raise self.fail(f"$reduce of {str(name)[:60]!r}, which is not a value torchkeep "
                            "reads")
        entry = _DEFAULT_ALLOWLIST.entry(name)
        args = tuple(self.node(v, depth + 1) for v in whole.get("args", []))
        machine = _Checks(self)
        try:
            value = (entry.new if whole.get("new") else entry.call)(machine, args)
        except (TypeError, ValueError, OverflowError) as e:
            raise self.fail(f"bad {name} arguments ({e})") from None
        if "state" in whole:
            value = build(machine, value,  # type: ignore[arg-type]
                          self.node(whole["state"], depth + 1))
        return value


class _Checks:
    """What the allowlist's checked constructors ask of the reader running them."""

    def __init__(self, decoder: TreeDecoder) -> None:
        self.fail = decoder.fail
        self.allowlist = _DEFAULT_ALLOWLIST


_DEFAULT_ALLOWLIST = Allowlist()
_REDUCED_NAMES = frozenset(f"{t.__module__}.{t.__qualname__}" for t in REDUCED_TYPES)


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


class TreeEncoder:
    """Walks a tree once: its JSON skeleton out, tensor leaves collected with their paths.

    Each tensor leaf becomes ``{"$tensor": name}`` (numpy arrays ``{"$ndarray": name}``)
    and is listed in ``tensors`` as ``(name, TensorRef, ndarray or None)``; names are
    the ``/``-joined paths, made unique. The same tensor object reached twice yields
    the same node.
    """

    def __init__(self, describe: Describe | None, *, inline_arrays: bool = False) -> None:
        self.describe = describe
        #: numpy arrays go into the JSON itself (``$ndbytes``), not into the tensor list
        self.inline_arrays = inline_arrays
        self.path: list[Any] = []
        self.active: set[int] = set()
        self.tensors: list[tuple[str, TensorRef, Any]] = []  # (name, ref, ndarray|None)
        self.names: set[str] = set()
        self.nodes: dict[int, Any] = {}
        #: the object each tensor name came from (a torch.Tensor, an ndarray, a TensorRef)
        self.originals: dict[str, Any] = {}
        self._alive: list[Any] = []

    def fail(self, message: str) -> UnsupportedTypeError:
        return UnsupportedTypeError(f"{render_path(self.path)}: {message}")

    def unique_name(self) -> str:
        base = join_path(self.path) or "tensor"
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
        if type(obj) is Counter:
            return {"$counter": self.items(obj)}
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
        np = sys.modules.get("numpy")  # nothing is a numpy value unless numpy is loaded
        if np is not None and isinstance(obj, np.ndarray):
            return self.ndarray(obj)
        if isinstance(obj, REDUCED_TYPES):
            return self.reduced(obj)
        if isinstance(obj, PickledObject):
            raise self.fail(f"an inert {obj.qualname} record is saved only in the torch "
                            "formats (format='torch' or 'torch-legacy'), which name its global")
        if np is not None and isinstance(obj, np.generic):
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

    def reduced(self, obj: Any) -> Any:
        """``{"$reduce": "module.Name", "args": [...], "state": ...}`` from the value's own
        ``__reduce_ex__(2)`` (``"new": true`` where pickle would use NEWOBJ)."""
        func, args, state, newobj = reduction(obj, protocol=4)  # keeps a datetime's fold
        node: dict[str, Any] = {"$reduce": f"{func.__module__}.{func.__qualname__}"}
        if newobj:
            node["new"] = True
        self.path.append("<args>")
        node["args"] = [self.encode(a) for a in args]
        self.path.pop()
        if state is not None:
            self.path.append("<attributes>")
            node["state"] = self.encode(state)
            self.path.pop()
        return node

    def _repeat(self, original: Any) -> Any:
        """The node for an object already encoded: ``{"$same": name}`` (the first node
        gets an ``id``), so the reader gives back one object, as pickle would."""
        first = self.nodes.get(id(original))
        if first is None:
            return None
        name = first.get("$tensor", first.get("$ndarray"))
        first["id"] = name
        return {"$same": name}

    def tensor(self, ref: TensorRef, original: Any) -> Any:
        if ref.storage is None or ref.quantizer is not None or not ref.dtype.has_tensors:
            raise self.fail("this tensor kind cannot be saved as safetensors")
        repeat = self._repeat(original)
        if repeat is not None:
            return repeat
        name = self.unique_name()
        self.tensors.append((name, ref, None))
        self.originals[name] = original
        node: dict[str, Any] = {"$tensor": name}
        if ref.attrs:
            self.path.append("<attributes>")
            node["attrs"] = self.encode(dict(ref.attrs))
            self.path.pop()
        self.nodes[id(original)] = node
        self._alive.append(original)  # ids in self.nodes stay valid while encoding
        return node

    def ndarray(self, array: np.ndarray[Any, Any]) -> Any:
        import numpy as np

        if array.dtype.hasobject:
            raise self.fail("numpy arrays of Python objects cannot be saved")
        dtype = dtypes.from_numpy(array.dtype)
        if dtype is None or self.inline_arrays:
            if array.dtype.names is not None:
                raise self.fail("structured numpy arrays cannot be saved")
            data = np.ascontiguousarray(array)
            return {"$ndbytes": base64.b64encode(data.tobytes()).decode("ascii"),
                    "npdtype": array.dtype.str, "shape": list(array.shape)}
        repeat = self._repeat(array)
        if repeat is not None:
            return repeat
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")
                                    if array.dtype.byteorder == ">" else array.dtype)
        name = self.unique_name()
        ref = TensorRef(StorageRef(name, dtype, data.nbytes), dtype, 0, tuple(array.shape),
                        contiguous_strides(tuple(array.shape)))
        self.tensors.append((name, ref, data.reshape(-1).view(np.uint8)))
        node = {"$ndarray": name}
        self.nodes[id(array)] = node
        self._alive.append(array)
        return node


