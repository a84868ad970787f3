"""Real processes: SIGKILL at random moments, SIGTERM preemption, bit-exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import asdict

import pytest
import torch

import torchkeep
from conftest import quiet_env
from torchkeep.demo.train import TrainConfig, train

ENV = quiet_env()

WRITER = textwrap.dedent("""
    import sys, torch, torchkeep
    run = sys.argv[1]
    with torchkeep.CheckpointManager(run, keep_last=3) as mgr:
        step = (mgr.latest_step() or 0) + 1
        print("ready", flush=True)
        while True:
            state = {"w": torch.full((1 << 20,), float(step)), "step": step,
                     "tail": torch.arange(step + 1)}
            mgr.save(step, state, metrics={"step": step})
            step += 1
""")


def _check_run(run: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leftovers of the killed save are reported
        mgr = torchkeep.CheckpointManager(run, keep_last=3)
    steps = mgr.all_steps()
    assert steps, "no committed step survived"
    for step in steps:
        state = {"w": None, "step": None, "tail": None}
        assert mgr.restore(state, step=step) == step
        assert state["step"] == step
        assert torch.equal(state["w"], torch.full((1 << 20,), float(step)))
        assert torch.equal(state["tail"], torch.arange(step + 1))
    assert not [n for n in os.listdir(run) if n.startswith(".")]
    mgr.close()
    return steps[-1]


def test_sigkill_at_random_moments_never_loses_a_commit(tmp_path) -> None:
    run = str(tmp_path / "run")
    rng = random.Random(1234)
    latest = 0
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, run], stdout=subprocess.PIPE,
                                  text=True, env=ENV)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.6))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert writer.returncode == -signal.SIGKILL
        if latest == 0 and not os.path.exists(run):
            continue
        newest = _check_run(run)
        assert newest >= latest
        latest = newest
    assert latest > 0


def _train_process(run: str, config: TrainConfig, out: str, *extra: str) -> dict:
    subprocess.run(
        [sys.executable, "-m", "torchkeep.demo.train", run, "--json", out,
         "--config", json.dumps(asdict(config)), *extra],
        check=True, env=ENV, capture_output=True, timeout=300,
    )
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize(
    ("config", "stop_after"),
    [
        (TrainConfig(samples=256, epochs=3, save_every=5), 13),  # resumes mid-epoch (step 9)
        (TrainConfig(samples=256, epochs=3, save_every=8), 16),  # resumes at an epoch boundary
    ],
)
def test_resume_in_a_new_process_is_bit_identical(tmp_path, config, stop_after) -> None:
    reference = train(config, str(tmp_path / "reference"))
    run = str(tmp_path / "run")
    first = _train_process(run, config, str(tmp_path / "a.json"), "--stop-after", str(stop_after))
    assert first["resumed_from"] is None
    second = _train_process(run, config, str(tmp_path / "b.json"))
    resumed_from = second["resumed_from"]
    assert resumed_from is not None and resumed_from <= stop_after
    losses = {int(k): v for k, v in second["losses"].items()}
    assert sorted(losses) == list(range(resumed_from + 1, config.total_steps))
    for step, loss in losses.items():
        assert loss == reference.losses[step], f"step {step} diverged"
    assert second["digest"] == reference.digest


def test_sigterm_saves_at_the_next_step_boundary_and_exits_cleanly(tmp_path) -> None:
    config = TrainConfig(samples=2048, epochs=2, save_every=1000)
    run = str(tmp_path / "run")
    out = str(tmp_path / "out.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "torchkeep.demo.train", run, "--json", out,
         "--config", json.dumps(asdict(config))],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if int(line.split()[1]) >= 5:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 0
    with open(out) as f:
        result = json.load(f)
    assert result["preempted"] == signal.SIGTERM
    last = max(int(k) for k in result["losses"])
    assert last < config.total_steps - 1, "the run finished instead of stopping"
    with torchkeep.CheckpointManager(run) as mgr:
        assert mgr.latest_step() == last
    assert rest.count("step") <= 2  # stopped within a step of the signal
