"""torchkeep check-resume and torchkeep.testing.check_resume, on real training processes.

tests/resume_script.py is the training script: good, or broken in one way per variant.
Every check runs it three times (run A, run B killed, run B resumed) in fresh processes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import torchkeep
from conftest import quiet_env
from resume_script import train
from torchkeep.manager import check_hooks
from torchkeep.testing import check_command, check_resume
from torchkeep.testing.compare import compare_step
from torchkeep.testing.diagnose import diagnose
from torchkeep.testing.runner import Run

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = [sys.executable, os.path.join(HERE, "resume_script.py"), "runs/checked"]
ENV = quiet_env()


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchkeep", "check-resume", *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


def check(variant: str, *extra: str, **kwargs: object):
    return check_command([*SCRIPT, "--variant", variant, "--epochs", "2", *extra],
                         env=ENV, timeout=300, **kwargs)


# -- good scripts pass ------------------------------------------------------------------


def test_good_script_is_bit_identical_through_the_cli_with_json() -> None:
    done = cli("--kill-at", "random", "--seed", "3", "--json", "--", *SCRIPT, "--epochs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "identical"
    assert report["compared"] == 16  # 2 epochs x 8 steps, every one committed and compared
    assert all(row["identical"] for row in report["steps"])
    assert report["kill"]["seed"] == 3 and not report["kill"]["during_save"]
    assert report["resumed_from"] == report["kill"]["step"]
    phases = {row["phase"] for row in report["steps"]}
    assert phases == {"before the kill", "after the resume"}
    assert "run A (uninterrupted) ... done" in done.stderr


def test_workers_async_and_a_kill_during_the_save_in_flight(tmp_path) -> None:
    report = check("good", "--workers", "2", "--async", kill_at=9, during_save=True,
                   keep=str(tmp_path))
    assert report.identical, report.explain()
    assert report.kill.step == 9 and report.kill.during_save
    # step 9's save was in flight when the kill landed: the resume starts at step 8
    assert report.resumed_from == 8
    events = [json.loads(line) for line in (tmp_path / "B1.events.jsonl").read_text().splitlines()]
    paused = [e for e in events if e["event"] == "paused"]
    assert paused and paused[0]["step"] == 9 and paused[0]["committed"] is False
    assert 9 not in [e["step"] for e in events if e["event"] == "committed"]
    assert all(e["async"] for e in events if e["event"] == "committed")
    resumed = [json.loads(line)
               for line in (tmp_path / "B2.events.jsonl").read_text().splitlines()]
    assert next(e["step"] for e in resumed if e["event"] == "committed") == 9
    assert {row.step for row in report.rows} == set(range(16))


def test_python_api_with_a_picklable_function() -> None:
    report = check_resume(functools.partial(train, epochs=2), kill_at=5, env=ENV, timeout=300)
    report.assert_identical()
    assert report.compared == 16 and report.resumed_from == 5


def test_steps_stops_every_run_cleanly() -> None:
    report = check("good", steps=6, kill_at=2)
    assert report.identical, report.explain()
    assert [row.step for row in report.rows] == [0, 1, 2, 3, 4, 5]


# -- broken scripts are diagnosed ---------------------------------------------------------


def test_missing_rng_state_is_diagnosed_through_the_cli() -> None:
    done = cli("--kill-at", "9", "--", *SCRIPT, "--variant", "no-rng", "--epochs", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "RESULT: diverged at step 10 (the first step after the resume)" in done.stdout
    assert "first difference: model/" in done.stdout
    assert "likely cause: state saved without torchkeep.RNGState()" in done.stdout


@pytest.mark.parametrize(("variant", "cause"), [
    ("loader", "data-loader"),
    ("scheduler", "lr-schedule"),
    ("outside", "outside-state"),
])
def test_broken_variants_get_their_cause(variant: str, cause: str) -> None:
    report = check(variant, kill_at=9)
    assert report.verdict == "diverged", report.explain()
    assert report.first_difference is not None and report.first_difference.step == 10
    assert report.causes[0].code == cause, report.explain()
    assert report.rows[9].identical  # steps before the kill agree: the resume broke it


def test_loader_cause_names_the_sampler_and_workers() -> None:
    report = check("loader", "--workers", "2", kill_at=9)
    assert report.causes[0].code == "data-loader", report.explain()
    assert "DataLoader(num_workers=2) with RandomSampler" in report.causes[0].message


def test_nondeterministic_script_is_not_judged_with_twice() -> None:
    report = check("clock", twice=True, kill_at=9)
    assert report.verdict == "nondeterministic", report.explain()
    assert report.first_difference_run == "A'"
    assert report.causes[0].code == "nondeterministic"
    assert "torch.use_deterministic_algorithms" in report.causes[0].message
    assert "resume cannot be judged" in report.result_line()


def test_the_demo_points_at_check_resume() -> None:
    done = subprocess.run([sys.executable, "-m", "torchkeep", "demo", "--seed", "1"],
                          capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical: True" in done.stdout
    assert "torchkeep check-resume --kill-at random -- python train.py" in done.stdout


# -- failures, usage and processes --------------------------------------------------------


def test_a_failing_script_exits_3_with_its_output(tmp_path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('loading data...')\nsys.exit('no such dataset')\n")
    done = cli("--", sys.executable, str(script))
    assert done.returncode == 3
    assert "no such dataset" in done.stderr and "loading data..." in done.stderr
    assert "run A (uninterrupted) failed with exit code 1" in done.stderr


def test_a_script_without_a_manager_exits_3(tmp_path) -> None:
    done = cli("--", sys.executable, "-c", "print('trained')")
    assert done.returncode == 3
    assert "committed no step" in done.stderr


def test_usage_errors_exit_2() -> None:
    done = cli("--kill-at", "99", "--", *SCRIPT, "--epochs", "1")
    assert done.returncode == 2
    assert "--kill-at 99: run A's last committed step is 7" in done.stderr
    assert cli("--kill-at", "soon", "--", "true").returncode == 2
    assert cli().returncode == 2  # no command


def test_keep_must_be_a_new_or_empty_folder(tmp_path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "A").mkdir()
    with pytest.raises(ValueError, match="not empty"):
        check_command(["true"], keep=str(tmp_path / "old"))


HANGS = textwrap.dedent("""
    import subprocess, sys, time, torch, torchkeep
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(sys.argv[1], "w").write(str(child.pid))
    with torchkeep.CheckpointManager("runs/h") as mgr:
        mgr.save(0, {"w": torch.zeros(2)})
        time.sleep(300)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its parent is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_hanging_script_times_out_and_leaves_no_process(tmp_path) -> None:
    script, pidfile = tmp_path / "hangs.py", tmp_path / "pid"
    script.write_text(HANGS)
    started = time.monotonic()
    done = cli("--timeout", "20", "--", sys.executable, str(script), str(pidfile))
    assert done.returncode == 3, done.stderr
    assert "did not finish within 20 s" in done.stderr
    assert time.monotonic() - started < 120
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


