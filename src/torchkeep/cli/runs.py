"""The run-directory commands: ls and prune (torch-free)."""

from __future__ import annotations

from typing import Any

import click

from torchkeep.cli.render import echo_json, human_bytes

__all__ = ["ls_command", "prune_command"]


def _policy_options(func: Any) -> Any:
    for option in reversed([
        click.option("--keep-last", type=click.IntRange(min=1), default=None,
                     help="Keep the newest N steps."),
        click.option("--keep-best", type=click.IntRange(min=1), default=None,
                     help="Keep the K best steps by --metric."),
        click.option("--metric", default=None, help="Metric for --keep-best."),
        click.option("--mode", type=click.Choice(["min", "max"]), default="min",
                     show_default=True, help="Whether lower or higher --metric is better."),
        click.option("--keep-every-steps", type=click.IntRange(min=1), default=None,
                     help="Keep every step that is a multiple of S."),
    ]):
        func = option(func)
    return func


def _spec(run: Any, steps: list[int], keep_last: int | None, keep_best: int | None,
          metric: str | None, mode: str, keep_every_steps: int | None) -> tuple[Any, str]:
    """The retention settings: from the flags, else those the newest of ``steps`` recorded."""
    from torchkeep.formats.manifest import read_manifest
    from torchkeep.manager.policy_spec import RetentionSpec

    if keep_best is not None and metric is None:
        raise click.UsageError("--keep-best needs --metric")
    recorded = None
    if steps:
        recorded = RetentionSpec.from_fields(
            read_manifest(run.fs, run.step_path(steps[-1]), verify=False).get("retention"))
    if any(v is not None for v in (keep_last, keep_best, keep_every_steps)):
        if metric is None and recorded is not None and recorded.best_metric is not None:
            # the run's own best step stays protected even when the flags do not name it
            metric, mode = recorded.best_metric, recorded.best_mode
        return RetentionSpec(keep_last=keep_last, keep_best=keep_best, best_metric=metric,
                             best_mode=mode, keep_every_steps=keep_every_steps), "flags"  # type: ignore[arg-type]
    if recorded is not None:
        return recorded, f"recorded by step {steps[-1]}"
    return RetentionSpec(best_metric=metric, best_mode=mode), "none"  # type: ignore[arg-type]


@click.command("ls")
@click.argument("run_dir")
@_policy_options
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON shape.")
def ls_command(run_dir: str, keep_last: int | None, keep_best: int | None, metric: str | None,
               mode: str, keep_every_steps: int | None, as_json: bool) -> None:
    """List a run directory's committed steps: metrics, sizes, and why each is kept.

    "own" is the bytes of a step's own files, "shared" the bytes of its chunks that lie in
    files earlier steps wrote (incremental runs); deleting a step frees its own bytes
    once no kept step shares them.

    The retention policy is the one given by the flags, else the one the newest step
    recorded when the CheckpointManager saved it.
    """
    from torchkeep.manager.retention import StepInfo, plan_retention
    from torchkeep.manager.rundir import RunDirectory

    run = RunDirectory(run_dir, create=False)
    steps, leftovers = run.scan()  # one listing and one manifest read per step serve it all
    leftovers += [f"chunks/{n}" for n in run.unreferenced_chunks(newer=True) or ()]
    spec, origin = _spec(run, steps, keep_last, keep_best, metric, mode, keep_every_steps)
    summaries = [run.summary(step) for step in steps]
    plan = plan_retention([StepInfo(s.step, s.metrics) for s in summaries], spec.policy(),
                          best_metric=spec.best_metric, best_mode=spec.best_mode)
    if as_json:
        echo_json({
            "run_dir": run.name,
            "retention": {"policy": spec.describe(), "source": origin},
            "steps": [{"step": s.step, "path": s.path, "metrics": s.metrics, "bytes": s.nbytes,
                       "shared_bytes": s.shared_bytes, "created": s.created,
                       "tensors": s.tensors,
                       "kept": s.step in plan.keep, "reason": plan.keep.get(s.step)}
                      for s in summaries],
            "leftovers": leftovers,
        })
        return
    click.echo(f"{run.name}: {len(summaries)} committed steps; retention: {spec.describe()}"
               + (f" ({origin})" if origin != "none" else ""))
    metric_names = sorted({k for s in summaries for k in s.metrics})
    header = f"{'step':>8}  {'created':<25} {'own':>10} {'shared':>10}  " + "".join(
        f"{m:>12}  " for m in metric_names) + "status"
    click.echo(header)
    for s in summaries:
        metrics = "".join(f"{_fmt(s.metrics.get(m)):>12}  " for m in metric_names)
        status = f"kept: {plan.keep[s.step]}" if s.step in plan.keep else "would be pruned"
        click.echo(f"{s.step:>8}  {s.created or '':<25} {human_bytes(s.nbytes):>10} "
                   f"{human_bytes(s.shared_bytes):>10}  {metrics}{status}")
    if leftovers:
        click.echo(f"leftovers of interrupted saves (removed when a manager opens the run): "
                   f"{', '.join(leftovers)}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@click.command("prune")
@click.argument("run_dir")
@_policy_options
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) deleted.")
def prune_command(run_dir: str, keep_last: int | None, keep_best: int | None,
                  metric: str | None, mode: str, keep_every_steps: int | None, dry_run: bool,
                  as_json: bool) -> None:
    """Delete the steps a retention policy does not keep (the manager's own policies;
    the newest step and the best step, by --metric or else by the metric the run recorded,
    are never deleted)."""
    from torchkeep.manager.rundir import RunDirectory

    run = RunDirectory(run_dir, create=False)
    spec, origin = _spec(run, run.steps(), keep_last, keep_best, metric, mode,
                         keep_every_steps)
    if spec.empty:
        raise click.UsageError(
            "no retention policy: pass --keep-last, --keep-best/--metric or "
            "--keep-every-steps (this run recorded none)")
    plan = run.plan(spec.policy(), best_metric=spec.best_metric, best_mode=spec.best_mode)
    summaries = {s: run.summary(s) for s in [*plan.keep, *plan.delete]}
    frees = run.reclaimable(plan.delete)
    deleted = [] if dry_run else run.delete(plan.delete)
    if as_json:
        echo_json({"run_dir": run.name, "policy": spec.describe(), "source": origin,
                   "dry_run": dry_run, "would_delete" if dry_run else "deleted":
                       plan.delete if dry_run else deleted,
                   "kept": {str(k): v for k, v in plan.keep.items()},
                   "freed_bytes" if not dry_run else "would_free_bytes": frees,
                   "steps": {str(k): {"bytes": v.nbytes, "shared_bytes": v.shared_bytes}
                             for k, v in summaries.items()}})
        return
    verb = "would delete" if dry_run else "deleted"
    targets = plan.delete if dry_run else deleted
    click.echo(f"{run.name}: policy {spec.describe()} ({origin})")

    def sizes(step: int) -> str:
        summary = summaries[step]
        shared = f", {human_bytes(summary.shared_bytes)} shared" if summary.shared_bytes else ""
        return f"{human_bytes(summary.nbytes)} own{shared}"

    for step in sorted(plan.keep):
        click.echo(f"  keep    {step:>8}  {sizes(step):<28}  {plan.keep[step]}")
    for step in targets:
        click.echo(f"  {verb.rsplit(maxsplit=1)[-1]:<7} {step:>8}  {sizes(step)}")
    click.echo(f"{verb} {len(targets)} of {len(plan.keep) + len(plan.delete)} steps"
               + (f", {'freed' if not dry_run else 'would free'} {human_bytes(frees)}"
                  if targets else ""))
