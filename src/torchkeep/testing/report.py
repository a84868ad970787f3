"""What a resume check found, as data (``--json``) and as the text the command prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torchkeep.testing.compare import StepComparison

__all__ = ["Cause", "KillPoint", "ResumeReport", "StepRow"]

Verdict = Literal["identical", "diverged", "nondeterministic"]


@dataclass(frozen=True)
class KillPoint:
    """Where run B was SIGKILLed."""

    #: the step after whose commit (or during whose save) the kill landed
    step: int
    during_save: bool
    #: the seed the step was drawn with (``kill_at="random"``), else None
    seed: int | None = None

    def describe(self) -> str:
        """``SIGKILL after step 117`` / ``SIGKILL during the save of step 118``."""
        where = (f"during the save of step {self.step}" if self.during_save
                 else f"after step {self.step}")
        drawn = f", drawn with seed {self.seed}" if self.seed is not None else ""
        return f"SIGKILL {where}{drawn}"


@dataclass(frozen=True)
class Cause:
    """A likely reason for a divergence, with the evidence that points at it."""

    #: lr-schedule, optimizer-missing, rng-missing, data-loader, worker-seeds, rng-drawn,
    #: outside-state, steps-differ, nondeterministic
    code: str
    message: str


@dataclass(frozen=True)
class StepRow:
    """One compared step: the runs' losses and how many entries differ."""

    run: str
    step: int
    loss_a: float | None
    loss_b: float | None
    differing: int
    identical: bool
    #: "before the kill" (run B's first process) or "after the resume"
    phase: str


@dataclass
class ResumeReport:
    """The result of :func:`torchkeep.testing.check_resume` / ``torchkeep check-resume``."""

    verdict: Verdict
    kill: KillPoint
    resumed_from: int | None
    rows: list[StepRow] = field(default_factory=list)
    #: the first step (of run B against run A, or of A' against A) that differs
    first_difference: StepComparison | None = None
    #: the run the first difference was found in: "B" or "A'" (``twice``)
    first_difference_run: str = "B"
    causes: list[Cause] = field(default_factory=list)
    #: steps one run committed and the other did not, per run directory
    only_in_a: list[int] = field(default_factory=list)
    only_in_b: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    twice: bool = False
    runs: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """True when run B matched run A bit for bit at every step both committed."""
        return self.verdict == "identical"

    @property
    def compared(self) -> int:
        """How many steps were compared."""
        return len(self.rows)

    def assert_identical(self) -> None:
        """Raise AssertionError with :meth:`explain` unless the resume was bit-identical."""
        if not self.identical:
            raise AssertionError(self.explain())

    # -- text ---------------------------------------------------------------------------

    def result_line(self) -> str:
        """The ``RESULT:`` line."""
        if self.verdict == "identical":
            return (f"RESULT: bit-identical at every saved step "
                    f"({self.compared} of {self.compared})")
        first = self.first_difference
        if self.verdict == "nondeterministic":
            where = f" at step {first.step}" if first is not None else ""
            other = "run A'" if self.first_difference_run == "A'" else "run B before the kill"
            return (f"RESULT: not deterministic: {other} differs from run A{where}; "
                    "resume cannot be judged")
        if first is None:
            return "RESULT: diverged: the runs committed different steps"
        after = ""
        if self.resumed_from is not None:
            later = [r.step for r in self.rows if r.step > self.resumed_from]
            if later and later[0] == first.step:
                after = " (the first step after the resume)"
        return f"RESULT: diverged at step {first.step}{after}"

    def table(self, *, full: bool = False) -> list[str]:
        """The step table; without ``full`` only the steps around the start, the resume,
        the first difference and the end."""
        if not self.rows:
            return []
        several = len({r.run for r in self.rows}) > 1
        keep = set(range(len(self.rows))) if full else self._interesting()
        lines = [("run  " if several else "") + f"{'step':>6}  {'loss A':<22}  {'loss B':<22}  "
                 "entries differing"]
        gap = False
        for i, row in enumerate(self.rows):
            if i not in keep:
                if not gap:
                    lines.append(f"{'...':>6}")
                gap = True
                continue
            gap = False
            mark = "0" if row.identical else str(row.differing or "metrics")
            lines.append((f"{row.run[:5]:<5}" if several else "")
                         + f"{row.step:>6}  {_loss(row.loss_a):<22}  {_loss(row.loss_b):<22}  "
                         + mark + ("   <- resumed here" if row.step == self.resumed_from else ""))
        return lines

    def _interesting(self) -> set[int]:
        rows = self.rows
        keep = {0, 1, len(rows) - 2, len(rows) - 1}
        for i, row in enumerate(rows):
            if row.step == self.resumed_from:
                keep.update(range(i - 1, i + 3))
            if self.first_difference is not None and row.step == self.first_difference.step:
                keep.update(range(i - 1, i + 3))
        return {i for i in keep if 0 <= i < len(rows)}

    def explain(self, *, full: bool = False) -> str:
        """The whole report as the command prints it (after the progress lines)."""
        lines = [*self.table(full=full), self.result_line()]
        first = self.first_difference
        if first is not None and self.verdict != "identical":
            what = [d.describe() for d in first.differences[:3]]
            more = len(first.differences) - len(what)
            if more > 0:
                what.append(f"and {more} more")
            metrics = [f"{m} {_loss(first.metrics_a.get(m))} vs {_loss(first.metrics_b.get(m))}"
                       for m in first.metric_differences]
            lines.append("  first difference: " + ", ".join(what + metrics))
        if self.only_in_a or self.only_in_b:
            lines.append(f"  steps only run A committed: {_steps(self.only_in_a)}; "
                         f"only run B: {_steps(self.only_in_b)}")
        for i, cause in enumerate(self.causes):
            lines.append(("  likely cause: " if i == 0 else "  also possible: ") + cause.message)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything, as JSON-ready data."""
        first = self.first_difference
        return {
            "verdict": self.verdict,
            "identical": self.identical,
            "kill": asdict(self.kill),
            "resumed_from": self.resumed_from,
            "compared": self.compared,
            "twice": self.twice,
            "first_difference": None if first is None else {
                "run": self.first_difference_run,
                "step": first.step,
                "entries": [asdict(d) for d in first.differences],
                "metrics": {m: [first.metrics_a.get(m), first.metrics_b.get(m)]
                            for m in first.metric_differences},
            },
            "causes": [asdict(c) for c in self.causes],
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "steps": [asdict(r) for r in self.rows],
            "seconds": self.seconds,
        }


def _loss(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[:8]))
    return shown + (f" (+{len(steps) - 8})" if len(steps) > 8 else "")
