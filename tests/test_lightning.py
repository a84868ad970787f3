"""torchkeep.integrations.lightning with the real Lightning: a Trainer on CPU checkpointing
through TorchkeepCheckpointIO, SIGKILLed mid-training (and inside a save) and resumed with
ckpt_path="last", losses compared bit for bit with an uninterrupted run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import torchkeep
from hostile import Evil

lightning = pytest.importorskip("lightning", reason="the dev extra installs lightning")

from lightning.fabric.utilities.data import AttributeDict  # noqa: E402

from torchkeep.integrations.lightning import (  # noqa: E402
    RNGStateCallback,
    TorchkeepCheckpointIO,
)

SCRIPT = Path(__file__).with_name("lightning_script.py")


def _run(cfg: dict, *, expect_kill: bool = False) -> None:
    proc = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=300, check=False)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(path: Path) -> dict[int, str]:
    """Global step -> loss (float hex); a step run again after a resume keeps its last value."""
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, loss = json.loads(line)
        out[step] = loss
    return out


def _first_difference(a: dict[int, str], b: dict[int, str]) -> int | None:
    assert sorted(a) == sorted(b), "the runs did not train the same steps"
    return next((s for s in sorted(a) if a[s] != b[s]), None)


#: name -> (settings of both runs, what kills the first, what changes on resume).
#: Checkpointing never changes what a run trains, so the uninterrupted reference depends
#: only on the data loader: "plain" or "stateful".
SCENARIOS: dict[str, tuple[dict, dict, dict]] = {
    # killed in epoch 3 (step 30 of 48); last.ckpt is from the end of epoch 2 (step 24)
    "epoch": ({}, {"kill_at_step": 30}, {}),
    "norng": ({"rng": False}, {"kill_at_step": 30}, {}),
    "mid_stateful": ({"stateful": True, "workers": 1, "every_n_train_steps": 5},
                     {"kill_at_step": 18}, {}),
    "mid_plain": ({"every_n_train_steps": 5}, {"kill_at_step": 18}, {}),
    # killed in the third replacement of last.ckpt: the new file complete, not renamed
    "in_save": ({}, {"kill_in_save": 3}, {}),
    "async": ({"async_save": True}, {"kill_at_step": 30}, {}),
    "to_stock": ({}, {"kill_at_step": 30}, {"plugin": False}),
    "from_stock": ({"plugin": False}, {"kill_at_step": 30}, {"plugin": True}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every scenario's killed-and-resumed run and the references, two processes at a
    time (each run is a fresh process: about 7 s here, most of it importing Lightning)."""
    root = tmp_path_factory.mktemp("lightning")

    def reference(name: str, common: dict) -> dict:
        cfg = {"dir": str(root / f"{name}-ref"), "losses": str(root / f"{name}-ref.losses"),
               **common}
        _run(cfg)
        return {"losses": _losses(Path(cfg["losses"])), "dir": Path(cfg["dir"])}

    def interrupted(name: str) -> dict:
        common, kill, resume = SCENARIOS[name]
        cfg = {"dir": str(root / name), "losses": str(root / f"{name}.losses"), **common}
        _run({**cfg, **kill}, expect_kill=True)
        _run({**cfg, **resume, "ckpt_path": "last"})
        return {"losses": _losses(Path(cfg["losses"])), "dir": Path(cfg["dir"])}

    jobs = {f"ref:{n}": (reference, n, c) for n, c in (
        ("plain", {}), ("stateful", {"stateful": True, "workers": 1}),
        ("lightning_async", {"lightning_async": True}))}
    jobs.update({name: (interrupted, name) for name in SCENARIOS})
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(fn, *args) for key, (fn, *args) in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def _compare(runs: dict, name: str) -> int | None:
    reference = "ref:stateful" if SCENARIOS[name][0].get("stateful") else "ref:plain"
    return _first_difference(runs[reference]["losses"], runs[name]["losses"])


def test_sigkill_then_resume_from_last_is_bit_identical_at_epoch_ends(runs) -> None:
    assert len(runs["ref:plain"]["losses"]) == 48 and _compare(runs, "epoch") is None
    # ModelCheckpoint(save_top_k=2, save_last=True): two best files and last.ckpt
    names = sorted(p.name for p in runs["epoch"]["dir"].iterdir())
    assert len(names) == 3 and "last.ckpt" in names, names


def test_without_the_rng_callback_the_resumed_run_diverges(runs) -> None:
    # dropout, augmentation noise and the shuffled loader draw from the RNGs Lightning's
    # checkpoint leaves out: the first step after the resume already differs
    assert _compare(runs, "norng") == 24


def test_mid_epoch_resume_with_a_stateful_dataloader_is_bit_identical(runs) -> None:
    # a StatefulDataLoader with a worker, checkpoints every 5 steps, killed at step 18
    assert _compare(runs, "mid_stateful") is None


def test_mid_epoch_resume_with_a_plain_dataloader_is_not_exact(runs) -> None:
    # a plain DataLoader restarts its epoch's order: the documented limit
    assert _compare(runs, "mid_plain") == 15


def test_sigkill_inside_a_save_of_last_ckpt_leaves_the_previous_one(runs) -> None:
    # the resume starts from the previous last.ckpt and still matches exactly; the killed
    # save's temporary file is removed by the next save of last.ckpt
    assert _compare(runs, "in_save") is None
    assert not [p for p in os.listdir(runs["in_save"]["dir"]) if "torchkeep-tmp" in p]


