"""The main demo: kill a training process with SIGKILL, resume it, and prove nothing changed.

Three real processes train the seed model (``python -m torchkeep.demo.train``):
an uninterrupted reference run; a run that is SIGKILLed in the middle of training; and
a fresh process that resumes the killed run from its latest commit. The resumed run's
losses and final weights must be bit-identical to the reference.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from torchkeep.demo.train import TrainConfig
from torchkeep.manager.rundir import RunDirectory

__all__ = ["run_resume_demo"]


def _run(
    run_dir: str,
    out: str | None,
    config: TrainConfig,
    label: str,
    echo: Callable[[str], None],
    kill_at: int | None = None,
) -> dict[str, Any] | None:
    """Run one training process, with a progress bar; SIGKILL it after step ``kill_at``."""
    command = [sys.executable, "-m", "torchkeep.demo.train", run_dir,
               "--config", json.dumps(asdict(config))]
    if out:
        command += ["--json", out]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    assert process.stdout is not None
    killed_at = None
    interactive = sys.stderr.isatty()
    last_step = -1
    with tqdm(total=config.total_steps, desc=label, unit="step", leave=True,
              disable=not interactive,
              bar_format="{desc:<34} {bar:20} {n_fmt:>2}/{total_fmt} steps") as bar:
        for line in process.stdout:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "step":
                step = int(parts[1])
                last_step = step
                bar.n = step + 1
                bar.refresh()
                if kill_at is not None and step >= kill_at:
                    process.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
    process.wait()
    if not interactive:
        echo(f"{label:<34} {last_step + 1:>2}/{config.total_steps} steps")
    stderr = process.stderr.read() if process.stderr else ""
    if kill_at is not None:
        if killed_at is None:
            raise RuntimeError(f"the run ended before step {kill_at}:\n{stderr}")
        return {"killed_at": killed_at, "returncode": process.returncode}
    if process.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{stderr}")
    with open(out or "", encoding="utf-8") as f:
        result: dict[str, Any] = json.load(f)
    return result


def run_resume_demo(echo: Callable[[str], None] = print, *, seed: int | None = None) -> bool:
    """Run the three processes and print the comparison; True when bit-identical."""
    config = TrainConfig()
    rng = random.Random(seed)
    kill_at = rng.randrange(config.total_steps // 3, 2 * config.total_steps // 3)
    started = time.perf_counter()
    echo(f"seed model, synthetic CIFAR-like data ({config.samples} images), "
         f"{config.epochs} epochs x {config.steps_per_epoch} steps, shuffled loader, dropout, "
         "random flips (python) and noise (numpy), StepLR, SGD momentum")
    echo(f"CheckpointManager(keep_last={config.keep_last}, keep_best=1 by loss), "
         f"commit every {config.save_every} steps\n")
    with tempfile.TemporaryDirectory(prefix="torchkeep-demo-") as tmp:
        reference = _run(os.path.join(tmp, "reference"), os.path.join(tmp, "a.json"), config,
                         "1. uninterrupted run", echo)
        interrupted_dir = os.path.join(tmp, "interrupted")
        kill = _run(interrupted_dir, None, config, "2. run, SIGKILL mid-training",
                    echo, kill_at=kill_at)
        assert kill is not None and reference is not None
        committed = RunDirectory(interrupted_dir, create=False).steps()
        resumed = _run(interrupted_dir, os.path.join(tmp, "b.json"), config,
                       "3. new process resumes", echo)
        assert resumed is not None
    steps_on_disk = ", ".join(map(str, committed))
    echo(f"\nkilled (SIGKILL, exit {kill['returncode']}) after step {kill['killed_at']}; "
         f"committed steps on disk: {steps_on_disk}")
    echo(f"resumed from step {resumed['resumed_from']}: steps "
         f"{resumed['resumed_from'] + 1}..{config.total_steps - 1} ran again in a new process\n")
    ref_losses = {int(k): v for k, v in reference["losses"].items()}
    new_losses = {int(k): v for k, v in resumed["losses"].items()}
    echo(f"{'step':>5}  {'uninterrupted loss':>20}  {'resumed loss':>20}  bit-identical")
    shown = sorted(new_losses)
    for i, step in enumerate(shown):
        if len(shown) > 8 and 4 <= i < len(shown) - 3:
            if i == 4:
                echo(f"{'...':>5}")
            continue
        a, b = ref_losses[step], new_losses[step]
        echo(f"{step:>5}  {a:>20.17f}  {b:>20.17f}  {'yes' if a == b else 'NO'}")
    losses_equal = all(ref_losses[s] == v for s, v in new_losses.items())
    weights_equal = reference["digest"] == resumed["digest"]
    echo(f"\nall {len(new_losses)} resumed losses identical: {losses_equal}")
    echo(f"final parameters sha256: uninterrupted {reference['digest'][:16]}..., "
         f"resumed {resumed['digest'][:16]}...  identical: {weights_equal}")
    echo(f"demo took {time.perf_counter() - started:.1f} s")
    echo("\nthe same check for your own training script (it uses CheckpointManager as "
         "usual; no change needed):\n  torchkeep check-resume --kill-at random -- "
         "python train.py ...   (docs/check-resume.md)")
    return losses_equal and weights_equal
