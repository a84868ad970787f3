"""Entry point of the ``torchkeep`` command: sub-commands, error handling, exit codes."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from torchkeep.cli.check_resume import check_resume_command
from torchkeep.cli.files import (
    convert_command,
    diff_command,
    inspect_command,
    scan_command,
    verify_command,
)
from torchkeep.cli.remote_option import with_storage_options
from torchkeep.cli.runs import ls_command, prune_command
from torchkeep.errors import TorchkeepError

__all__ = ["cli", "main"]

EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="torchkeep")
def cli() -> None:
    """Safe, fast, crash-proof PyTorch checkpoints."""


@cli.command()
@click.option("--files", is_flag=True,
              help="Instead: save the seed checkpoint in each format and read it back every way.")
@click.option("--distributed", is_flag=True,
              help="Instead: SIGKILL a 2-rank FSDP2 run, resume it on 2 ranks, load it on 3.")
@click.option("--seed", type=int, default=None, help="Fix where the run is killed.")
def demo(files: bool, distributed: bool, seed: int | None) -> None:
    """Train the seed model, SIGKILL it mid-run, resume, and prove the result bit-identical."""
    if files and distributed:
        raise click.UsageError("--files and --distributed are mutually exclusive")
    if files:
        from torchkeep.demo.files import run_files_demo

        ok = run_files_demo(click.echo)
    elif distributed:
        from torchkeep.demo.distributed import run_distributed_demo

        ok = run_distributed_demo(click.echo, seed=seed)
    else:
        from torchkeep.demo.resume import run_resume_demo

        ok = run_resume_demo(click.echo, seed=seed)
    if not ok:
        raise SystemExit(1)


for _command in (inspect_command, diff_command, convert_command, scan_command, verify_command,
                 ls_command, prune_command):
    cli.add_command(with_storage_options(_command))
cli.add_command(check_resume_command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; TorchkeepErrors become one-line messages and exit codes."""
    try:
        cli.main(args=argv, prog_name="torchkeep", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as e:
        e.show()
        return EXIT_USAGE
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except TorchkeepError as e:
        output = getattr(e, "output", "")
        if output:  # a script check-resume ran failed: its last lines first
            click.echo(output, err=True)
        click.echo(f"torchkeep: error: {e}", err=True)
        return e.exit_code
    except SystemExit as e:
        code: Any = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    except Exception as e:  # a bug: one line unless asked for the traceback
        if os.environ.get("TORCHKEEP_DEBUG"):
            raise
        click.echo(f"torchkeep: internal error: {type(e).__name__}: {e} "
                   "(set TORCHKEEP_DEBUG=1 for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
