"""What each rank runs in the distributed tests (forked by torchkeep.distributed.launch).

Module-level functions ``fn(rank, world, *args)``; they return plain data (tensors are
fine: results travel through a pipe).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import torchkeep
from torchkeep.distributed.state import PerRank

FULL = StateDictOptions(full_state_dict=True)


def build(world: int, kind: str, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model with odd sizes (uneven shards), wrapped for ``kind``, and AdamW."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 23), torch.nn.ReLU(), torch.nn.Linear(23, 5))
    if kind == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int,
          start: int = 0) -> list[float]:
    """``steps`` steps on data that depends on (step, rank); the losses."""
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(8, 13, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state as full tensors (collective)."""
    return {"model": get_model_state_dict(model, options=FULL),
            "optim": get_optimizer_state_dict(model, opt, options=FULL)}


def manager_save(rank: int, world: int, root: str, kind: str, steps: int) -> dict[str, Any]:
    """Train and save every step with the manager; the state after the last step."""
    model, opt = build(world, kind)
    sampler = torchkeep.ResumableSampler(40, seed=3, rank=rank, world_size=world)
    rng = torchkeep.RNGState()
    torch.manual_seed(100 + rank)
    state = {"model": model, "optimizer": opt, "sampler": sampler, "rng": rng,
             "mine": PerRank({"rank": rank, "seen": [rank] * 3}), "epoch": 7}
    it = iter(sampler)
    with torchkeep.CheckpointManager(root, keep_last=2) as mgr:
        for step in range(steps):
            train(model, opt, rank, 1, step)
            next(it)
            mgr.save(step, state, metrics={"loss": float(step)})
        steps_seen = mgr.all_steps()
    return {**full_state(model, opt), "steps": steps_seen, "torch_rng": torch.get_rng_state(),
            "next": next(it)}


def manager_restore(rank: int, world: int, root: str, kind: str,
                    with_mine: bool = True) -> dict[str, Any]:
    """Restore the latest step into a fresh (differently seeded) model."""
    model, opt = build(world, kind, seed=99)
    train(model, opt, rank, 1, 50)  # optimizer state exists, with other values
    sampler = torchkeep.ResumableSampler(40, seed=3, rank=rank, world_size=world)
    rng = torchkeep.RNGState()
    mine = PerRank(None)
    state = {"model": model, "optimizer": opt, "sampler": sampler, "rng": rng, "epoch": 0}
    if with_mine:
        state["mine"] = mine
    with torchkeep.CheckpointManager(root) as mgr:
        latest = mgr.latest_step()
        try:
            step = mgr.restore(state)
            error = None
        except torchkeep.TorchkeepError as e:
            step, error = None, f"{type(e).__name__}: {e}"
    result = {"latest": latest, "step": step, "error": error, "epoch": state["epoch"],
              "mine": mine.obj, "next": next(iter(sampler)) if error is None else None,
              "torch_rng": torch.get_rng_state()}
    if error is None:
        result.update(full_state(model, opt))
    return result


def die_in_write(rank: int, world: int, root: str) -> Any:
    """Save one step, then die (rank 1) in the middle of writing the next."""
    from torchkeep.distributed import writer

    model, opt = build(world, "fsdp2")
    state = {"model": model, "optimizer": opt}
    with torchkeep.CheckpointManager(root) as mgr:
        mgr.save(1, state)
        if rank == 1:
            original = writer.tensor_bytes

            def dying(t: torch.Tensor) -> Any:
                os._exit(9)

            writer.tensor_bytes = dying  # type: ignore[assignment]
            del original
        train(model, opt, rank, 1)
        mgr.save(2, state)
    return "survived"


def barrier_ok(rank: int, world: int) -> bool:
    dist.barrier()
    return True
