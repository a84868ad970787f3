"""CheckpointManager: commits, restore, retention on disk, faults at every step, async."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

import torchkeep
from conftest import flip_byte, tmp_debris
from torchkeep.demo.model import SeedNet, make_optimizer
from torchkeep.errors import AsyncSaveError, IntegrityError, StorageError
from torchkeep.manager.layout import step_name
from torchkeep.storage.filesystem import LocalFileSystem


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = SeedNet()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler,
            "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0),
            "rng": torchkeep.RNGState(), "epoch": seed, "note": f"seed {seed}",
            "extra": {"t": torch.arange(4.0) + seed, "arr": np.arange(3) + seed}}


def assert_same(a: dict, b: dict) -> None:
    for (ka, va), (kb, vb) in zip(a["model"].state_dict().items(),
                                  b["model"].state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        assert torch.equal(sa["state"][key]["momentum_buffer"], sb["state"][key]["momentum_buffer"])
    assert a["scheduler"].state_dict() == b["scheduler"].state_dict()
    assert a["scaler"].state_dict() == b["scaler"].state_dict()
    assert a["epoch"] == b["epoch"] and a["note"] == b["note"]
    assert torch.equal(a["extra"]["t"], b["extra"]["t"])
    np.testing.assert_array_equal(a["extra"]["arr"], b["extra"]["arr"])


def test_save_and_restore_every_kind_of_state(tmp_path) -> None:
    state = make_state(1)
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(7, state, metrics={"loss": 0.5})
        fresh = make_state(2)
        assert mgr.restore(fresh) == 7
    assert_same(state, fresh)
    assert isinstance(fresh["extra"]["arr"], np.ndarray)


def test_rng_state_round_trip(tmp_path) -> None:
    import random

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"rng": torchkeep.RNGState()})
        expected = (torch.rand(3), random.random(), np.random.rand())
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
        mgr.restore({"rng": torchkeep.RNGState()})
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_step_directory_is_a_checkpoint(tmp_path) -> None:
    state = make_state(1)
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(3, state)
        path = mgr.step_path(3)
    assert sorted(os.listdir(path)) == ["COMMITTED", "data-00000.bin", "manifest.json"]
    loaded = torchkeep.load(path)
    assert torch.equal(loaded["model"]["fc1.weight"], state["model"].fc1.weight)
    with torchkeep.open(path) as handle:
        assert handle.format == "torchkeep"
        assert handle.tensors["model/fc1.weight"].shape == (120, 400)
        assert torch.equal(handle["model/fc1.bias"], state["model"].fc1.bias)
    arrays = torchkeep.load(path, backend="numpy")
    np.testing.assert_array_equal(arrays["model"]["fc1.bias"], state["model"].fc1.bias.detach())
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = f.read()
    assert "torch_version" in manifest and "torchkeep_version" in manifest
    with open(os.path.join(path, "data-00000.bin"), "rb") as f:
        assert b"\x80\x02" not in f.read(2)  # no pickle anywhere


def test_steps_sort_and_are_never_overwritten(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        for step in (2, 10, 100):
            mgr.save(step, {"x": step})
        assert mgr.all_steps() == [2, 10, 100]
        assert sorted(os.listdir(tmp_path)) == [step_name(2), step_name(10), step_name(100)]
        with pytest.raises(ValueError, match="already committed"):
            mgr.save(10, {"x": 0})
        with pytest.raises(ValueError):
            mgr.save(-1, {"x": 0})
        assert mgr.restore({"x": None}, step=10) == 10


def test_restore_of_a_missing_entry_names_it(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"model": 1})
        with pytest.raises(torchkeep.StateMismatchError, match="'optimizer'"):
            mgr.restore({"model": None, "optimizer": None})
        with pytest.raises(torchkeep.CheckpointNotFoundError):
            mgr.restore({"model": None}, step=5)
    with torchkeep.CheckpointManager(tmp_path / "empty") as empty, \
            pytest.raises(torchkeep.CheckpointNotFoundError):
        empty.restore({"model": None})


def test_retention_runs_after_commit_and_survives_restart(tmp_path) -> None:
    losses = [5.0, 1.0, 4.0, 3.0, 2.0, 6.0]
    with torchkeep.CheckpointManager(tmp_path, keep_last=2, keep_best=1,
                                     best_metric="loss") as mgr:
        for step, loss in enumerate(losses[:4]):
            mgr.save(step, {"x": step}, metrics={"loss": loss})
        assert mgr.all_steps() == [1, 2, 3]
    with torchkeep.CheckpointManager(tmp_path, keep_last=2, keep_best=1,
                                     best_metric="loss") as mgr:
        assert mgr.best_step() == 1 and mgr.metrics(1) == {"loss": 1.0}
        for step, loss in enumerate(losses[4:], start=4):
            mgr.save(step, {"x": step}, metrics={"loss": loss})
        assert mgr.all_steps() == [1, 4, 5]
        plan = mgr.retention()
        assert plan.keep[1].startswith("best loss") and plan.keep[5].startswith("newest")


class FaultyFS(LocalFileSystem):
    """Fails the n-th file system operation (counted across every kind)."""

    OPS = ("makedirs", "write_file", "rename", "fsync_dir", "rmtree")

    def __init__(self, fail_at: int, error: Exception | None = None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.error = error or StorageError("injected failure")

    def _tick(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error


for _op in FaultyFS.OPS:
    def _wrapped(self, *args, _op=_op, **kwargs):
        self._tick(_op)
        return getattr(LocalFileSystem, _op)(self, *args, **kwargs)

    setattr(FaultyFS, _op, _wrapped)


def test_a_fault_at_every_commit_step_never_loses_the_last_step(tmp_path) -> None:
    state = make_state(1)
    with torchkeep.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(0, state)
    failures = 0
    for fail_at in range(1, 40):
        mgr = torchkeep.CheckpointManager(tmp_path, keep_last=1)
        mgr.fs = FaultyFS(fail_at)
        new_state = make_state(2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mgr.save(1, new_state)
        except StorageError:
            failures += 1
            mgr.fs = LocalFileSystem()
            steps = mgr.all_steps()
            restored = make_state(5)
            if steps == [0]:  # the commit did not happen: step 0 is intact
                assert mgr.restore(restored) == 0
                assert_same(state, restored)
            else:  # it failed after the rename (syncing the folder): step 1 is whole
                assert steps == [0, 1]
                assert mgr.restore(restored) == 1
                assert_same(new_state, restored)
                mgr.close()
                shutil.rmtree(mgr.step_path(1))
                continue
            mgr.close()
            continue
        mgr.fs = LocalFileSystem()
        steps = mgr.all_steps()
        mgr.close()
        # the commit happened; retention may or may not have removed step 0
        assert steps[-1] == 1
        restored = make_state(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reopened = torchkeep.CheckpointManager(tmp_path, keep_last=1)
        assert reopened.restore(restored) == 1
        assert_same(new_state, restored)
        reopened.close()
        break
    assert failures >= 6  # makedirs, data, manifest, marker, fsync tmp, rename all failed once
    assert tmp_debris(tmp_path) == []


def test_enospc_while_writing_data(tmp_path, monkeypatch) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"x": torch.ones(10)})
        real_write = os.write

        def full(fd, data):
            if len(data) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(StorageError, match="No space left"):
            mgr.save(1, {"x": torch.ones(1000)})
        monkeypatch.setattr(os, "write", real_write)
        assert mgr.all_steps() == [0]
    assert [n for n in os.listdir(tmp_path) if not n.startswith("step-")] == []


def test_leftovers_are_cleaned_and_reported(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"x": 1})
    (tmp_path / f".{step_name(1)}.torchkeep-tmp-abcd").mkdir()
    (tmp_path / f".{step_name(1)}.torchkeep-tmp-abcd" / "data-00000.bin").write_bytes(b"x")
    (tmp_path / step_name(2)).mkdir()  # no commit marker
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="removed leftovers"):
        mgr = torchkeep.CheckpointManager(tmp_path)
    assert sorted(mgr.cleaned) == sorted([f".{step_name(1)}.torchkeep-tmp-abcd", step_name(2)])
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", step_name(0)]
    assert mgr.all_steps() == [0]


def test_corruption_is_detected_and_fallback_steps_back(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"w": torch.zeros(1000)})
        mgr.save(1, {"w": torch.ones(1000)})
        flip_byte(os.path.join(mgr.step_path(1), "data-00000.bin"))
        with pytest.raises(IntegrityError, match=r"tensor 'w' of step 1"):
            mgr.restore({"w": None})
        state = {"w": None}
        with pytest.warns(UserWarning, match="restored step 0 instead of step 1"):
            assert mgr.restore(state, fallback=True) == 0
        assert torch.equal(state["w"], torch.zeros(1000))


def test_torn_manifest_is_detected(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"w": torch.zeros(10)})
        manifest = os.path.join(mgr.step_path(0), "manifest.json")
        with open(manifest) as f:
            text = f.read()
        with open(manifest, "w") as f:
            f.write(text.replace('"step":0', '"step":9'))
        with pytest.raises(IntegrityError, match="manifest"):
            mgr.restore({"w": None})


def test_async_save_copies_then_writes_in_background(tmp_path) -> None:
    state = {"w": torch.zeros(100_000)}
    with torchkeep.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(0, state)
        state["w"].add_(5.0)  # training goes on; the staged copy must not change
        mgr.save(1, state)  # waits for step 0 first
        mgr.wait()
        assert mgr.all_steps() == [0, 1]
        out = {"w": None}
        mgr.restore(out, step=0)
        assert torch.equal(out["w"], torch.zeros(100_000))
        mgr.restore(out, step=1)
        assert torch.equal(out["w"], torch.full((100_000,), 5.0))


def test_async_failure_surfaces_with_its_cause(tmp_path) -> None:
    mgr = torchkeep.CheckpointManager(tmp_path, async_save=True)
    mgr.fs = FaultyFS(2, StorageError("disk on fire"))
    mgr.save(0, {"w": torch.ones(3)})
    with pytest.raises(AsyncSaveError, match="step 0") as info:
        mgr.wait()
    assert isinstance(info.value.__cause__, StorageError)
    assert "disk on fire" in str(info.value.__cause__)
    mgr.fs = FaultyFS(2, StorageError("again"))
    mgr.save(1, {"w": torch.ones(3)})
    with pytest.raises(AsyncSaveError):
        mgr.save(2, {"w": torch.ones(3)})  # the next save surfaces it
    mgr.fs = FaultyFS(1, StorageError("at close"))
    mgr.save(3, {"w": torch.ones(3)})
    with pytest.raises(AsyncSaveError):
        mgr.close()
    assert mgr.all_steps() == []


class SlowRenameFS(LocalFileSystem):
    """Holds every commit rename until ``release`` is set (a save still in flight)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def rename(self, src: str, dst: str) -> None:
        assert self.release.wait(10)
        super().rename(src, dst)


