"""``torchkeep.convert``: any readable checkpoint to any writable format, without torch.

Tensor bytes go from a memory map of the source straight to the destination; a ``dtype``
cast produces one tensor's copy at a time. Hugging Face style sharding writes
``<stem>-00001-of-0000N<suffix>`` files and ``<name>.index.json``, one shard at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchkeep import dtypes
from torchkeep.api import DEFAULT_SAVE, Describer, SaveOptions, parse, resolve_format, write_tree
from torchkeep.arrays import tensor_to_numpy
from torchkeep.dtypes import DType
from torchkeep.errors import UnsupportedTypeError
from torchkeep.formats.loader import StorageLoader
from torchkeep.formats.parsed import Parsed
from torchkeep.formats.treejson import contiguous_strides
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.atomic import write_atomically
from torchkeep.storage.remote import is_url
from torchkeep.tree import StorageRef, TensorRef, iter_tensors, join_path, map_tree

__all__ = ["ConversionResult", "convert", "parse_size", "select"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``"1024"`` -> 1024."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MiB, 1000000)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


@dataclass(slots=True)
class ConversionResult:
    """What convert wrote."""

    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    cast: int = 0
    index: str | None = None


def select(tree: Any, key: str) -> Any:
    """The sub-tree at ``key`` (``/``-separated path of keys, matched by ``str(key)``)."""
    node = tree
    for part in key.split("/"):
        if isinstance(node, dict):
            matches = [k for k in node if str(k) == part]
            if not matches:
                raise KeyError(f"--select {key!r}: no key {part!r} (keys: "
                               + ", ".join(map(str, list(node)[:20])) + ")")
            node = node[matches[0]]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(f"--select {key!r}: {part!r} is not inside a container")
    return node


class _Placeholders:
    """Serves the bytes of a parsed file's storages, and of cast copies, to the writers."""

    def __init__(self, parsed: Parsed, describer: Describer) -> None:
        self.loader = StorageLoader(parsed)
        self.describer = describer

    def original(self, ref: StorageRef) -> Any:
        return self.loader.view_bytes(ref, ref.dtype.swap_unit).data

    def register_tree(self, tree: Any, cast: DType | None, limits: Limits) -> tuple[Any, int]:
        """Route every storage of ``tree`` to this source; with ``cast``, replace floating
        tensors by contiguous cast copies (made one at a time, when written)."""
        replaced: dict[int, TensorRef] = {}
        for _, leaf in iter_tensors(tree, limits=limits):
            for ref in _storages_of(leaf):
                self.describer.register(ref, self.original)
            if cast is not None and isinstance(leaf, TensorRef) \
                    and leaf.dtype.is_floating_point and leaf.dtype is not cast \
                    and id(leaf) not in replaced:
                replaced[id(leaf)] = self._cast(leaf, cast)
        if not replaced:
            return tree, 0
        return (map_tree(tree, lambda leaf: replaced.get(id(leaf), leaf), limits=limits),
                len(replaced))

    def _cast(self, ref: TensorRef, target: DType) -> TensorRef:
        storage = StorageRef(f"cast:{id(ref)}", target, ref.numel * target.itemsize)

        def produce(_: StorageRef, ref: TensorRef = ref) -> Any:
            values = tensor_to_numpy(self.loader, ref)
            return np.ascontiguousarray(values.astype(target.numpy)).view(np.uint8).data

        self.describer.register(storage, produce)
        return TensorRef(storage, target, 0, ref.shape, contiguous_strides(ref.shape),
                         requires_grad=ref.requires_grad, parameter=ref.parameter)


def _storages_of(leaf: Any) -> list[StorageRef]:
    if isinstance(leaf, TensorRef):
        return [leaf.storage] if leaf.storage is not None else []
    parts = getattr(leaf, "parts", ())
    return [p.storage for p in parts if isinstance(p, TensorRef) and p.storage is not None]


