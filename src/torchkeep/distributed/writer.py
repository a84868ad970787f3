"""StepWriter: DCP's StorageWriter for a torchkeep step directory.

Every rank writes raw, 64-byte aligned tensor bytes into its own data file of one
temporary step directory and fsyncs it; values travel to the coordinator as JSON inside
the write results (no pickle on disk). Only after every rank's writes succeeded does DCP
call ``finish`` on the coordinator, which writes the manifest and the commit marker and
renames the directory into place: a rank killed at any moment leaves no visible step.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import secrets
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

import torchkeep
from torchkeep.distributed.planners import PlainValue, safe_torch_load
from torchkeep.errors import StorageError, UnsupportedTypeError
from torchkeep.formats.manifest import (
    ALIGNMENT,
    FORMAT_NAME,
    MANIFEST_NAME,
    MARKER_NAME,
    SHARDED_VERSION,
    checksum,
    data_file_name,
)
from torchkeep.formats.treejson import TreeEncoder
from torchkeep.storage.atomic import TMP_MARKER
from torchkeep.storage.checksums import Overlapped
from torchkeep.storage.filesystem import FileSystem, open_filesystem
from torchkeep.tensors import from_torch_dtype

__all__ = ["StepWriter", "encode_value", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's values, C-contiguous on the CPU, as bytes (a view when already so)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if not t.numel():
        return memoryview(b"")
    array: Any = t.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def encode_value(value: Any, fqn: str) -> Any:
    """The JSON form of one non-tensor item (a number, a string, param_groups...)."""
    if isinstance(value, io.BytesIO):  # a stock planner torch.save-d it: read it back safely
        value = safe_torch_load(io.BytesIO(value.getvalue()))
    encoder = TreeEncoder(None, inline_arrays=True)
    try:
        skeleton = encoder.encode(value)
    except UnsupportedTypeError as e:
        raise UnsupportedTypeError(f"{fqn}: {e}") from None
    if encoder.tensors:
        raise UnsupportedTypeError(f"{fqn}: a value item holds a tensor")
    return skeleton


class StepWriter(StorageWriter):
    """Writes a checkpoint as a torchkeep step directory; use it with ``dcp.save``.

    ``path`` is the step directory to create; it must not exist. ``info`` adds fields to
    the manifest (the manager records step, metrics and per-rank sections there).
    ``incremental`` (the manager's ShardedDiff, manager/incremental.py) makes an
    incremental step: each rank writes only its changed chunks, into the run's shared
    ``chunks/`` folder.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, fsync: bool = True,
                 info: dict[str, Any] | None = None, incremental: Any = None) -> None:
        super().__init__()
        self.fsync = fsync
        self.info = dict(info or {})
        self.incremental = incremental
        self.fs: FileSystem | None = None
        self.path: str | None = None
        self.is_coordinator = False
        self.rank = 0
        self.tmp: str | None = None
        if path is not None:
            self.reset(path)

    # -- DCP's protocol ----------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.fs, self.path = open_filesystem(checkpoint_id)
            if not self.fs.atomic_rename:  # the cross-rank commit is a directory rename
                raise StorageError("sharded steps need a file system with atomic renames "
                                   "(a local or shared one); object stores are not "
                                   "supported for them yet", source=os.fspath(checkpoint_id))
        self.tmp = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)

    def storage_meta(self) -> None:
        return None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        fs, path = self._where()
        if fs.exists(path):
            raise StorageError("the step directory exists already; a committed step is "
                               "never overwritten", source=fs.describe(path))
        parent, name = os.path.split(path.rstrip("/"))
        fs.makedirs(parent or ".")
        tmp = fs.join(parent or ".", f".{name}{TMP_MARKER}{secrets.token_hex(4)}")
        fs.makedirs(tmp)
        self.tmp = tmp
        return [dataclasses.replace(plan, storage_data={"dir": tmp,
                                                        "file": data_file_name(i)})
                for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fs, _ = self._where()
        where = plan.storage_data
        if not isinstance(where, dict) or "dir" not in where:
            raise StorageError("the save plan carries no step directory (a planner or a "
                               "torch version StepWriter does not know)")
        self.tmp = where["dir"]
        file_name = where["file"]
        results: list[WriteResult] = []
        tensors = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                value = data.value if isinstance(data, PlainValue) else data
                results.append(WriteResult(item.index, 0,
                                           {"value": encode_value(value, item.index.fqn)}))
            else:
                assert isinstance(data, torch.Tensor)
                tensors.append((item, data))

        def produce(write: Any) -> None:
            offset = 0
            for item, tensor in tensors:
                raw = tensor_bytes(tensor)
                with Overlapped(checksum, raw) as digest:  # hashed while it is written
                    pad = -offset % ALIGNMENT
                    if pad:
                        write(b"\0" * pad)
                        offset += pad
                    if raw.nbytes:
                        write(raw)
                results.append(WriteResult(item.index, raw.nbytes, {
                    "file": file_name, "offset": offset, "nbytes": raw.nbytes,
                    "xxh3": digest.result()}))
                offset += raw.nbytes

        if self.incremental is not None:
            self._write_incremental(fs, tensors, results)
        elif tensors or self.rank == 0:
            fs.write_file(fs.join(where["dir"], file_name), produce, fsync=self.fsync)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def _write_incremental(self, fs: FileSystem, tensors: list[tuple[Any, torch.Tensor]],
                           results: list[WriteResult]) -> None:
        _, path = self._where()
        new = []
        for item, tensor in tensors:
            offsets = list(item.tensor_data.chunk.offsets) if item.tensor_data else \
                [0] * tensor.dim()
            pieces, fresh = self.incremental.pieces(
                item.index.fqn, offsets, tensor, lambda t=tensor: tensor_bytes(t))
            new += fresh
            results.append(WriteResult(item.index, sum(p["nbytes"] for p in pieces),
                                       {"pieces": pieces}))
        self.incremental.write(fs, path, new, fsync=self.fsync)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        fs, path = self._where()
        if self.tmp is None:
            raise StorageError("finish before prepare_global_plan", source=fs.describe(path))
        manifest = build_manifest(metadata, results, self.info)
        encoded = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode("utf-8")
        fs.write_file(fs.join(self.tmp, MANIFEST_NAME), lambda w: w(encoded), fsync=self.fsync)
        marker = json.dumps({"step": manifest.get("step"),
                             "manifest_xxh3": checksum(encoded)}).encode()
        fs.write_file(fs.join(self.tmp, MARKER_NAME), lambda w: w(marker), fsync=self.fsync)
        if self.fsync:
            fs.fsync_dir(self.tmp)
        fs.rename(self.tmp, path)
        if self.fsync:
            fs.fsync_dir(os.path.dirname(path.rstrip("/")) or ".")
        self.tmp = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def _where(self) -> tuple[FileSystem, str]:
        if self.fs is None or self.path is None:
            raise StorageError("StepWriter has no step directory: pass one, or "
                               "checkpoint_id= to dcp.save")
        return self.fs, self.path


def build_manifest(metadata: Metadata, results: list[list[WriteResult]],
                   info: dict[str, Any]) -> dict[str, Any]:
    """Manifest version 2 from DCP's global metadata and every rank's write results."""
    written: dict[MetadataIndex, Any] = {r.index: r.storage_data for rank in results
                                         for r in rank}
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    counts = {"written_bytes": 0, "shared_bytes": 0}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            chunks = []
            for chunk in md.chunks:
                where = written[MetadataIndex(fqn, chunk.offsets)]
                if "pieces" in where:  # an incremental step: the chunk cut into pieces
                    for piece in where["pieces"]:
                        fresh = piece.pop("new", False)
                        counts["written_bytes" if fresh else "shared_bytes"] += \
                            piece["nbytes"]
                        chunks.append(piece)
                    continue
                chunks.append({"offsets": list(chunk.offsets), "shape": list(chunk.sizes),
                               **where})
            tensors[fqn] = {"dtype": from_torch_dtype(md.properties.dtype).name,
                            "shape": list(md.size), "chunks": chunks}
        else:
            values[fqn] = written[MetadataIndex(fqn)]["value"]
    if isinstance(info.get("incremental"), dict):
        info = {**info, "incremental": {**info["incremental"], **counts}}
    planner_data = metadata.planner_data or {}
    paths = {fqn: list(planner_data.get(fqn, (fqn,))) for fqn in metadata.state_dict_metadata}
    return {
        "format": FORMAT_NAME,
        "version": SHARDED_VERSION,
        "step": info.get("step"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": info.get("metrics") or {},
        "torch_version": torch.__version__,
        "torchkeep_version": torchkeep.__version__,
        **{k: v for k, v in info.items() if k not in ("step", "metrics")},
        "paths": paths,
        "values": values,
        "tensors": tensors,
    }
