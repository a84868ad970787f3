"""A shuffling sampler that can resume in the middle of an epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Yields a permutation of ``range(len(data))`` per epoch, determined by
    ``(seed, epoch)`` alone, and remembers how far it got.

    Checkpoint it with the manager (it has ``state_dict`` / ``load_state_dict``): a
    restored sampler continues the same permutation where it stopped, so a run resumed
    mid-epoch sees exactly the samples the uninterrupted run would have. Call
    ``set_epoch(e)`` before each epoch.

    Under data parallelism give each rank its slice: ``ResumableSampler(data, rank=r,
    world_size=n)`` yields every n-th index of the epoch's permutation, starting at r.
    Its state records the global position, so a run saved on n ranks resumes on m ranks
    with no index lost or repeated (``reshard``).

    The position counts indices handed to the DataLoader. With ``num_workers=0`` that is
    exactly what the training loop consumed; worker processes prefetch batches ahead of
    the loop, so with workers call ``set_consumed(n)`` with the number of samples of this
    epoch the loop has trained on before saving.
    """

    def __init__(self, data: Sized | int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}")
        self.size = data if isinstance(data, int) else len(data)
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        #: where in the epoch's permutation the current sharding began (a resumed run)
        self.start = 0
        #: indices this rank has yielded since ``start``
        self.position = 0
        self._consumed: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (unless resuming into it)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = 0
            self.position = 0
            self._consumed = None

    def set_consumed(self, samples: int) -> None:
        """Record how many samples of this epoch (of this rank's slice) the loop has
        trained on (for workers)."""
        if not 0 <= samples <= self._share():
            raise ValueError(f"consumed must be in 0..{self._share()}")
        self._consumed = samples

    def _share(self) -> int:
        """How many indices this rank yields between ``start`` and the epoch's end."""
        return _share(self.size, self.start, self.rank, self.world_size)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self._share():
            index = order[self.start + self.rank + self.position * self.world_size]
            self.position += 1
            yield index
        self.epoch += 1
        self.start = 0
        self.position = 0

    def __len__(self) -> int:
        return self._share() - self.position

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is (``set_consumed`` overrides the position)."""
        position = self.position if self._consumed is None else self._consumed
        state = {"seed": self.seed, "epoch": self.epoch, "size": self.size,
                 "position": position}
        if self.world_size != 1 or self.start:
            state.update(start=self.start, rank=self.rank, world_size=self.world_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``."""
        if int(state["size"]) != self.size:
            raise ValueError(f"sampler state is for {state['size']} samples, not {self.size}")
        world = int(state.get("world_size", 1))
        if world != self.world_size or int(state.get("rank", 0)) != self.rank:
            raise ValueError(f"sampler state is for rank {state.get('rank', 0)} of {world}, "
                             f"not rank {self.rank} of {self.world_size} (use reshard)")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.start = int(state.get("start", 0))
        self.position = int(state["position"])
        self._consumed = None

    @staticmethod
    def reshard(states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        """The state for rank ``rank`` of ``world_size`` continuing where the ranks whose
        states these are (one per saved rank, in rank order) stopped.

        The saved ranks together consumed a prefix of the epoch's permutation when their
        positions are level (or the first ranks one ahead, as at a ragged epoch end); the
        new ranks split exactly what remains. ValueError for any other pattern (it has
        no single global position).
        """
        if not states:
            raise ValueError("no sampler states to reshard")
        states = _align_epochs(states)
        first = states[0]
        keys = ("seed", "epoch", "size", "start")
        if any(int(s.get(k, 0)) != int(first.get(k, 0)) for s in states for k in keys):
            raise ValueError("the saved samplers disagree on seed, epoch, size or start")
        positions = [int(s["position"]) for s in states]
        level = all(a >= b for a, b in itertools.pairwise(positions)) and \
            positions[0] - positions[-1] <= 1
        if not level:
            raise ValueError(f"the saved ranks stopped at positions {positions}: together "
                             "they did not consume a prefix of the epoch")
        start = int(first.get("start", 0))
        consumed = min(int(first["size"]), start + sum(positions))
        epoch = int(first["epoch"])
        if consumed == int(first["size"]):  # the epoch is done: the next one starts
            epoch, consumed = epoch + 1, 0
        state = {"seed": int(first["seed"]), "epoch": epoch,
                 "size": int(first["size"]), "position": 0}
        if world_size != 1 or consumed:
            state.update(start=consumed, rank=rank, world_size=world_size)
        return state


def _share(size: int, start: int, rank: int, world: int) -> int:
    """How many indices rank ``rank`` of ``world`` yields from ``start`` to the epoch's end."""
    return max(0, -(-(size - start - rank) // world))


def _align_epochs(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At a ragged epoch end some ranks have rolled over to the next epoch (position 0)
    while others stand at the end of their share: put the rolled-over ones back at the
    end of their share of the earlier epoch, so the positions can be compared."""
    epochs = {int(s["epoch"]) for s in states}
    if len(epochs) == 1:
        return states
    e0 = min(epochs)
    if epochs != {e0, e0 + 1}:
        raise ValueError(f"the saved samplers stand in epochs {sorted(epochs)}")
    start = int(next(s for s in states if int(s["epoch"]) == e0).get("start", 0))
    aligned = []
    for s in states:
        if int(s["epoch"]) == e0 + 1:
            if int(s["position"]) != 0:
                raise ValueError("a saved sampler is into the next epoch while another is "
                                 "still in the last one")
            share = _share(int(s["size"]), start, int(s.get("rank", 0)),
                           int(s.get("world_size", 1)))
            s = {**s, "epoch": e0, "start": start, "position": share}
        aligned.append(s)
    return aligned
