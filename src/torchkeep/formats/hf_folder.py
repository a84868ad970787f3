"""Hugging Face model folders read as one checkpoint.

::

    model/                                  save_pretrained(..., max_shard_size=...)
        config.json
        model.safetensors.index.json        {"metadata": {...}, "weight_map": {name: file}}
        model-00001-of-00002.safetensors    the shards: safetensors files, or
        model-00002-of-00002.safetensors    pytorch_model-0000N-of-0000M.bin (torch.save)

A folder (or its ``*.index.json`` itself) becomes the flat state dict ``{name: tensor}``
in the index's order, with every shard parsed by its own reader (``.bin`` shards by the
restricted interpreter). A folder without an index but with one ``model.safetensors`` or
``pytorch_model.bin`` is that file. Shard names must be plain file names inside the
folder; every name the index lists must be in its shard, and no tensor may be in two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torchkeep.errors import CorruptCheckpointError, TorchkeepError, shown
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.filesystem import FileSystem
from torchkeep.storage.source import Source
from torchkeep.tree import SparseRef, StorageRef, StorageView, TensorRef, map_tree
from torchkeep.unpickle import Allowlist

__all__ = ["INDEX_SUFFIX", "HFFiles", "closed_on_failure", "hf_files", "index_folder",
           "read_hf_index", "rekeyed", "shard_names", "weights_name"]

INDEX_SUFFIX = ".index.json"
#: what ``save_pretrained`` writes, in the order transformers prefers them
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
_MAX_INDEX_BYTES = 64 << 20


def weights_name(names: list[str]) -> str | None:
    """The weights file among a Hugging Face model folder's ``names``: its index (the
    safetensors one first), else its single weights file, else None."""
    present = set(names)
    for name in (*_INDEX_NAMES, *_SINGLE_NAMES):
        if name in present:
            return name
    others = sorted(n for n in present if n.endswith((".safetensors" + INDEX_SUFFIX,
                                                       ".bin" + INDEX_SUFFIX)))
    return others[0] if len(others) == 1 else None


def index_folder(index_path: str) -> str:
    """The folder an index's shard names are relative to."""
    return posixpath.dirname(index_path) if "/" in index_path else "."


