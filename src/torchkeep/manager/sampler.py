"""A shuffling sampler that can resume in the middle of an epoch."""

from __future__ import annotations

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

    The position counts indices handed to the DataLoader. With ``num_workers=0`` that is
    exactly what the training loop consumed; worker processes prefetch batches ahead of
    the loop, so with workers call ``set_consumed(n)`` with the number of samples of this
    epoch the loop has trained on before saving.
    """

    def __init__(self, data: Sized | int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.size = data if isinstance(data, int) else len(data)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._consumed: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (unless resuming into it)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._consumed = None

    def set_consumed(self, samples: int) -> None:
        """Record how many samples of this epoch the loop has trained on (for workers)."""
        if not 0 <= samples <= self.size:
            raise ValueError(f"consumed must be in 0..{self.size}")
        self._consumed = samples

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self.size:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.size - self.position

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is (``set_consumed`` overrides the position)."""
        position = self.position if self._consumed is None else self._consumed
        return {"seed": self.seed, "epoch": self.epoch, "size": self.size, "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``."""
        if int(state["size"]) != self.size:
            raise ValueError(f"sampler state is for {state['size']} samples, not {self.size}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._consumed = None
