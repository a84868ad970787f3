"""Sharded checkpoints on real gloo ranks (forked from a forkserver; see
torchkeep.distributed.launch): resharding, faults, per-rank state, exact resume."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

import dist_scenarios as S  # noqa: E402
import torchkeep  # noqa: E402
from torchkeep.distributed.launch import RankResult, run_ranks  # noqa: E402
from torchkeep.manager.layout import step_name  # noqa: E402


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's return value; fails with the first rank's error."""
    for r in results:
        assert r.ok, f"rank {r.rank} (exit {r.exitcode}): {r.error}"
    return [r.value for r in results]


def same(a: Any, b: Any) -> bool:
    """Bit-identical trees: equal tensors of equal dtype, equal values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, list[Any]]]:
    """A 3-step FSDP2 run saved by the manager on 1, 2 and 4 ranks."""
    runs = {}
    for n in (1, 2, 4):
        root = tmp_path_factory.mktemp(f"run{n}")
        runs[n] = (root, values(run_ranks(n, S.manager_save, str(root), "fsdp2", 3)))
    return runs


@pytest.mark.parametrize("n", [1, 2, 4])
def test_resharding_matrix(saved_runs: dict[int, tuple[Path, list[Any]]], n: int) -> None:
    root, saved = saved_runs[n]
    assert saved[0]["steps"] == [1, 2]  # keep_last=2 ran on rank 0
    for m in (1, 2, 3, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restored = values(run_ranks(m, S.manager_restore, str(root), "fsdp2", m == n))
        for r in restored:
            assert r["error"] is None and r["step"] == 2 and r["latest"] == 2
            assert same(saved[0]["model"], r["model"]), (n, m)
            assert same(saved[0]["optim"], r["optim"]), (n, m)
            assert r["epoch"] == 7
        if m == n:  # per-rank state: each rank its own
            assert [r["mine"] for r in restored] == [{"rank": k, "seen": [k] * 3}
                                                     for k in range(n)]
            assert [r["next"] for r in restored] == [s["next"] for s in saved]
            assert all(same(s["torch_rng"], r["torch_rng"]) for s, r in zip(saved, restored,
                                                                              strict=True))
        # the sampler resumed at the global position: the next index of new rank k is
        # the permutation's element start + k, whatever the world size
        order = torch.randperm(40, generator=torch.Generator().manual_seed(3 * 1_000_003)
                               ).tolist()
        assert [r["next"] for r in restored] == order[3 * n : 3 * n + m]


def test_per_rank_state_on_another_world_size_is_refused_before_loading(
        saved_runs: dict[int, tuple[Path, list[Any]]]) -> None:
    root, _ = saved_runs[2]
    restored = values(run_ranks(3, S.manager_restore, str(root), "fsdp2", True))
    for r in restored:
        assert r["error"].startswith("StateMismatchError") and "'mine'" in r["error"]


def test_sharded_step_opens_in_one_process(saved_runs: dict[int, tuple[Path, list[Any]]]) \
        -> None:
    root, saved = saved_runs[4]
    step = root / step_name(2)
    tree = torchkeep.load(step)
    assert same(saved[0]["model"], tree["model"])
    assert sorted(tree["__per_rank__"]) == ["0", "1", "2", "3"]
    numpy_tree = torchkeep.load(step, backend="numpy")
    key = next(iter(saved[0]["model"]))
    assert (numpy_tree["model"][key] == saved[0]["model"][key].numpy()).all()
    report = torchkeep.verify(step)
    assert report.intact and report.checked > 1, report
    # restored in a plain process, into a plain model: DCP without a process group
    model, opt = S.build(1, "plain", seed=4)
    S.train(model, opt, 0, 1, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchkeep.CheckpointManager(root) as mgr:
            assert mgr.restore({"model": model, "optimizer": opt}) == 2
    assert same(saved[0]["model"], S.full_state(model, opt)["model"])
    assert same(saved[0]["optim"], S.full_state(model, opt)["optim"])


def test_placements_dtypes_and_values_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    values(run_ranks(2, S.save_placements, str(path)))
    for m in (3, 1):
        for r in values(run_ranks(m, S.load_placements, str(path))):
            assert all(r["equal"].values()), r["equal"]
    # each rank kept its own per-rank value (DCP alone gives both ranks one of them)
    full = torchkeep.load(path)
    assert [int(full["__per_rank__"][k]["rng"]) for k in ("0", "1")] == [100, 101]
    assert [full["__per_rank__"][k]["pos"] for k in ("0", "1")] == [1000, 1001]
    assert same(full["rows"], S.placements_full()["rows"])
    # the replicated tensor was written once: data files hold one copy of everything
    data = sum(f.stat().st_size for f in path.glob("data-*.bin"))
    one_copy = sum(t.numel() * t.element_size() for t in S.placements_full().values()
                   if isinstance(t, torch.Tensor)) + 2 * 8
    assert one_copy <= data <= one_copy + 64 * 24
    assert not list(path.glob("*.distcp")) and not (path / ".metadata").exists()
    # no pickle anywhere: the manifest is JSON, the data files raw bytes
    assert (path / "manifest.json").read_bytes()[:1] == b"{"


def test_stock_dcp_load_reads_a_step(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from torchkeep.distributed import StepReader

    path = tmp_path / "ckpt"
    values(run_ranks(2, S.save_placements, str(path)))
    full = S.placements_full()
    sd = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
          for k, v in full.items()}
    sd["extra"] = {"note": "", "lr": None, "n": 0}  # DCP flattens nested dicts
    dcp.load(sd, storage_reader=StepReader(path), no_dist=True)
    assert all(same(sd[k], full[k]) for k in full)


def test_a_rank_killed_while_writing_leaves_no_step(tmp_path: Path) -> None:
    results = run_ranks(2, S.die_in_write, str(tmp_path), timeout=60)
    assert results[1].exitcode == 9
    assert results[0].error is not None and results[0].error_type != "CheckpointException"
    names = os.listdir(tmp_path)
    assert step_name(1) in names and step_name(2) not in names
    # the surviving coordinator removed what the save wrote
    assert not [n for n in names if n.startswith(".")], names
    assert torchkeep.CheckpointManager(tmp_path).all_steps() == [1]


def test_coordinator_killed_before_the_rename_leaves_no_step(tmp_path: Path) -> None:
    results = run_ranks(2, S.coordinator_dies_before_rename, str(tmp_path), timeout=60)
    assert results[0].exitcode == 9 and not results[1].ok
    assert any(".torchkeep-tmp-" in n for n in os.listdir(tmp_path))  # nobody left to clean
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        mgr = torchkeep.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1] and mgr.cleaned
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_failed_write_raises_the_same_error_on_every_rank(tmp_path: Path) -> None:
    out = values(run_ranks(2, S.fail_in_write, str(tmp_path)))
    for r in out:
        name, message = r["error"]
        assert name == "StorageError" and "No space left" in message and "rank 1" in message
        assert not [n for n in r["listing"] if ".torchkeep-tmp-" in n]
        assert r["steps"] == [2]  # the group still works: the next save commits


def test_a_reused_step_number_is_refused_on_every_rank(tmp_path: Path) -> None:
    assert values(run_ranks(2, S.reuse_step, str(tmp_path))) == ["StorageError"] * 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_data_is_caught_on_every_rank_and_fallback_steps_back(
        tmp_path: Path, damage: str) -> None:
    values(run_ranks(2, S.manager_save, str(tmp_path), "fsdp2", 2))
    target = tmp_path / step_name(1) / "data-00001.bin"
    if damage == "flip":  # a bit of rank 1's chunk of the first weight
        manifest = json.loads((tmp_path / step_name(1) / "manifest.json").read_bytes())
        chunk = next(c for c in manifest["tensors"]["model.0.weight"]["chunks"]
                     if c["file"] == target.name)
        raw = bytearray(target.read_bytes())
        raw[chunk["offset"] + chunk["nbytes"] // 2] ^= 0x10
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    else:
        target.unlink()
    failed = values(run_ranks(3, S.restore_fallback, str(tmp_path), False))
    kinds = {r["error"][0] for r in failed}
    assert len(kinds) == 1 and kinds <= {"IntegrityError", "CorruptCheckpointError",
                                         "CheckpointNotFoundError"}, failed
    if damage == "flip":
        assert kinds == {"IntegrityError"}
        assert "data-00001.bin" in failed[0]["error"][1] and "chunk" in failed[0]["error"][1]
    stepped = values(run_ranks(3, S.restore_fallback, str(tmp_path), True))
    assert [r["step"] for r in stepped] == [0, 0, 0]


def test_exact_resume_at_the_same_world_size(tmp_path: Path) -> None:
    whole = values(run_ranks(2, S.resume_run, str(tmp_path / "a"), 6, False))
    first = values(run_ranks(2, S.resume_run, str(tmp_path / "b"), 3, False))
    second = values(run_ranks(2, S.resume_run, str(tmp_path / "b"), 3, True))
    for w, f, s in zip(whole, first, second, strict=True):
        assert w["losses"] == f["losses"] + s["losses"]
        assert same(w["model"], s["model"]) and same(w["optim"], s["optim"])


def test_async_save_commits_the_state_as_it_was_at_save(tmp_path: Path) -> None:
    out = values(run_ranks(2, S.async_save_snapshot, str(tmp_path)))
    assert out[0]["steps"] == [2]  # keep_last=1 ran after step 2 committed
    step2 = torchkeep.load(tmp_path / step_name(2))
    assert same(out[0]["later"]["model"], step2["model"])
    assert not same(out[0]["snapshot"]["model"], out[0]["later"]["model"])
    restored = values(run_ranks(2, S.restore_fallback, str(tmp_path), False))
    assert [r["step"] for r in restored] == [2, 2]


def test_async_step_one_holds_the_snapshot(tmp_path: Path) -> None:
    out = values(run_ranks(2, S.async_save_snapshot_keep, str(tmp_path)))
    step1 = torchkeep.load(tmp_path / step_name(1))
    assert same(out[0]["snapshot"]["model"], step1["model"])


def test_manager_imports_a_stock_dcp_checkpoint_on_another_world_size(tmp_path: Path) -> None:
    path = tmp_path / "titan"
    saved = values(run_ranks(2, S.stock_dcp_save, str(path)))
    assert (path / ".metadata").exists()
    for r in values(run_ranks(3, S.import_dcp, str(path))):
        assert r["step"] == 2
        assert same(saved[0]["model"], r["model"]) and same(saved[0]["optim"], r["optim"])


def test_convert_to_dcp_is_read_by_stock_dcp_load(
        saved_runs: dict[int, tuple[Path, list[Any]]], tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from click.testing import CliRunner

    from torchkeep.cli.main import cli

    root, saved = saved_runs[2]
    out = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["convert", str(root / step_name(2)), str(out),
                                      "--to", "dcp"])
    assert result.exit_code == 0, result.output
    assert (out / ".metadata").exists() and "DCP directory" in result.output
    model = {k: torch.zeros_like(v) for k, v in saved[0]["model"].items()}
    target = {"model": model, "epoch": 0}
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    assert same(saved[0]["model"], target["model"]) and target["epoch"] == 7
    # and torchkeep reads its own export back, torch-free style
    assert same(saved[0]["model"], torchkeep.load(out)["model"])
    again = CliRunner().invoke(cli, ["convert", str(root / step_name(2)), str(out),
                                     "--to", "dcp"])
    assert isinstance(again.exception, torchkeep.StorageError)  # main() maps it to exit 3
    assert "exists already" in str(again.exception)


def test_ddp_is_saved_once_and_restores_on_other_world_sizes(tmp_path: Path) -> None:
    saved = values(run_ranks(2, S.manager_save, str(tmp_path), "ddp", 2))
    step = tmp_path / step_name(1)
    data = sum(f.stat().st_size for f in step.glob("data-*.bin"))
    model = sum(t.numel() * t.element_size() for t in saved[0]["model"].values())
    # one copy of the weights and of AdamW's two moments (plus per-rank RNG and padding)
    assert data < 3 * model + 2 * 5056 + 64 * 40
    assert data >= 3 * model
    for m in (3, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restored = values(run_ranks(m, S.manager_restore, str(tmp_path), "ddp", False))
        for r in restored:
            assert r["error"] is None
            assert same(saved[0]["model"], r["model"]) and same(saved[0]["optim"], r["optim"])


def test_hsdp_saves_each_shard_once_and_restores_as_fsdp2(tmp_path: Path) -> None:
    saved = values(run_ranks(4, S.manager_save, str(tmp_path), "hsdp", 2))
    step = tmp_path / step_name(1)
    data = sum(f.stat().st_size for f in step.glob("data-*.bin"))
    model = sum(t.numel() * t.element_size() for t in saved[0]["model"].values())
    assert 3 * model <= data < 3 * model + 4 * 5056 + 64 * 80  # replicas written once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = values(run_ranks(3, S.manager_restore, str(tmp_path), "fsdp2", False))
    for r in restored:
        assert r["error"] is None
        assert same(saved[0]["model"], r["model"]) and same(saved[0]["optim"], r["optim"])


def test_every_rank_gets_rank_0s_listing(tmp_path: Path) -> None:
    assert values(run_ranks(2, S.stale_listing, str(tmp_path))) == [(4, [4]), (4, [4])]


def test_model_state_pairs_an_optimizer_spanning_several_modules(tmp_path: Path) -> None:
    saved = values(run_ranks(2, S.model_state_wrapper, str(tmp_path), False))
    assert saved[0]["refused"] == "UnsupportedTypeError"
    restored = values(run_ranks(3, S.model_state_wrapper, str(tmp_path), True))
    for r in restored:
        assert same(saved[0]["model"], r["model"]) and same(saved[0]["optim"], r["optim"])


@pytest.mark.parametrize("async_save", [False, True])
def test_incremental_sharded_steps_share_the_frozen_layer(tmp_path: Path,
                                                          async_save: bool) -> None:
    from torchkeep.manager.rundir import RunDirectory

    root = tmp_path / "run"
    saved = values(run_ranks(2, S.incremental_run, str(root), 5, async_save))
    records = saved[0]["records"]
    assert [records[s]["full"] for s in range(5)] == [True, False, False, True, False]
    frozen = (13 * 23 + 23) * 4  # layer 0's weight and bias, written by step 0 only
    for step in (1, 2, 4):
        assert records[step]["shared_bytes"] >= frozen, records[step]
        assert records[step]["written_bytes"] > 0
    assert records[3]["shared_bytes"] == 0
    assert saved[0]["steps"] == [3, 4]
    run = RunDirectory(root, create=False)
    named = {n for s in run.steps() for n in run.references(s)}
    assert set(os.listdir(root / "chunks")) == named  # step 0's to 2's files are freed
    assert torchkeep.verify(root / "step-000000000004").intact
    for m in (1, 3):  # restores on other world sizes, through DCP's planner
        for r in values(run_ranks(m, S.incremental_restore, str(root))):
            assert r["step"] == 4 and r["saved_step"] == 4
            assert same(saved[0]["model"], r["model"]) and same(saved[0]["optim"], r["optim"])