def _index(fs: FileSystem, index_path: str) -> dict[str, str]:
    """The index's weight map, checked: names to plain shard file names."""
    if fs.size(index_path) > _MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"the index is over {_MAX_INDEX_BYTES} bytes")
    try:
        document = json.loads(fs.read_bytes(index_path))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"the index is not JSON: {e}") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError("the index has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or shard in (".", "..") or \
                posixpath.basename(shard) != shard or "\\" in shard:
            raise CorruptCheckpointError(
                f"the index puts {shown(name)} in {shown(shard)}, which is not a file name "
                "inside the folder")
    return weight_map


def shard_names(fs: FileSystem, index_path: str) -> list[str]:
    """The distinct shard files an index names, in first-use order."""
    return list(dict.fromkeys(_index(fs, index_path).values()))


@dataclasses.dataclass(frozen=True)
class HFFiles:
    """The files of a Hugging Face checkpoint: ``kind`` is ``index`` (``root`` is the
    index), ``single`` (``root`` is the weights file) or ``training`` (``root`` is a
    Trainer or Accelerate folder); ``files`` are those holding tensors or pickles."""

    fs: FileSystem
    kind: str
    root: str
    files: list[str]


def hf_files(f: Any) -> HFFiles | None:
    """The files of a Hugging Face model folder, weights index, Trainer checkpoint or
    Accelerate state folder (a local path or an fsspec URL); None for anything else. A
    broken index raises CorruptCheckpointError."""
    import os

    from torchkeep.formats.detect import listing_format
    from torchkeep.storage.filesystem import open_filesystem

    if not isinstance(f, (str, os.PathLike)):
        return None
    fs, path = open_filesystem(f)
    if str(os.fspath(f)).endswith(INDEX_SUFFIX):
        weights = path
    elif not fs.isdir(path):
        return None
    else:
        names = fs.listdir(path)
        kind = listing_format(names)
        if kind == "hf-training":
            from torchkeep.formats.hf_training import training_files

            files = [file for part in training_files(fs, path, names).values()
                     for file in part if not file.endswith(".json")]
            return HFFiles(fs, "training", path, files)
        name = weights_name(names) if kind == "hf" else None
        if name is None:
            return None
        weights = fs.join(path, name)
    if not weights.endswith(INDEX_SUFFIX):
        return HFFiles(fs, "single", weights, [weights])
    return HFFiles(fs, "index", weights, [fs.join(index_folder(weights), name)
                                          for name in shard_names(fs, weights)])


def _rekeyed(ref: StorageRef, prefix: str, seen: dict[int, StorageRef]) -> StorageRef:
    hit = seen.get(id(ref))
    if hit is None:
        base = _rekeyed(ref.base, prefix, seen) if ref.base is not None else None
        hit = dataclasses.replace(ref, key=prefix + ref.key, base=base)
        seen[id(ref)] = hit
    return hit


def rekeyed(parsed: Parsed, prefix: str, limits: Limits = DEFAULT_LIMITS,
            ) -> tuple[Any, dict[str, Record]]:
    """``parsed``'s tree and records with every storage key prefixed by ``prefix`` (and
    every record pointing at its own source), so several files' records live in one
    Parsed without colliding."""
    seen: dict[int, StorageRef] = {}

    def leaf(value: Any) -> Any:
        if isinstance(value, TensorRef):
            storage = _rekeyed(value.storage, prefix, seen) if value.storage is not None \
                else None
            quantizer = value.quantizer
            if quantizer is not None:
                quantizer = tuple(leaf(q) if isinstance(q, TensorRef) else q
                                  for q in quantizer)
            return dataclasses.replace(value, storage=storage, quantizer=quantizer)
        if isinstance(value, SparseRef):
            return dataclasses.replace(value, parts=tuple(leaf(p) for p in value.parts))
        if isinstance(value, StorageView):
            return StorageView(_rekeyed(value.storage, prefix, seen), value.dtype)
        return value

    tree = map_tree(parsed.tree, leaf, limits=limits)
    records = {prefix + key: record if record.source is not None else
               dataclasses.replace(record, source=parsed.source)
               for key, record in parsed.records.items()}
    return tree, records


@contextlib.contextmanager
def closed_on_failure(sources: list[Source], name: str) -> Iterator[None]:
    """Close every source in ``sources`` (as it is then) if the block raises; a torchkeep
    error is told it came from ``name``."""
    try:
        yield
    except BaseException as e:
        for source in sources:
            source.close()
        if isinstance(e, TorchkeepError):
            e.with_source(name)
        raise


def read_hf_index(fs: FileSystem, index_path: str, *, allowlist: Allowlist | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> Parsed:
    """Parse a sharded Hugging Face checkpoint from its index (no tensor bytes read)."""
    from torchkeep.api import parse_source

    folder = index_folder(index_path)
    weight_map = _index(fs, index_path)
    allowlist = allowlist or Allowlist()
    shards: dict[str, Parsed] = {}
    sources: list[Source] = []
    with closed_on_failure(sources, index_path):
        for shard in dict.fromkeys(weight_map.values()):
            path = fs.join(folder, shard)
            if not fs.exists(path):
                raise CorruptCheckpointError(f"shard {shard} named by the index is missing")
            source = fs.source(path)
            sources.append(source)
            shards[shard] = parse_source(source, allowlist=allowlist, limits=limits)
            sources.extend(shards[shard].extra_sources)
        index_source = fs.source(index_path)
        sources.insert(0, index_source)
        return _combine(weight_map, shards, index_source, sources[1:])


def _flat(tree: Any, shard: str) -> dict[str, TensorRef]:
    if isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict) and \
            not any(isinstance(v, TensorRef) for v in tree.values()):
        tree = tree["state_dict"]  # some .bin shards wrap the state dict
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"shard {shard} does not hold a state dict")
    flat = {}
    for name, value in tree.items():
        if not isinstance(name, str) or not isinstance(value, TensorRef):
            raise CorruptCheckpointError(
                f"shard {shard} holds {shown(name)}: {type(value).__name__}, not a tensor")
        flat[name] = value
    return flat


def _combine(weight_map: dict[str, str], shards: dict[str, Parsed], index: Source,
             sources: list[Source]) -> Parsed:
    records: dict[str, Record] = {}
    tensors: dict[str, TensorRef] = {}
    where: dict[str, str] = {}
    byteorders = {p.byteorder for p in shards.values()}
    if len(byteorders) > 1:
        raise CorruptCheckpointError("the shards store their bytes in different byte orders")
    for shard, parsed in shards.items():
        tree, shard_records = rekeyed(parsed, f"{shard}:")
        for name, ref in _flat(tree, shard).items():
            if name in where:
                raise CorruptCheckpointError(
                    f"tensor {shown(name)} is in both {where[name]} and {shard}")
            where[name] = shard
            tensors[name] = ref
        records.update(shard_records)
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            found = f"it is in {where[name]}" if name in where else "no shard holds it"
            raise CorruptCheckpointError(
                f"the index puts {shown(name)} in {shard}, but {found}")
    order = [*weight_map, *(n for n in tensors if n not in weight_map)]
    tree = OrderedDict((name, tensors[name]) for name in order)
    formats = sorted({p.format for p in shards.values()})
    info: dict[str, Any] = {"shards": len(shards), "shard_format": ", ".join(formats)}
    return Parsed("hf-index", tree, index, records, byteorder=byteorders.pop(), info=info,
                  extra_sources=sources)
