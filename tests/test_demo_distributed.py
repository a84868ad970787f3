"""``torchkeep demo --distributed``: the demo passes on real gloo ranks, and its checks can fail."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

from torchkeep.cli.main import main  # noqa: E402
from torchkeep.demo import distributed as demo  # noqa: E402


def test_the_demo_kills_resumes_reshards_and_proves_bit_identity() -> None:
    lines: list[str] = []
    assert demo.run_distributed_demo(lines.append, seed=6, steps=12)
    out = "\n".join(lines)
    assert re.search(r"1\. uninterrupted run, 2 ranks\s+12/12 steps", out)
    killed = re.search(r"2\. run, SIGKILL mid-training\s+(\d+)/12 steps", out)
    assert killed and 0 < int(killed.group(1)) < 12
    assert re.search(r"3\. new processes resume, 2 ranks\s+12/12 steps", out)
    kill = re.search(r"the parent sent SIGKILL to both rank processes \(pids (\d+), (\d+)\).*"
                     r"exit codes \[-9, -9\]", out)
    assert kill and kill.group(1) != kill.group(2)
    committed = re.search(r"committed steps on disk: ([\d, ]+) \(keep_last=3\)", out)
    assert committed
    steps = [int(s) for s in committed.group(1).split(", ")]
    # keep_last=3 (one more when the kill fell between a commit and its retention pass)
    assert len(steps) in (3, 4) and steps == list(range(steps[0], steps[-1] + 1))
    resumed = re.search(r"resumed from step (\d+): steps (\d+)\.\.11 ran again", out)
    assert resumed and int(resumed.group(1)) == steps[-1]
    assert int(resumed.group(2)) == steps[-1] + 1
    assert re.search(r"all 2 x \d+ resumed losses bit-identical: yes", out)
    assert "uninterrupted vs resumed: bit-identical: yes" in out
    assert "step 11 saved on 2 ranks, loaded on 3 (DCP resharding, fresh model and optimizer): " \
        "full state bit-identical: yes" in out
    assert "global position 384 of epoch 0 (expected 384): yes" in out
    assert "NO" not in out and "differs:" not in out
    assert re.search(r"demo took \d+\.\d s", out)


def test_the_comparison_finds_every_kind_of_difference() -> None:
    a = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)},
         "optimizer": {"state": {"w": {"step": torch.tensor(3.0)}},
                       "param_groups": [{"lr": 1e-3, "params": ["w", "b"]}]}}

    def changed(edit: Callable[[Any], object]) -> Any:
        b = copy.deepcopy(a)
        edit(b)
        return b

    assert demo.compare_states(a, changed(lambda b: None)) == []
    one_ulp = changed(lambda b: b["model"]["w"].view(-1)[4].copy_(
        torch.nextafter(torch.tensor(4.0), torch.tensor(5.0))))
    assert demo.compare_states(a, one_ulp) == ["model.w: values differ"]
    negative_zero = changed(lambda b: b["model"]["b"].mul_(-1))
    assert demo.compare_states(a, negative_zero) == ["model.b: equal values, different bits"]
    as_double = changed(lambda b: b["model"].__setitem__("b", torch.zeros(3, dtype=torch.float64)))
    assert demo.compare_states(a, as_double) == ["model.b: torch.float32[3] vs torch.float64[3]"]
    assert demo.compare_states(a, changed(lambda b: b["optimizer"]["param_groups"][0]
                                          .__setitem__("lr", 2e-3))) == \
        ["optimizer.param_groups[0].lr: 0.001 vs 0.002"]
    assert demo.compare_states(a, changed(lambda b: b["optimizer"]["state"].pop("w"))) == \
        ["optimizer.state: keys differ (['w'])"]
    assert demo.compare_states(a, changed(lambda b: b["optimizer"]["state"]["w"]
                                          .__setitem__("step", 3.0))) == \
        ["optimizer.state.w.step: a tensor and a float"]


def test_the_cli_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int | None] = []

    def fake(echo: object, *, seed: int | None = None) -> bool:
        calls.append(seed)
        return False  # a failed check: exit 1

    monkeypatch.setattr(demo, "run_distributed_demo", fake)
    assert main(["demo", "--distributed", "--seed", "5"]) == 1
    assert calls == [5]
    assert main(["demo", "--distributed", "--files"]) == 2
    assert calls == [5]
