"""The CheckpointManager's sharded path: used when torch.distributed is initialised with
more than one rank (and to restore a sharded step anywhere).

Every call is collective (made on every rank). Rank 0 decides (which steps exist, which
step to restore, retention, leftovers) and broadcasts; DCP plans, deduplicates and
reshards; torchkeep.distributed writes, commits and verifies.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch.distributed as dist

from torchkeep.errors import DistributedError, TorchkeepError
from torchkeep.formats.manifest import SHARDED_VERSION, read_manifest

__all__ = ["Collective", "is_sharded_step", "restore_sharded", "save_sharded"]


class Collective:
    """Rank, world size and the process groups of a sharded manager."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        #: the manager's own decisions (on the calling thread), never interleaved with
        #: training collectives
        self.group = dist.new_group(backend="gloo")
        #: DCP's save and load collectives; a background save is the only user meanwhile
        self.ckpt = dist.new_group(backend="gloo")
        self._stager: Any = None

    def stager(self) -> Any:
        """DCP's CPU stager for background saves, kept for the manager's life so its
        staging buffers are reused from one save to the next."""
        if self._stager is None:
            import torch
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                use_async_staging=False, use_non_blocking_copy=False))
        return self._stager

    def close(self) -> None:
        """Release the staging buffers and the manager's process groups."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        for group in (self.group, self.ckpt):
            with contextlib.suppress(Exception):  # the default group may be gone already
                dist.destroy_process_group(group)

    def decide(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (an exception on rank 0 raises everywhere)."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        result = box[0]
        if isinstance(result, _Failed):
            raise DistributedError(f"rank 0 failed: {result.message}")
        return result

    def decide_call(self, fn: Any) -> Any:
        """Run ``fn`` on rank 0 and give its result (or its failure) to every rank."""
        value: Any = None
        if self.rank == 0:
            try:
                value = fn()
            except TorchkeepError as e:
                value = _Failed(str(e))
        return self.decide(value)

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier(group=self.group)


@dataclasses.dataclass(frozen=True)
class _Failed:
    message: str


def sharded_world() -> bool:
    """True when torch.distributed is initialised (with any number of ranks: a one-rank
    job may hold DTensors too, and its steps load on any world size)."""
    return dist.is_available() and dist.is_initialized()


def is_sharded_step(fs: Any, path: str) -> tuple[bool, dict[str, Any]]:
    """Whether the committed step at ``path`` is sharded, and its manifest."""
    manifest = read_manifest(fs, path, verify=False)
    return manifest.get("version") == SHARDED_VERSION, manifest


def save_sharded(path: str, state: dict[str, Any], *, step: int, metrics: dict[str, Any],
                 extra: dict[str, Any], collective: Collective | None, fsync: bool,
                 background: bool = False, incremental: Any = None) -> Any:
    """Commit ``state`` as the sharded step directory ``path`` (collective). With
    ``background`` it returns once the state is staged in CPU memory: a PendingSave.
    ``incremental``: this rank's ShardedDiff (manager/incremental.py)."""
    from torchkeep.distributed import api
    from torchkeep.distributed.state import plan_state, state_dict

    rank = collective.rank if collective else 0
    world = collective.world if collective else 1
    plan = plan_state(state)
    sd = state_dict(state, plan, rank)
    info = {"step": step, "metrics": metrics, **extra, "world": {"size": world},
            "per_rank": sorted(plan.per_rank)}
    group = collective.ckpt if collective else None
    if background and collective is not None:
        return api.save_async(sd, path, process_group=group, stager=collective.stager(),
                              info=info, fsync=fsync, incremental=incremental)
    api.save(sd, path, process_group=group, info=info, fsync=fsync, incremental=incremental)
    return None


def restore_sharded(path: str, state: dict[str, Any], *, step: int, manifest: dict[str, Any],
                    collective: Collective | None, verify: bool) -> None:
    """Load the sharded step ``path`` into ``state`` on any world size (collective)."""
    from torchkeep.distributed import api
    from torchkeep.distributed.state import (
        PER_RANK,
        apply_state,
        plan_state,
        reshard_per_rank,
        target,
    )

    rank = collective.rank if collective else 0
    world = collective.world if collective else 1
    world_info = manifest.get("world")
    saved_world = world_info.get("size") if isinstance(world_info, dict) else None
    plan = plan_state(state)
    same = saved_world == world
    per_rank_saved = None
    if plan.per_rank and saved_world is None:  # a DCP directory or a one-process step
        import warnings

        warnings.warn(f"{path}: holds no per-rank state; {', '.join(plan.per_rank)} left "
                      "as they are", stacklevel=3)
        plan.per_rank = []
    if plan.per_rank:  # each rank's own values, read before anything is loaded: what
        # cannot move to this world size is refused first
        per_rank_saved = _saved_per_rank(path, PER_RANK, None if not same else str(rank),
                                         verify)
        if not same:
            reshard_per_rank(state, plan, rank, saved_world, world, per_rank_saved)
        elif str(rank) not in per_rank_saved:
            from torchkeep.manager.manager import StateMismatchError

            raise StateMismatchError(f"step {step} holds no per-rank state of rank {rank}")
    sd = target(state, plan, rank)
    api.load(sd, path, process_group=collective.ckpt if collective else None, verify=verify)
    apply_state(state, plan, sd, rank, saved_world, world, step, per_rank_saved)


def _saved_per_rank(path: str, key: str, only: str | None,
                    verify: bool) -> dict[str, dict[str, Any]]:
    """The saved ranks' per-rank values (rank -> name -> state): with ``only``, that rank's
    as torch values (its tensors read and verified); else every rank's plain values
    (placeholders for tensors: samplers need no tensor bytes)."""
    from torchkeep.formats.manifest import read_step_dir
    from torchkeep.tensors import TorchMaterializer
    from torchkeep.tree import map_tree

    parsed = read_step_dir(path, verify=verify)
    try:
        found = parsed.tree.get(key) if isinstance(parsed.tree, dict) else None
        if not isinstance(found, dict):
            return {}
        if only is None:
            return found
        if only not in found:
            return {}
        materializer = TorchMaterializer(parsed, map_location="cpu", mmap=False)
        return {only: map_tree(found[only], materializer.convert)}
    finally:
        parsed.close()
