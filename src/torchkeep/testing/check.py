"""The resume check: run A uninterrupted, run B SIGKILLed and resumed, compare every step.

Runs are whole processes of the user's own command; their CheckpointManagers are
redirected to folders of the check (:mod:`torchkeep.manager.check_hooks`), so the
script needs no change.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from torchkeep.errors import ScriptFailedError
from torchkeep.manager.rundir import RunDirectory
from torchkeep.testing.compare import StepComparison, compare_step
from torchkeep.testing.diagnose import diagnose, nondeterministic
from torchkeep.testing.report import Cause, KillPoint, ResumeReport, StepRow
from torchkeep.testing.runner import Run, run_command

__all__ = ["check_command"]

DEFAULT_TIMEOUT_S = 600.0


def check_command(
    command: Sequence[str],
    *,
    steps: int | None = None,
    kill_at: int | str = "random",
    during_save: bool = False,
    twice: bool = False,
    seed: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    keep: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ResumeReport:
    """Check that ``command`` (a training script using CheckpointManager) resumes
    bit-exactly after a SIGKILL.

    ``steps``: stop every run cleanly once it commits step ``steps - 1`` (None: let the
    script end by itself). ``kill_at``: the step after whose commit run B is SIGKILLed, or
    ``"random"`` (one of run A's steps, drawn with ``seed``, which the report records).
    ``during_save``: kill it while that step's save is in flight (files written, not
    committed) instead. ``twice``: run A a second time first, to tell a nondeterministic
    script from a bad resume. ``timeout``: seconds allowed to each run. ``keep``: a folder
    to keep the runs' steps, events and output in (default: a temporary one, removed).

    Raises ValueError for settings that cannot be checked (exit 2 in the CLI) and
    ScriptFailedError when the script fails, hangs or commits nothing (exit 3).
    """
    if not command:
        raise ValueError("no command to check")
    if steps is not None and steps < 1:
        raise ValueError("steps must be at least 1")
    if kill_at != "random" and (not isinstance(kill_at, int) or kill_at < 0):
        raise ValueError(f"kill_at must be a step number or 'random', got {kill_at!r}")
    if keep and os.path.isdir(keep) and os.listdir(keep):
        raise ValueError(f"--keep {keep}: the folder is not empty (its steps would be "
                         "resumed from); give a new or empty folder")
    say = progress or (lambda line: None)
    stop_after = None if steps is None else steps - 1
    base_env = dict(os.environ, **(env or {}))
    work = os.path.abspath(keep) if keep else tempfile.mkdtemp(prefix="torchkeep-check-resume-")
    os.makedirs(work, exist_ok=True)
    seconds: dict[str, float] = {}

    def launch(label: str, name: str, stem: str, **kwargs: Any) -> Run:
        run = Run(label, os.path.join(work, name), os.path.join(work, stem))
        run_command(list(command), run, env=base_env, timeout=timeout, cwd=cwd, **kwargs)
        seconds[stem] = round(run.seconds, 3)
        return run

    try:
        limit = f", {steps} steps" if steps is not None else ""
        a = _finished(launch(f"run A (uninterrupted{limit})", "A", "A", stop_after=stop_after))
        committed = sorted(set(a.committed()))
        say(f"{a.label} ... done ({a.seconds:.1f} s, {len(committed)} steps committed)")
        a2 = None
        if twice:
            a2 = _finished(launch(f"run A' (uninterrupted, again{limit})", "A2", "A2",
                                  stop_after=stop_after))
            say(f"{a2.label} ... done ({a2.seconds:.1f} s)")
        kill = _kill_point(committed, kill_at, during_save, seed)
        pause = {"pause_in_save": kill.step} if during_save else {"pause_after": kill.step}
        b1 = launch(f"run B ({kill.describe()})", "B", "B1", stop_after=stop_after, **pause)
        if not b1.killed:
            _finished(b1)
            raise ScriptFailedError(
                f"run B ended before reaching step {kill.step}, which run A committed: the "
                "script's step numbers depend on something outside the check",
                output=b1.output_tail())
        b2 = _finished(launch("run B (resumed)", "B", "B2", stop_after=stop_after),
                       resumed=True)
        say(f"run B ({kill.describe()}, resumed from step {b2.restored()}) ... done "
            f"({b1.seconds + b2.seconds:.1f} s)")
        return _report(a, a2, b1, b2, kill, twice, seconds)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _finished(run: Run, *, resumed: bool = False) -> Run:
    """The run, if it ended well and committed something; ScriptFailedError otherwise."""
    if run.returncode != 0:
        hint = ""
        if resumed and run.restored() is None:
            hint = " (it did not restore a step: does the script call mgr.restore(state)?)"
        raise ScriptFailedError(f"{run.label} failed with exit code {run.returncode}{hint}",
                                output=run.output_tail())
    if not run.committed():
        raise ScriptFailedError(
            f"{run.label} committed no step: does the script save with "
            "torchkeep.CheckpointManager (a step must commit before the script ends)?",
            output=run.output_tail())
    return run


def _kill_point(committed: list[int], kill_at: int | str, during_save: bool,
                seed: int | None) -> KillPoint:
    last = committed[-1]
    if kill_at == "random":
        candidates = committed[1:] if during_save else committed[:-1]
        if not candidates:
            raise ValueError(f"run A committed only step {last}: there is no step to resume "
                             "into; let it run for more steps")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        return KillPoint(random.Random(seed).choice(candidates), during_save, seed)
    assert isinstance(kill_at, int)
    at = [s for s in committed if s >= kill_at]
    if not at or (not during_save and at[0] == last):
        raise ValueError(f"--kill-at {kill_at}: run A's last committed step is {last}; "
                         "kill at a step before it")
    return KillPoint(at[0], during_save)


def _loaded(path: str) -> Any:
    import torchkeep

    return torchkeep.load(path, backend="numpy")


def _compare_runs(root_a: str, root_b: str, *, stop_at_first: bool = False,
                  ) -> tuple[list[tuple[str, StepComparison]], list[int], list[int]]:
    """Compare every step both runs committed, run directory by run directory."""
    comparisons: list[tuple[str, StepComparison]] = []
    only_a: list[int] = []
    only_b: list[int] = []
    keys = sorted(n for n in os.listdir(root_a) if os.path.isdir(os.path.join(root_a, n)))
    for key in keys:
        run_a = RunDirectory(os.path.join(root_a, key), create=False)
        path_b = os.path.join(root_b, key)
        run_b = RunDirectory(path_b, create=False) if os.path.isdir(path_b) else None
        # one listing per run directory: every committed step with its metrics
        metrics_a = run_a.refresh()
        metrics_b = run_b.refresh() if run_b is not None else {}
        only_a += [s for s in metrics_a if s not in metrics_b]
        only_b += [s for s in metrics_b if s not in metrics_a]
        for step in sorted(metrics_a.keys() & metrics_b.keys()):
            assert run_b is not None
            comparison = compare_step(step, _loaded(run_a.step_path(step)),
                                      _loaded(run_b.step_path(step)),
                                      metrics_a=metrics_a[step], metrics_b=metrics_b[step])
            comparisons.append((key, comparison))
            if stop_at_first and not comparison.identical:
                return comparisons, only_a, only_b
    return comparisons, sorted(only_a), sorted(only_b)


def _loss(metrics: dict[str, Any]) -> float | None:
    """The metric the table shows: ``loss``, else the first numeric one with "loss" in
    its name, else the first numeric one."""
    numeric = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name in ["loss", *(k for k in numeric if "loss" in k.lower()), *numeric]:
        if name in numeric:
            return float(numeric[name])
    return None


def _report(a: Run, a2: Run | None, b1: Run, b2: Run, kill: KillPoint, twice: bool,
            seconds: dict[str, float]) -> ResumeReport:
    resumed_from = b2.restored()
    after = set(b2.committed())
    comparisons, only_a, only_b = _compare_runs(a.root, b2.root)
    rows = [StepRow(key, c.step, _loss(c.metrics_a), _loss(c.metrics_b),
                    len(c.differences), c.identical,
                    "after the resume" if c.step in after else "before the kill")
            for key, c in comparisons]
    report = ResumeReport("identical", kill, resumed_from, rows, only_in_a=only_a,
                          only_in_b=only_b, seconds=seconds, twice=twice,
                          runs=sorted({key for key, _ in comparisons}))
    if a2 is not None:
        again, _, _ = _compare_runs(a.root, a2.root, stop_at_first=True)
        differing = [c for _, c in again if not c.identical]
        if differing:
            report.verdict, report.first_difference_run = "nondeterministic", "A'"
            report.first_difference = differing[0]
            report.causes = [nondeterministic(differing[0].step, "run A'", differing[0])]
            return report
    before = [c for _, c in comparisons if c.step not in after and not c.identical]
    if before:
        report.verdict, report.first_difference = "nondeterministic", before[0]
        report.causes = [nondeterministic(before[0].step, "run B (before the kill)", before[0])]
        return report
    diverged = [c for _, c in comparisons if not c.identical]
    if diverged:
        report.verdict, report.first_difference = "diverged", diverged[0]
        report.causes = diagnose(diverged[0], a=a, b=b2, twice=twice)
    elif only_a or only_b:
        report.verdict = "diverged"
        report.causes = [Cause("steps-differ", (
            "the resumed run committed different step numbers than the uninterrupted one: "
            "the step counter (or the save schedule) is kept outside the state"))]
    return report