def test_async_saving_resumes_bit_identically(runs) -> None:
    assert _compare(runs, "async") is None
    assert len([p for p in runs["async"]["dir"].iterdir() if p.suffix == ".ckpt"]) == 3


def test_lightning_async_wrapper_around_the_plugin(runs) -> None:
    run = runs["ref:lightning_async"]
    assert run["losses"] == runs["ref:plain"]["losses"]
    files = sorted(p for p in run["dir"].iterdir() if p.suffix == ".ckpt")
    assert len(files) == 3
    last = torch.load(run["dir"] / "last.ckpt", weights_only=True)
    assert last["global_step"] == 48


def test_stock_lightning_and_the_plugin_resume_from_each_others_files(runs) -> None:
    assert _compare(runs, "to_stock") is None
    assert _compare(runs, "from_stock") is None


# -- the plugin's calls, in process -----------------------------------------------------

def _checkpoint() -> dict:
    model = torch.nn.Linear(3, 2)
    return {"epoch": 1, "global_step": 10, "pytorch-lightning_version": lightning.__version__,
            "state_dict": model.state_dict(), "optimizer_states": [{"state": {},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}]}], "lr_schedulers": [],
            "callbacks": {"ModelCheckpoint{}": {"best_model_score": torch.tensor(0.5)}},
            "hyper_parameters": AttributeDict(lr=0.1, width=16), "hparams_name": "kwargs",
            "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2}}}}}


def test_files_round_trip_with_stock_torch_load(tmp_path) -> None:
    io = TorchkeepCheckpointIO()
    path = tmp_path / "sub" / "x.ckpt"
    io.save_checkpoint(_checkpoint(), path)  # creates the folder, like Lightning's
    stock = torch.load(path, weights_only=True)
    assert stock["hyper_parameters"] == {"lr": 0.1, "width": 16}  # a dict for stock readers
    ours = io.load_checkpoint(path)
    assert torch.equal(ours["state_dict"]["weight"], stock["state_dict"]["weight"])
    assert ours["callbacks"]["ModelCheckpoint{}"]["best_model_score"].item() == 0.5
    # what stock Lightning (torch.save) wrote, AttributeDict included, reads back as such
    theirs = tmp_path / "stock.ckpt"
    torch.save(_checkpoint(), theirs)
    loaded = io.load_checkpoint(theirs, map_location="cpu")
    assert type(loaded["hyper_parameters"]) is AttributeDict
    assert loaded["hyper_parameters"].width == 16
    io.remove_checkpoint(theirs)
    io.remove_checkpoint(theirs)  # removing what is gone is not an error
    assert not theirs.exists()
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(theirs)


def test_a_hostile_ckpt_is_refused_whatever_weights_only_says(tmp_path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Evil(marker)}}, path)
    io = TorchkeepCheckpointIO()
    for weights_only in (None, True, False):
        with pytest.raises(torchkeep.UnsafeCheckpointError, match="system"):
            io.load_checkpoint(path, weights_only=weights_only)
    path.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=2))
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        io.load_checkpoint(path)
    assert not marker.exists()


def test_async_failures_surface_on_the_next_call_and_on_teardown(tmp_path) -> None:
    io = TorchkeepCheckpointIO(async_save=True)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    io.save_checkpoint(_checkpoint(), blocker / "x.ckpt")  # its folder cannot be made
    with pytest.raises(torchkeep.AsyncSaveError):
        io.teardown()
    io.save_checkpoint(_checkpoint(), tmp_path / "ok.ckpt")
    io.remove_checkpoint(tmp_path / "ok.ckpt")  # queued behind the save
    io.teardown()
    assert not (tmp_path / "ok.ckpt").exists()


def test_rng_state_is_plain_for_stock_readers(tmp_path) -> None:
    state = RNGStateCallback().state_dict()
    path = tmp_path / "rng.pt"
    torchkeep.save(state, path)
    back = torch.load(path, weights_only=True)  # no numpy globals needed
    assert torch.equal(back["torch"], torch.get_rng_state())
    assert back["numpy"][1].dtype == torch.uint8 and back["resume_at"] == "fit"


def test_cli_understands_a_real_ckpt(runs, tmp_path, capsys) -> None:
    from torchkeep.cli.main import main

    last = runs["epoch"]["dir"] / "last.ckpt"
    assert main(["inspect", str(last)]) == 0
    out = capsys.readouterr().out
    assert "lightning 2.6" in out and "epoch 3, global step 48" in out
    assert "4 tensors in state_dict" in out and "callbacks RNGStateCallback, ModelCheckpoint" in out
    assert "loops/" in out and "values)" in out  # Lightning's loop progress: one line
    assert "hyper_parameters/" in out and "width" in out and "optimizer_states/" in out
    assert main(["inspect", str(last), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["lightning"]
    assert facts["global_step"] == 48 and facts["optimizers"] == 1
    assert facts["hyper_parameters"] == {"lr": "0.05", "width": "16"}
    assert main(["scan", str(last)]) == 0
    assert "clean" in capsys.readouterr().out
    converted = tmp_path / "last.safetensors"
    assert main(["convert", str(last), str(converted)]) == 0
    assert main(["diff", str(last), str(converted)]) == 0
    other = runs["to_stock"]["dir"] / "last.ckpt"  # written by stock Lightning, same run
    assert main(["diff", str(last), str(other)]) == 1  # the RNG and paths differ
    capsys.readouterr()
