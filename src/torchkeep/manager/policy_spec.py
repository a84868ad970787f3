"""Retention settings as plain data: what manifests record and the CLI flags describe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchkeep.manager.retention import AnyOf, KeepBest, KeepEvery, KeepLast, Mode, Policy

__all__ = ["RetentionSpec"]


@dataclass(frozen=True, kw_only=True)
class RetentionSpec:
    """keep_last / keep_best (by best_metric, best_mode) / keep_every_steps, as data."""

    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: Mode = "min"
    keep_every_steps: int | None = None

    @classmethod
    def from_fields(cls, fields: Any) -> RetentionSpec | None:
        """Read the ``retention`` object a manifest records; None when absent or malformed."""
        if not isinstance(fields, dict):
            return None
        try:
            spec = cls(**{k: fields.get(k) for k in ("keep_last", "keep_best", "best_metric",
                                                      "keep_every_steps")},
                       best_mode=fields.get("best_mode") or "min")
            spec.policy()
        except (TypeError, ValueError):
            return None
        return spec

    @property
    def empty(self) -> bool:
        """True when no policy is set (every step is kept)."""
        return self.keep_last is None and self.keep_best is None and self.keep_every_steps is None

    def policy(self) -> Policy | None:
        """The policy object (None keeps everything)."""
        policies: list[Policy] = []
        if self.keep_last is not None:
            policies.append(KeepLast(self.keep_last))
        if self.keep_best is not None:
            if self.best_metric is None:
                raise ValueError("keep_best needs best_metric")
            policies.append(KeepBest(self.keep_best, self.best_metric, self.best_mode))
        if self.keep_every_steps is not None:
            policies.append(KeepEvery(self.keep_every_steps))
        if not policies:
            return None
        return policies[0] if len(policies) == 1 else AnyOf(tuple(policies))

    def describe(self) -> str:
        """``keep_last=2, keep_best=1 by loss (min)`` or ``none``."""
        parts = []
        if self.keep_last is not None:
            parts.append(f"keep_last={self.keep_last}")
        if self.keep_best is not None:
            parts.append(f"keep_best={self.keep_best} by {self.best_metric} ({self.best_mode})")
        if self.keep_every_steps is not None:
            parts.append(f"keep_every_steps={self.keep_every_steps}")
        return ", ".join(parts) or "none (every step is kept)"