# -- the manager's side, in process --------------------------------------------------------


def test_manager_hooks_redirect_keep_every_step_and_stop(tmp_path, monkeypatch) -> None:
    root, report = tmp_path / "check", tmp_path / "events.jsonl"
    monkeypatch.setenv(check_hooks.ENV_DIR, str(root))
    monkeypatch.setenv(check_hooks.ENV_REPORT, str(report))
    monkeypatch.setenv(check_hooks.ENV_STOP_AFTER, "2")
    asked = tmp_path / "where-the-script-said"
    mgr = torchkeep.CheckpointManager(asked, keep_last=1)
    assert mgr.root == os.path.join(str(root), check_hooks.run_key(str(asked)))
    mgr.save(0, {"w": torch.zeros(3), "rng": torchkeep.RNGState()}, metrics={"loss": 1.0})
    mgr.save(1, {"w": torch.ones(3), "rng": torchkeep.RNGState()})
    with pytest.raises(SystemExit) as stopped:
        mgr.save(2, {"w": torch.ones(3), "rng": torchkeep.RNGState()})
    assert stopped.value.code == 0
    assert mgr.all_steps() == [0, 1, 2]  # keep_last=1 is not applied while checked
    assert not asked.exists()
    state = {"w": None, "rng": torchkeep.RNGState()}
    assert mgr.restore(state, step=1) == 1
    assert torch.equal(mgr.load(0)["w"], torch.zeros(3))  # a load is reported too
    mgr.close()
    events = [json.loads(line) for line in report.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["opened", "committed", "committed", "committed", "stopping", "restored",
                     "restored"]
    first = events[1]
    assert first["state"]["rng"]["kind"] == "rng" and first["state"]["w"]["kind"] == "value"
    assert set(first["rng"]) >= {"python", "numpy", "torch"}
    assert "loaders" in first and "loaders" not in events[2]  # scanned once per process


def test_manager_without_the_variables_is_unchanged(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(check_hooks.ENV_DIR, raising=False)
    with torchkeep.CheckpointManager(tmp_path / "run", keep_last=1) as mgr:
        for step in range(3):
            mgr.save(step, {"w": torch.zeros(1)})
    assert mgr.all_steps() == [2]


def test_compare_is_bit_for_bit() -> None:
    def one(a: object, b: object) -> list[str]:
        return [d.kind for d in compare_step(0, {"x": a}, {"x": b}, metrics_a={},
                                             metrics_b={}).differences]

    nan = np.array([np.nan, 1.0], dtype=np.float32)
    assert one(nan, nan.copy()) == []
    assert one(np.array([0.0]), np.array([-0.0])) == ["value"]
    assert one(np.zeros(2, np.float32), np.zeros(2, np.float64)) == ["dtype"]
    assert one(np.zeros(2), np.zeros(3)) == ["shape"]
    assert one(0.0, -0.0) == ["value"] and one(float("nan"), float("nan")) == []
    assert one(1, 1.0) == ["type"]
    diff = compare_step(0, {"x": np.array([1.0, 2.0])}, {"x": np.array([1.0, 2.5])},
                        metrics_a={"loss": 1.0}, metrics_b={"loss": 1.5})
    assert diff.differences[0].max_abs_diff == 0.5
    assert diff.metric_differences == ["loss"] and not diff.identical


@pytest.mark.parametrize("variant", ["good", "no-rng"])
def test_under_torchrun_all_ranks_are_killed_and_resumed(tmp_path, variant: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.join(HERE, "resume_dist_script.py"), variant]
    report = check_command(command, kill_at=5, env=ENV, timeout=300, keep=str(tmp_path))
    events = [json.loads(line) for line in (tmp_path / "B1.events.jsonl").read_text().splitlines()]
    assert {e["rank"] for e in events if e["event"] == "paused"} == {0, 1}
    assert {e["world_size"] for e in events if e["event"] == "opened"} == {2}
    assert report.resumed_from == 5 and report.compared == 12
    if variant == "good":
        assert report.identical, report.explain()
    else:
        assert report.verdict == "diverged" and report.causes[0].code == "rng-missing"
    ranks = {int(e["pid"]) for e in events}
    assert not [pid for pid in ranks if _alive(pid)]


def _run_with(step: int, *, rng: str, state: dict[str, str], scan: dict[str, object]) -> Run:
    run = Run("r", "root", "stem")
    run.events.append({"event": "committed", "step": step, "rank": 0,
                       "rng": {"torch": rng, "python": "p"},
                       "state": {k: {"kind": v} for k, v in state.items()}, **scan})
    return run


@pytest.mark.parametrize(("scan", "state", "rng_b", "code"), [
    ({"loaders": [], "outside_state": [{"kind": "optimizer", "class": "torch.optim.adamw.AdamW"}]},
     {"model": "module", "rng": "rng"}, "t", "optimizer-missing"),
    ({"loaders": [{"num_workers": 2, "sampler": "ResumableSampler", "shuffles": True,
                   "sampler_in_state": True, "loader_in_state": False,
                   "consumed_recorded": True}]},
     {"model": "module", "rng": "rng", "sampler": "sampler"}, "t", "worker-seeds"),
    ({"loaders": [{"num_workers": 2, "sampler": "ResumableSampler", "shuffles": True,
                   "sampler_in_state": True, "loader_in_state": False,
                   "consumed_recorded": False}]},
     {"model": "module", "rng": "rng", "sampler": "sampler"}, "t", "data-loader"),
    ({"loaders": []}, {"model": "module", "rng": "rng"}, "other", "rng-drawn"),
    ({"loaders": []}, {"model": "module", "rng": "rng"}, "t", "outside-state"),
])
def test_diagnosis_rules_on_recorded_facts(scan, state, rng_b, code) -> None:
    first = compare_step(4, {"model": {"w": np.zeros(2)}}, {"model": {"w": np.ones(2)}},
                         metrics_a={}, metrics_b={})
    a = _run_with(4, rng="t", state=state, scan=scan)
    b = _run_with(4, rng=rng_b, state=state, scan=scan)
    causes = diagnose(first, a=a, b=b, twice=True)
    assert causes[0].code == code, causes
