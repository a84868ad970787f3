"""torchdata's StatefulDataLoader saved and restored through CheckpointManager like any
stateful object: mid-epoch, with and without worker processes, the resumed loader yields
exactly the batches the original would have."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import torchkeep

stateful_dataloader = pytest.importorskip(
    "torchdata.stateful_dataloader", reason="the dev extra installs torchdata")


def _loader(workers: int):
    generator = torch.Generator()
    generator.manual_seed(0)
    data = TensorDataset(torch.arange(100.0), torch.arange(100.0) * 2)
    return stateful_dataloader.StatefulDataLoader(
        data, batch_size=4, shuffle=True, num_workers=workers, generator=generator)


def _batches(iterable) -> list[list[float]]:
    return [batch[0].tolist() for batch in iterable]


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_yields_the_same_batches(tmp_path, workers) -> None:
    original = _loader(workers)
    iterator = iter(original)
    for _ in range(7):  # 7 of the epoch's 25 batches
        next(iterator)
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(7, {"loader": original, "epoch": 0})
    oracle = _loader(workers)  # torchdata's own round trip, in memory
    oracle.load_state_dict(copy.deepcopy(original.state_dict()))
    rest_of_epoch = _batches(iterator)
    next_epoch = _batches(original)

    resumed = _loader(workers)
    state = {"loader": resumed, "epoch": None}
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(state) == 7
    assert state["epoch"] == 0
    rest_resumed, next_resumed = _batches(resumed), _batches(resumed)
    rest_oracle, next_oracle = _batches(oracle), _batches(oracle)
    assert rest_resumed == rest_oracle == rest_of_epoch and len(rest_of_epoch) == 18
    assert next_resumed == next_oracle  # the epoch after, as torchdata itself gives it
    assert _batches(_loader(workers))[:18] != rest_of_epoch  # a fresh loader starts over
    # torchdata 0.11: with worker processes the epoch after a resume is the original's
    # too; without workers its own state_dict round trip gives another order
    assert (next_resumed == next_epoch) == bool(workers)
