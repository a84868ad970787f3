"""``torchkeep.inspect``: what a checkpoint holds, from its metadata only."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torchkeep.api import parse
from torchkeep.dtypes import DType
from torchkeep.errors import shown
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.tree import (
    Device,
    PickledObject,
    Size,
    Symbol,
    TensorInfo,
    join_path,
    walk_tree,
)
from torchkeep.unpickle import AllowSpec

__all__ = ["Inspection", "SharedRef", "ValueEntry", "inspect", "leaves"]


@dataclass(frozen=True, slots=True)
class ValueEntry:
    """A non-tensor leaf (a number, string, None, ...) as ``inspect`` lists it."""

    name: str
    path: tuple[Any, ...]
    repr: str
    type: str


@dataclass(slots=True)
class Inspection:
    """The whole report: format, writer facts, tensors, values and totals."""

    path: str
    format: str
    writer: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    values: list[ValueEntry] = field(default_factory=list)
    #: tensors and values together, in tree order
    entries: list[TensorInfo | ValueEntry] = field(default_factory=list)
    #: for a Lightning ``.ckpt``: its version, epoch, step and parts (lightning_facts)
    lightning: dict[str, Any] | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (a storage shared by several views counts once per view)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        """Elements of all tensors."""
        return sum(math.prod(t.shape) for t in self.tensors)

    def by_dtype(self) -> dict[str, dict[str, int]]:
        """``{dtype: {"tensors": n, "elements": n, "bytes": n}}``, largest first."""
        totals: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            row = totals.setdefault(t.dtype, {"tensors": 0, "elements": 0, "bytes": 0})
            row["tensors"] += 1
            row["elements"] += math.prod(t.shape)
            row["bytes"] += t.nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]["bytes"]))

    def to_json(self) -> dict[str, Any]:
        """The documented ``--json`` shape."""
        return {
            "path": self.path,
            "format": self.format,
            "writer": self.writer,
            "num_tensors": len(self.tensors),
            "total_bytes": self.total_bytes,
            "parameters": self.parameters,
            "by_dtype": self.by_dtype(),
            "tensors": [
                {"name": t.name, "path": list(t.path), "dtype": t.dtype, "shape": list(t.shape),
                 "nbytes": t.nbytes, "device": t.device, "layout": t.layout,
                 "requires_grad": t.requires_grad,
                 "parameter": t.parameter}
                for t in self.tensors
            ],
            "values": [{"name": v.name, "path": list(v.path), "repr": v.repr, "type": v.type}
                       for v in self.values],
            "lightning": self.lightning,
        }


def lightning_facts(tree: Any) -> dict[str, Any] | None:
    """What a Lightning checkpoint's tree says about itself (None for other trees): the
    Lightning version, epoch, global step, how many tensors its ``state_dict`` holds, how
    many optimizers and schedulers, the callbacks with state, the hyper-parameters."""
    if not isinstance(tree, dict) or "pytorch-lightning_version" not in tree:
        return None
    state = tree.get("state_dict")
    hyper = tree.get("hyper_parameters")
    callbacks = tree.get("callbacks")
    return {
        "version": _short_repr(tree["pytorch-lightning_version"]).strip("'"),
        "epoch": tree.get("epoch") if type(tree.get("epoch")) is int else None,
        "global_step": tree.get("global_step") if type(tree.get("global_step")) is int else None,
        "state_dict_tensors": sum(1 for _, leaf in leaves(state) if TensorInfo.of((), leaf))
        if isinstance(state, dict) else 0,
        "optimizers": len(tree.get("optimizer_states") or ()),
        "lr_schedulers": len(tree.get("lr_schedulers") or ()),
        "callbacks": [str(k) for k in callbacks] if isinstance(callbacks, dict) else [],
        "hyper_parameters": {str(k): _short_repr(v) for k, v in hyper.items()}
        if isinstance(hyper, dict) else {},
    }


class SharedRef:
    """A container already listed at another path (pickles share objects by reference)."""

    __slots__ = ("path",)

    def __init__(self, path: tuple[Any, ...]) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"(the same object as {join_path(self.path) or 'the root'})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SharedRef) and join_path(other.path) == join_path(self.path)

    def __hash__(self) -> int:
        return hash(join_path(self.path))


def leaves(tree: Any, *, limits: Limits = DEFAULT_LIMITS) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, leaf)`` for every non-container value of ``tree`` (tensors included), in
    tree order; empty containers are leaves too. A container reached again (a shared
    sub-tree, or a cycle) is not walked twice: it appears as a SharedRef to its first path.
    Nesting deeper than ``limits.max_depth`` raises LimitExceededError.
    """
    return walk_tree(tree, limits=limits, repeat=lambda path, first, cycle: SharedRef(first))


def _is_ndarray(value: Any) -> bool:
    # numpy stays unimported on the CLI's paths (0.1-0.2 s of a 0.3 s inspect): nothing is an
    # ndarray unless numpy has been loaded
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _short_repr(value: Any, limit: int = 80) -> str:
    if isinstance(value, DType):
        text = str(value)
    elif isinstance(value, (Size, Device, Symbol)):
        text = repr(value)
    elif _is_ndarray(value):
        text = f"ndarray({value.dtype}, shape={list(value.shape)})"
    elif isinstance(value, PickledObject):
        text = f"<{value.qualname}>"
    elif type(value) in (str, int, float, bool, bytes, complex, type(None)):
        text = repr(value)
    else:  # sets and the like: a bounded repr (a shared-reference bomb's is exponential)
        text = shown(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entries(tree: Any, limits: Limits) -> list[TensorInfo | ValueEntry]:
    entries: list[TensorInfo | ValueEntry] = []
    for path, leaf in leaves(tree, limits=limits):
        info = TensorInfo.of(path, leaf)
        if info is not None:
            entries.append(info)
        elif _is_ndarray(leaf) and leaf.dtype.kind in "biufc":
            entries.append(TensorInfo(join_path(path), path, f"numpy.{leaf.dtype}",
                                      leaf.shape, leaf.nbytes, "cpu"))
        else:
            entries.append(ValueEntry(join_path(path), path, _short_repr(leaf),
                                      type(leaf).__name__))
    return entries


def inspect(f: Any, *, allow: Iterable[AllowSpec] = (),
            limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """What ``f`` holds: format, writer facts, every tensor's dtype/shape/bytes, every
    other value, read from metadata only (no tensor bytes, no torch)."""
    parsed = parse(f, allow=allow, limits=limits)
    try:
        entries = _entries(parsed.tree, limits)
        writer = {k: v for k, v in parsed.info.items() if v is not None}
        metadata = writer.get("metadata")
        if isinstance(metadata, dict) and "torchkeep" in metadata:  # the tree itself: long
            writer["metadata"] = {**metadata,
                                  "torchkeep": f"<tree, {len(metadata['torchkeep'])} bytes>"}
        writer.setdefault("byteorder", parsed.byteorder)
        return Inspection(parsed.source.name, parsed.format, writer,
                          [e for e in entries if isinstance(e, TensorInfo)],
                          [e for e in entries if isinstance(e, ValueEntry)], entries,
                          lightning_facts(parsed.tree))
    finally:
        parsed.close()
