"""What each rank runs in bench/distributed.py (forked by torchkeep.distributed.launch)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor


def make_state(kind: str, world: int) -> dict[str, Any]:
    """``model``: 16 weight matrices of 4096x1024 fp32 (256 MiB), sharded by rows;
    ``small``: 2000 tensors of 64x16 fp32 (8 MiB), sharded by rows; plus a few values."""
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 1024)] * 16 if kind == "model" else [(64, 16)] * 2000
    state: dict[str, Any] = {"step": 3, "lr": 0.001}
    for i, shape in enumerate(shapes):
        # each rank makes only its own shard's worth of random bytes quickly: same values
        # on every rank (same generator), then distribute (no communication for Shard)
        full = torch.empty(shape).uniform_(generator=g)
        state[f"w{i}"] = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    return state


def blank_like(state: dict[str, Any]) -> dict[str, Any]:
    """The same structure with zeroed tensors (what a load fills)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        out[k] = torch.zeros_like(v) if isinstance(v, torch.Tensor) else type(v)()
    return out


def timed(rank: int, world: int, op: str, kind: str, path: str) -> dict[str, Any]:
    """Run ``op`` once on every rank; the slowest rank's wall time is the op's time."""
    import torch.distributed.checkpoint as dcp

    import torchkeep.distributed as tkd

    state = make_state(kind, world)
    if op.endswith("load"):
        target = blank_like(state)
    # resolved before the clock starts: importing dcp above imported all of DCP, while
    # torchkeep.distributed imports its modules on first use (about 30 ms, once per
    # process, which a training process pays at its first checkpoint, not at each)
    tk_save, tk_load = tkd.save, tkd.load
    dist.barrier()
    started = time.perf_counter()
    if op == "dcp_save":
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    elif op == "save":
        tk_save(state, path)
    elif op == "dcp_load":
        dcp.load(target, storage_reader=dcp.FileSystemReader(path))
    elif op == "load":
        tk_load(target, path)
    else:
        raise ValueError(op)
    elapsed = time.perf_counter() - started
    box: list[Any] = [None] * world
    dist.all_gather_object(box, elapsed)
    if op.endswith("load"):  # the load is checked, outside the timing
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and not torch.equal(v.to_local(),
                                                               target[k].to_local()):
                raise AssertionError(f"{op}: {k} differs")
    return {"seconds": max(box), "pid": os.getpid()}
