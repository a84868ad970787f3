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
from torchkeep import PerRank

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
    elif kind == "hsdp":  # replicated across 2 groups, sharded within each
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
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


def coordinator_dies_before_rename(rank: int, world: int, root: str) -> Any:
    """Save step 1; rank 0 dies in the commit of step 2 after writing the manifest."""
    from torchkeep.distributed import writer

    model, opt = build(world, "fsdp2")
    state = {"model": model, "optimizer": opt}
    with torchkeep.CheckpointManager(root) as mgr:
        mgr.save(1, state)
        if rank == 0:
            def dying(*args: Any, **kwargs: Any) -> Any:
                os._exit(9)

            writer.StepWriter.finish = dying  # type: ignore[method-assign]
        mgr.save(2, state)
    return "survived"


def fail_in_write(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 1's writes fail (a full disk): what every rank sees, then a save that works."""
    from torchkeep.distributed import writer
    from torchkeep.errors import StorageError

    model, opt = build(world, "fsdp2")
    state = {"model": model, "optimizer": opt}
    original = writer.tensor_bytes
    if rank == 1:
        def full_disk(t: torch.Tensor) -> Any:
            raise StorageError("No space left on device (simulated)")

        writer.tensor_bytes = full_disk  # type: ignore[assignment]
    with torchkeep.CheckpointManager(root) as mgr:
        try:
            mgr.save(1, state)
            first = None
        except Exception as e:
            first = (type(e).__name__, str(e))
        writer.tensor_bytes = original  # type: ignore[assignment]
        listing = sorted(os.listdir(root))
        mgr.save(2, state)
        return {"error": first, "listing": listing, "steps": mgr.all_steps()}


def reuse_step(rank: int, world: int, root: str) -> Any:
    """Save step 1 twice: the second is refused on every rank."""
    model, opt = build(world, "fsdp2")
    state = {"model": model, "optimizer": opt}
    with torchkeep.CheckpointManager(root) as mgr:
        mgr.save(1, state)
        train(model, opt, rank, 1)
        try:
            mgr.save(1, state)
        except torchkeep.TorchkeepError as e:
            return type(e).__name__
    return None


def restore_fallback(rank: int, world: int, root: str, fallback: bool) -> dict[str, Any]:
    """Restore the latest step; with fallback, step back when it does not verify."""
    import warnings

    model, opt = build(world, "fsdp2", seed=5)
    state = {"model": model, "optimizer": opt}
    with torchkeep.CheckpointManager(root) as mgr, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            return {"step": mgr.restore(state, fallback=fallback), "error": None}
        except Exception as e:
            return {"step": None, "error": (type(e).__name__, str(e))}


def save_placements(rank: int, world: int, path: str) -> Any:
    """Save DTensors of several placements and dtypes, plain values, with tkd.save."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import torchkeep.distributed as tkd

    mesh = init_device_mesh("cpu", (world,))
    f = placements_full()
    sd = {"rows": distribute_tensor(f["rows"], mesh, [Shard(0)]),
          "cols": distribute_tensor(f["cols"], mesh, [Shard(1)]),
          "rep": distribute_tensor(f["rep"], mesh, [Replicate()]),
          "bf16": distribute_tensor(f["bf16"], mesh, [Shard(0)]),
          "ints": distribute_tensor(f["ints"], mesh, [Shard(0)]),
          "flags": distribute_tensor(f["flags"], mesh, [Replicate()]),
          "scalar": f["scalar"], "empty": f["empty"],
          "extra": {"note": "hello", "lr": [0.1, 0.01], "n": 3},
          "rank_value": PerRank(torch.tensor([100 + rank])).state_dict()}
    tkd.save({**sd, "__per_rank__": {str(rank): {"rng": torch.tensor([100 + rank]),
                                                 "pos": 1000 + rank}}}, path)
    return True


def placements_full() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {"rows": torch.randn(1000, 6, generator=g), "cols": torch.randn(5, 7, generator=g),
            "rep": torch.randn(30, 17, generator=g),
            "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
            "ints": torch.arange(11, dtype=torch.int64) * 7,
            "flags": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4), "extra": {"note": "hello", "lr": [0.1, 0.01], "n": 3}}


def load_placements(rank: int, world: int, path: str) -> dict[str, Any]:
    """Load with other placements than the save's; the full tensors and the values."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import torchkeep.distributed as tkd

    mesh = init_device_mesh("cpu", (world,))
    f = placements_full()
    sd: dict[str, Any] = {
        "rows": distribute_tensor(torch.zeros(1000, 6), mesh, [Shard(1)]),
        "cols": distribute_tensor(torch.zeros(5, 7), mesh, [Shard(0)]),
        "rep": distribute_tensor(torch.zeros(30, 17), mesh, [Shard(0)]),
        "bf16": distribute_tensor(torch.zeros(9, dtype=torch.bfloat16), mesh, [Replicate()]),
        "ints": distribute_tensor(torch.zeros(11, dtype=torch.int64), mesh, [Replicate()]),
        "flags": distribute_tensor(torch.zeros(3, dtype=torch.bool), mesh, [Shard(0)]),
        "scalar": torch.tensor(0.0), "empty": torch.zeros(0, 4),
        "extra": {"note": "", "lr": None, "n": 0}}
    if world == 2:  # the saved world: each rank asks for its own per-rank entries
        sd["__per_rank__"] = {str(rank): {"rng": torch.tensor([0]), "pos": 0}}
    tkd.load(sd, path)
    out = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}
    return {"equal": {k: _same(out[k], f[k]) for k in f}, "mine": sd.get("__per_rank__")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def resume_run(rank: int, world: int, root: str, steps: int, resume: bool) -> dict[str, Any]:
    """Train ``steps`` steps (after restoring the latest step when ``resume``), saving
    after each; the losses and the final full state."""
    model, opt = build(world, "fsdp2")
    rng = torchkeep.RNGState()
    torch.manual_seed(1 + rank)
    state = {"model": model, "optimizer": opt, "rng": rng, "step": 0}
    losses = []
    with torchkeep.CheckpointManager(root) as mgr:
        start = mgr.restore(state) + 1 if resume else 0
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(8, 13, generator=g) + torch.randn(8, 13) * 0.01  # global RNG
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            state["step"] = step
            mgr.save(step, state)
    return {"losses": losses, **full_state(model, opt)}


def async_save_snapshot(rank: int, world: int, root: str, keep: int = 1) -> dict[str, Any]:
    """Save asynchronously, change the weights at once, then commit: the step holds the
    weights as they were at save()."""
    model, opt = build(world, "fsdp2")
    train(model, opt, rank, 1)
    state = {"model": model, "optimizer": opt, "step": 1}
    with torchkeep.CheckpointManager(root, async_save=True, keep_last=keep) as mgr:
        snapshot = full_state(model, opt)
        mgr.save(1, state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        mgr.save(2, state)  # waits for step 1 first: one save in flight
        mgr.wait()
        steps = mgr.all_steps()
    later = full_state(model, opt)
    return {"snapshot": snapshot, "later": later, "steps": steps}


def async_save_snapshot_keep(rank: int, world: int, root: str) -> dict[str, Any]:
    """As async_save_snapshot, keeping both steps."""
    return async_save_snapshot(rank, world, root, keep=2)


def stock_dcp_save(rank: int, world: int, path: str) -> dict[str, Any]:
    """A run checkpointed with stock dcp.save (FileSystemWriter), as torchtitan does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = build(world, "fsdp2")
    train(model, opt, rank, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd, "step": 2}, checkpoint_id=path)
    return full_state(model, opt)


def import_dcp(rank: int, world: int, path: str) -> dict[str, Any]:
    """Import a stock DCP directory into a fresh run's state with the manager."""
    import tempfile

    model, opt = build(world, "fsdp2", seed=11)
    train(model, opt, rank, 1, 50)
    state = {"model": model, "optimizer": opt, "step": 0}
    with tempfile.TemporaryDirectory() as root, torchkeep.CheckpointManager(root) as mgr:
        mgr.restore(state, from_path=path)
    return {**full_state(model, opt), "step": state["step"]}


def stale_listing(rank: int, world: int, root: str) -> Any:
    """Rank 1's view of the directory is stale (it lists no step): every rank still gets
    rank 0's answer."""
    model, opt = build(world, "fsdp2")
    state = {"model": model, "optimizer": opt}
    with torchkeep.CheckpointManager(root) as mgr:
        mgr.save(4, state)
        if rank == 1:
            mgr.run.refresh = lambda: {}  # type: ignore[method-assign]
        return mgr.latest_step(), mgr.all_steps()


def model_state_wrapper(rank: int, world: int, root: str, restore: bool) -> dict[str, Any]:
    """One optimizer over two modules of the state: saved as a ModelState of their
    parent; without the wrapper the manager refuses it."""
    model, opt = build(world, "fsdp2", seed=21 if restore else 0)
    if restore:
        train(model, opt, rank, 1, 40)
    else:
        train(model, opt, rank, 2)
    with torchkeep.CheckpointManager(root) as mgr:
        try:
            mgr.save(9, {"first": model[0], "last": model[2], "optimizer": opt})
            refused = None
        except torchkeep.TorchkeepError as e:
            refused = type(e).__name__
        state = {"train": torchkeep.ModelState(model, opt)}
        if restore:
            mgr.restore(state)
        else:
            mgr.save(1, state)
    return {"refused": refused, **full_state(model, opt)}


def incremental_run(rank: int, world: int, root: str, steps: int,
                    async_save: bool) -> dict[str, Any]:
    """FSDP2 with a frozen first layer, saved incrementally after every step (keep_last=2,
    full_every=3); the manifests' incremental records and the final full state."""
    model, opt = build(world, "fsdp2")
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen: never changes, never read again
    state = {"model": model, "optimizer": opt, "step": 0}
    records = {}
    with torchkeep.CheckpointManager(root, keep_last=2, incremental=True, full_every=3,
                                     async_save=async_save) as mgr:
        for step in range(steps):
            train(model, opt, rank, 1, step)
            state["step"] = step
            mgr.save(step, state)
            mgr.wait()
            if rank == 0:
                import json

                with open(os.path.join(mgr.step_path(step), "manifest.json")) as f:
                    records[step] = json.load(f)["incremental"]
        kept = mgr.all_steps()
    return {"records": records, "steps": kept, **full_state(model, opt)}


def incremental_restore(rank: int, world: int, root: str) -> dict[str, Any]:
    """Restore incremental_run's newest step into a fresh model on this world size."""
    model, opt = build(world, "fsdp2", seed=99)
    for p in model[0].parameters():
        p.requires_grad_(False)
    train(model, opt, rank, 1, 50)  # optimizer state exists, with other values
    state = {"model": model, "optimizer": opt, "step": -1}
    with torchkeep.CheckpointManager(root) as mgr:
        step = mgr.restore(state)
    return {"step": step, "saved_step": state["step"], **full_state(model, opt)}