def convert(
    src: Any,
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    select_key: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    options: SaveOptions = DEFAULT_SAVE,
    limits: Limits = DEFAULT_LIMITS,
    progress: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Convert ``src`` (any readable checkpoint) to ``dst`` (format from ``to`` or its
    suffix). ``select_key`` keeps a sub-tree; ``dtype`` casts floating tensors;
    ``max_shard_bytes`` writes Hugging Face style shards plus an index."""
    target = dtypes.by_name(dtype) if dtype else None
    if target is not None and not target.is_floating_point:
        raise ValueError(f"--dtype must be a floating dtype, got {dtype}")
    parsed = parse(src, limits=limits)
    try:
        tree = parsed.tree
        if select_key:
            tree = select(tree, select_key)
        describer = Describer()
        describer.on_bytes = progress
        placeholders = _Placeholders(parsed, describer)
        tree, cast = placeholders.register_tree(tree, target, limits)
        fmt = resolve_format(dst, to)
        remote = is_url(dst)
        folder = os.path.dirname(os.fspath(dst))
        if folder and not remote:
            os.makedirs(folder, exist_ok=True)
        result = ConversionResult(cast=cast)
        tensors = list(iter_tensors(tree, limits=limits))
        result.tensors = len(tensors)
        if max_shard_bytes is None:
            write_tree(tree, dst, fmt, describer, options)
            result.files.append(os.fspath(dst))
        elif remote:
            raise ValueError("max_shard_bytes writes local files only")
        else:
            _write_shards(tree, tensors, os.fspath(dst), fmt, describer, options,
                          max_shard_bytes, result)
        result.bytes = sum(_size(f) for f in result.files)
        return result
    finally:
        parsed.close()


def _shard_names(dst: str, count: int) -> list[str]:
    folder, base = os.path.split(dst)
    stem, dot, suffix = base.partition(".")
    return [os.path.join(folder, f"{stem}-{i:05d}-of-{count:05d}{dot}{suffix}")
            for i in range(1, count + 1)]


def _write_shards(tree: Any, tensors: list[tuple[tuple[Any, ...], Any]], dst: str, fmt: str,
                  describer: Describer, options: SaveOptions, max_bytes: int,
                  result: ConversionResult) -> None:
    if max_bytes < 1:
        raise ValueError("--max-shard-size must be positive")
    non_tensors = [path for path, _ in _non_tensor_leaves(tree)]
    if non_tensors:
        raise UnsupportedTypeError(
            "sharding writes a flat mapping of tensors (a state dict); this tree also holds "
            f"{join_path(non_tensors[0]) or 'values'}: use --select to pick the state dict"
        )
    groups: list[list[tuple[str, Any]]] = [[]]
    size = 0
    seen: set[int] = set()
    for path, leaf in tensors:
        name = join_path(path)
        nbytes = leaf.nbytes if isinstance(leaf, TensorRef) else 0
        if id(leaf) in seen:
            continue
        seen.add(id(leaf))
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, leaf))
        size += nbytes
    names = _shard_names(dst, len(groups))
    weight_map: dict[str, str] = {}
    total = 0
    for shard_name, group in zip(names, groups, strict=True):
        shard = dict(group)
        write_tree(shard, shard_name, fmt, describer, options)
        result.files.append(shard_name)
        for name, leaf in group:
            weight_map[name] = os.path.basename(shard_name)
            total += leaf.nbytes if isinstance(leaf, TensorRef) else 0
    index_path = dst + ".index.json"
    document = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                          indent=2).encode()
    write_atomically(index_path, lambda w: w(document), fsync=options.durable)
    result.index = index_path


def _non_tensor_leaves(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
    from torchkeep.summary import leaves

    found = []
    for path, leaf in leaves(tree):
        if not isinstance(leaf, TensorRef):
            found.append((path, leaf))
    return found


def _size(path: str) -> int:
    if is_url(path):
        from torchkeep.storage.remote import url_filesystem

        fs, inner = url_filesystem(path)
        return int(fs.size(inner))
    return os.path.getsize(path)

