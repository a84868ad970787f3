"""Retention policies as tables: which steps stay, and why."""

from __future__ import annotations

import pytest

from torchkeep.manager.retention import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepLast,
    StepInfo,
    best_step,
    plan_retention,
)

LOSSES = {0: 5.0, 10: 1.0, 20: 4.0, 30: 0.5, 40: 3.0, 50: 2.0, 60: 6.0}
STEPS = [StepInfo(s, {"loss": v, "acc": -v}) for s, v in LOSSES.items()]


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (None, [0, 10, 20, 30, 40, 50, 60]),
        (KeepLast(1), [60]),
        (KeepLast(3), [40, 50, 60]),
        (KeepBest(1, "loss"), [30, 60]),
        (KeepBest(2, "loss"), [10, 30, 60]),
        (KeepBest(2, "acc", "max"), [10, 30, 60]),
        (KeepBest(1, "loss", "max"), [60]),
        (KeepEvery(20), [0, 20, 40, 60]),
        (AnyOf((KeepLast(2), KeepBest(1, "loss"))), [30, 50, 60]),
        (AnyOf((KeepLast(1), KeepEvery(30))), [0, 30, 60]),
    ],
)
def test_kept_steps(policy, kept) -> None:
    plan = plan_retention(STEPS, policy)
    assert sorted(plan.keep) == kept
    assert sorted(plan.delete) == sorted(set(LOSSES) - set(kept))


def test_newest_and_best_are_never_deleted() -> None:
    plan = plan_retention(STEPS, KeepEvery(1000), best_metric="loss")
    assert sorted(plan.keep) == [0, 30, 60]  # step 0 is a multiple of 1000
    assert plan.keep[60].startswith("newest")
    assert plan.keep[30].startswith("best loss")


def test_reasons_are_given() -> None:
    plan = plan_retention(STEPS, AnyOf((KeepLast(2), KeepBest(1, "loss"))), best_metric="loss")
    assert plan.keep[30] == "best loss, best 1 by loss (min)"
    assert plan.keep[60] == "newest, last 2"


def test_missing_and_nan_metrics_are_never_best() -> None:
    steps = [StepInfo(1, {}), StepInfo(2, {"loss": float("nan")}), StepInfo(3, {"loss": 7.0}),
             StepInfo(4, {"loss": "n/a"}), StepInfo(5, {"loss": True})]
    assert best_step(steps, "loss") == 3
    assert best_step(steps[:2], "loss") is None


def test_ties_go_to_the_newer_step() -> None:
    steps = [StepInfo(1, {"loss": 1.0}), StepInfo(2, {"loss": 1.0})]
    assert best_step(steps, "loss") == 2


def test_empty_and_bad_arguments() -> None:
    assert plan_retention([], KeepLast(1)).keep == {}
    with pytest.raises(ValueError):
        KeepLast(0)
    with pytest.raises(ValueError):
        KeepBest(1, "loss", "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KeepEvery(0)


def test_resumable_sampler_continues_the_same_permutation() -> None:
    from torchkeep.manager.sampler import ResumableSampler

    full = ResumableSampler(10, seed=3)
    full.set_epoch(1)
    order = list(full)
    partial = ResumableSampler(10, seed=3)
    partial.set_epoch(1)
    it = iter(partial)
    first = [next(it) for _ in range(4)]
    saved = partial.state_dict()
    resumed = ResumableSampler(10, seed=3)
    resumed.load_state_dict(saved)
    resumed.set_epoch(1)
    assert first + list(resumed) == order
    assert sorted(order) == list(range(10))
    other_epoch = ResumableSampler(10, seed=3)
    other_epoch.set_epoch(2)
    assert list(other_epoch) != order
    partial.set_consumed(2)
    assert partial.state_dict()["position"] == 2


@pytest.mark.parametrize("saved_world", [1, 2, 3, 4])
def test_sampler_reshards_to_any_world_size_without_losing_an_index(saved_world: int) -> None:
    from torchkeep.manager.sampler import ResumableSampler

    reference = list(ResumableSampler(23, seed=5))
    for world in (1, 2, 3, 5):
        for steps in (0, 1, 3, 5, 6):
            ranks = [ResumableSampler(23, seed=5, rank=r, world_size=saved_world)
                     for r in range(saved_world)]
            its = [iter(s) for s in ranks]
            seen = []
            for _ in range(steps):  # data-parallel lockstep, to the ragged end of the epoch
                for it in its:
                    seen.extend(next(it, None) for _ in range(1))
            seen = [i for i in seen if i is not None]
            states = [s.state_dict() for s in ranks]
            new = [ResumableSampler(23, seed=5, rank=r, world_size=world) for r in range(world)]
            for r, sampler in enumerate(new):
                sampler.load_state_dict(ResumableSampler.reshard(states, r, world))
            epochs = {sampler.epoch for sampler in new}
            rest = [i for sampler in new for i in sampler]
            assert sorted(seen) == sorted(reference[: len(seen)])  # a prefix was consumed
            if len(seen) < 23:
                assert sorted(seen + rest) == list(range(23))  # none lost, none repeated
            else:  # the epoch was done: the new ranks start the next one
                assert sorted(rest) == list(range(23)) and epochs == {1}


def test_sampler_states_that_do_not_cover_a_prefix_are_refused() -> None:
    from torchkeep.manager.sampler import ResumableSampler

    ranks = [ResumableSampler(20, seed=1, rank=r, world_size=2) for r in range(2)]
    it = iter(ranks[1])
    next(it)
    next(it)  # rank 1 two ahead of rank 0
    with pytest.raises(ValueError, match="prefix"):
        ResumableSampler.reshard([s.state_dict() for s in ranks], 0, 3)
    with pytest.raises(ValueError, match="rank 0 of 1"):
        ResumableSampler(20, seed=1, rank=1, world_size=2).load_state_dict(
            ResumableSampler(20, seed=1).state_dict())
