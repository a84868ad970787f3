"""Retention as tiny policy objects: each says which steps it keeps, and why."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "AnyOf",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "Mode",
    "Policy",
    "RetentionPlan",
    "StepInfo",
    "best_step",
    "plan_retention",
]

Mode = Literal["min", "max"]


@dataclass(frozen=True, slots=True)
class StepInfo:
    """A committed step as retention sees it: its number and the metrics saved with it."""

    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    """Returns ``{step: reason}`` for the steps it keeps (steps sorted oldest first)."""

    def keep(self, steps: Sequence[StepInfo]) -> dict[int, str]: ...


@dataclass(frozen=True, slots=True)
class KeepLast:
    """The newest ``n`` steps."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("keep_last must be at least 1")

    def keep(self, steps: Sequence[StepInfo]) -> dict[int, str]:
        return {s.step: f"last {self.n}" for s in steps[-self.n :]}


def _value(info: StepInfo, metric: str) -> float | None:
    value = info.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True, slots=True)
class KeepBest:
    """The ``k`` steps with the best ``metric`` (lowest for ``min``, highest for ``max``).

    Steps without the metric (or with NaN) are never "best". Ties go to the newer step.
    """

    k: int
    metric: str
    mode: Mode = "min"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("keep_best must be at least 1")
        if self.mode not in ("min", "max"):
            raise ValueError("best_mode must be 'min' or 'max'")

    def ranked(self, steps: Sequence[StepInfo]) -> list[StepInfo]:
        """Steps carrying the metric, best first."""
        scored = [(v, s) for s in steps if (v := _value(s, self.metric)) is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda pair: (sign * pair[0], -pair[1].step))
        return [s for _, s in scored]

    def keep(self, steps: Sequence[StepInfo]) -> dict[int, str]:
        label = f"best {self.k} by {self.metric} ({self.mode})"
        return {s.step: label for s in self.ranked(steps)[: self.k]}


@dataclass(frozen=True, slots=True)
class KeepEvery:
    """Every step that is a multiple of ``n_steps``."""

    n_steps: int

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise ValueError("keep_every_steps must be at least 1")

    def keep(self, steps: Sequence[StepInfo]) -> dict[int, str]:
        return {s.step: f"every {self.n_steps} steps" for s in steps if s.step % self.n_steps == 0}


@dataclass(frozen=True, slots=True)
class AnyOf:
    """The union of several policies: a step is kept when any policy keeps it."""

    policies: tuple[Policy, ...]

    def keep(self, steps: Sequence[StepInfo]) -> dict[int, str]:
        reasons: dict[int, list[str]] = {}
        for policy in self.policies:
            for step, reason in policy.keep(steps).items():
                reasons.setdefault(step, []).append(reason)
        return {step: ", ".join(r) for step, r in reasons.items()}


def best_step(steps: Sequence[StepInfo], metric: str, mode: Mode = "min") -> int | None:
    """The step with the best ``metric``, or None when no step carries it."""
    ranked = KeepBest(1, metric, mode).ranked(steps)
    return ranked[0].step if ranked else None


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """What retention decided: kept steps with their reasons, and steps to delete."""

    keep: dict[int, str]
    delete: list[int]


def plan_retention(
    steps: Sequence[StepInfo],
    policy: Policy | None,
    *,
    best_metric: str | None = None,
    best_mode: Mode = "min",
) -> RetentionPlan:
    """Apply ``policy`` to committed ``steps``; the newest and the best step always stay.

    With no policy every step is kept.
    """
    ordered = sorted(steps, key=lambda s: s.step)
    if not ordered:
        return RetentionPlan({}, [])
    if policy is None:
        return RetentionPlan({s.step: "no retention policy" for s in ordered}, [])
    reasons: dict[int, list[str]] = {}
    for step, reason in policy.keep(ordered).items():
        reasons.setdefault(step, []).append(reason)
    reasons.setdefault(ordered[-1].step, []).insert(0, "newest")
    if best_metric is not None:
        best = best_step(ordered, best_metric, best_mode)
        if best is not None:
            reasons.setdefault(best, []).insert(0, f"best {best_metric}")
    keep = {s.step: ", ".join(dict.fromkeys(reasons[s.step])) for s in ordered if s.step in reasons}
    delete = [s.step for s in ordered if s.step not in keep]
    return RetentionPlan(keep, delete)
