"""``torchkeep check-resume -- COMMAND``: does a training script resume bit-exactly?"""

from __future__ import annotations

import json

import click

__all__ = ["check_resume_command"]


def _kill_at(value: str) -> int | str:
    if value == "random":
        return value
    try:
        step = int(value)
    except ValueError:
        raise click.BadParameter("a step number or 'random'") from None
    if step < 0:
        raise click.BadParameter("a step number must not be negative")
    return step


@click.command("check-resume", context_settings={"ignore_unknown_options": True,
                                                "allow_interspersed_args": False})
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Stop each run once it commits step N-1 (default: let the script end).")
@click.option("--kill-at", "kill_at", default="random", show_default=True,
              help="SIGKILL run B after this step commits, or 'random' (seed printed).")
@click.option("--during-save", is_flag=True,
              help="Kill while that step's save is in flight (written, not committed).")
@click.option("--twice", is_flag=True,
              help="Run A twice first: tells a nondeterministic script from a bad resume.")
@click.option("--seed", type=int, default=None, help="Seed of --kill-at random.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds allowed to each run.")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Keep the runs' steps, events and output in this folder.")
@click.option("--all-steps", is_flag=True, help="Print every compared step.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def check_resume_command(steps: int | None, kill_at: str, during_save: bool, twice: bool,
                         seed: int | None, timeout: float, keep: str | None, all_steps: bool,
                         as_json: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND uninterrupted (run A), then SIGKILL it and resume it (run B), and
    compare every step both runs committed through CheckpointManager, bit for bit.

    Exit 0 when identical, 1 when they diverged (with the first difference and its
    likely cause), 2 for usage errors, 3 when the script failed.
    """
    from torchkeep.testing.check import check_command

    where = _kill_at(kill_at)
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        report = check_command(list(command), steps=steps, kill_at=where,
                               during_save=during_save, twice=twice, seed=seed,
                               timeout=timeout, keep=keep, progress=say)
    except ValueError as e:
        from torchkeep.errors import TorchkeepError

        if isinstance(e, TorchkeepError):  # FormatError is a ValueError too
            raise
        raise click.UsageError(str(e)) from e
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.explain(full=all_steps))
    if not report.identical:
        raise SystemExit(1)
