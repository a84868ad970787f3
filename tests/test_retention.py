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