def test_restore_waits_for_the_save_in_flight(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(0, {"w": torch.zeros(3)})
        mgr.wait()
        slow = SlowRenameFS()
        mgr.fs = slow
        mgr.save(1, {"w": torch.ones(3)})
        threading.Timer(0.2, slow.release.set).start()
        out: dict = {"w": None}
        assert mgr.restore(out) == 1
        assert torch.equal(out["w"], torch.ones(3))


@pytest.mark.parametrize(
    "options",
    [{"keep_last": 0}, {"keep_best": 0, "best_metric": "loss"}, {"keep_every_steps": 0},
     {"keep_best": 1}, {"best_mode": "median"}],
)
def test_bad_retention_options_fail_before_anything_is_written(tmp_path, options) -> None:
    with pytest.raises(ValueError):
        torchkeep.CheckpointManager(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def test_fsspec_memory_filesystem() -> None:
    pytest.importorskip("fsspec")
    url = "memory://torchkeep-test/run"
    state = make_state(1)
    with torchkeep.CheckpointManager(url, keep_last=2) as mgr:
        for step in range(4):
            state["epoch"] = step
            mgr.save(step, state, metrics={"loss": 1.0 / (step + 1)})
        assert mgr.all_steps() == [2, 3]
        fresh = make_state(9)
        assert mgr.restore(fresh) == 3
    assert_same(state, fresh)
    assert torchkeep.load(url + "/" + step_name(3))["epoch"] == 3
