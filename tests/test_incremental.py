"""Incremental steps: only changed chunks are written, every step restores on its own,
retention never deletes a shared byte, faults and SIGKILLs never lose a chunk."""

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
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchkeep
from conftest import flip_byte, quiet_env, run_without_torch, tmp_debris
from torchkeep.cli.main import main
from torchkeep.errors import IntegrityError, TorchkeepError
from torchkeep.formats.chunks import byte_range, ranges_problem
from torchkeep.formats.manifest import MANIFEST_NAME, POOL_NAME
from torchkeep.manager.incremental import Base, diff, plan_chunks, version_of
from torchkeep.manager.rundir import RunDirectory
from torchkeep.storage.background import drain
from torchkeep.storage.filesystem import LocalFileSystem

CHUNK = 64 << 10  # small chunks keep the tensors of these tests small


def cli(capsys: Any, *args: Any) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def manager(path: Any, **kwargs: Any) -> torchkeep.CheckpointManager:
    options = torchkeep.ManagerOptions(incremental=True, chunk_bytes=CHUNK,
                                       **{k: kwargs.pop(k) for k in list(kwargs)
                                          if k in ("full_every", "trust_versions",
                                                   "keep_last", "async_save")})
    return torchkeep.CheckpointManager(path, options=options, **kwargs)


def manifest(mgr: torchkeep.CheckpointManager, step: int) -> dict[str, Any]:
    with open(os.path.join(mgr.step_path(step), MANIFEST_NAME)) as f:
        return json.load(f)  # type: ignore[no-any-return]


def info(mgr: torchkeep.CheckpointManager, step: int) -> dict[str, Any]:
    return manifest(mgr, step)["incremental"]  # type: ignore[no-any-return]


def tensor_chunks(mgr: torchkeep.CheckpointManager, step: int, name: str) -> list[Any]:
    return manifest(mgr, step)["tensors"][name]["chunks"]  # type: ignore[no-any-return]


def pool_files(run: Any) -> set[str]:
    folder = Path(run) / POOL_NAME
    return set(os.listdir(folder)) if folder.exists() else set()


def referenced(run: Any) -> set[str]:
    directory = RunDirectory(run, create=False)
    return {name for step in directory.steps() for name in directory.references(step)}


def model_state(step: int) -> dict[str, Any]:
    """A frozen 1 MiB part, a trained part that changes every step, and plain values."""
    g = torch.Generator().manual_seed(0)
    frozen = torch.randn(1024, 256, generator=g)
    trained = torch.full((64, 64), float(step))
    return {"model": {"frozen": frozen, "trained": trained}, "step": step, "lr": 0.1 * step}


def assert_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal(a[k], b[k])
    else:
        assert a == b


# -- chunk plans -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (5,), (100_000,), (1000, 3), (3, 50_000),
                                   (2, 3, 40_000), (7, 0, 3), (1, 1, 1, 70_000)])
def test_chunk_plans_are_contiguous_runs_that_tile_the_tensor(shape) -> None:
    itemsize = 4
    nbytes = int(np.prod(shape)) * itemsize
    boxes = plan_chunks(shape, itemsize, 64 << 10)
    assert all(n <= max(64 << 10, itemsize) for *_, n in boxes)
    for offsets, sizes, start, n in boxes:
        assert byte_range(shape, offsets, sizes, itemsize) == (start, n)
    assert ranges_problem(nbytes, [(start, n) for *_, start, n in boxes]) is None
    assert len(boxes) == max(1, -(-nbytes // (64 << 10))) or len(shape) > 1


def test_range_tiling_problems_are_named() -> None:
    assert ranges_problem(10, [(0, 5), (5, 5)]) is None
    assert "overlap" in str(ranges_problem(10, [(0, 6), (5, 5)]))
    assert "missing" in str(ranges_problem(10, [(0, 4), (5, 5)]))
    assert "missing" in str(ranges_problem(10, [(0, 5)]))
    assert byte_range((4, 6), (1, 2), (2, 2), 1) is None  # a box of two partial rows


# -- what is written --------------------------------------------------------------------------


def test_only_changed_chunks_are_written_and_every_step_restores_alone(tmp_path,
                                                                      capsys) -> None:
    run = tmp_path / "run"
    states = [model_state(step) for step in range(4)]
    with manager(run) as mgr:
        for step, state in enumerate(states):
            mgr.save(step, state)
        full = info(mgr, 0)
        assert full["full"] and full["shared_bytes"] == 0
        for step in (1, 2, 3):
            got = info(mgr, step)
            assert not got["full"] and got["base"] == step - 1
            assert got["written_bytes"] == 64 * 64 * 4  # the trained part only
            assert got["shared_bytes"] == 1024 * 256 * 4
        for step, state in enumerate(states):
            assert_equal(mgr.load(step), state)
    # each step is a checkpoint of its own for every reader
    for step, state in enumerate(states):
        path = run / f"step-{step:012d}"
        assert_equal(torchkeep.load(path), state)
        assert torchkeep.verify(path).intact
    compared = torchkeep.compare(run / "step-000000000001", run / "step-000000000002")
    assert not compared.equal and [t.name for t in compared.tensors] == ["model/trained"]
    out = tmp_path / "step3.safetensors"
    assert cli(capsys, "convert", run / "step-000000000003", out)[0] == 0
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert torch.equal(got["model/frozen"], states[3]["model"]["frozen"])
    assert torch.equal(got["model/trained"], states[3]["model"]["trained"])
    # and without torch (the numpy backend)
    done = run_without_torch(f"""
        import numpy as np, torchkeep
        tree = torchkeep.load({str(run / "step-000000000002")!r}, backend="numpy")
        assert tree["model"]["trained"].dtype == np.float32
        assert (tree["model"]["trained"] == 2.0).all(), tree["model"]["trained"]
        assert tree["model"]["frozen"].shape == (1024, 256)
        print("ok")
    """)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_a_changed_block_of_rows_writes_only_its_chunks(tmp_path) -> None:
    table = torch.randn(4096, 64)  # 1 MiB: 16 chunks of 256 rows
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table})
        table[300:310] += 1.0  # rows in chunk 1
        table[4000] -= 2.0  # a row in chunk 15
        mgr.save(1, {"emb": table})
        assert info(mgr, 1)["written_bytes"] == 2 * CHUNK
        assert torch.equal(mgr.load(1)["emb"], table)


def test_a_new_tensor_is_never_trusted_by_its_address(tmp_path) -> None:
    with manager(tmp_path) as mgr:
        for step in range(4):
            # a fresh tensor each step, often at the address the last one had, version 0
            mgr.save(step, {"x": torch.full((1000,), float(step))})
        for step in range(4):
            assert torch.equal(mgr.load(step)["x"], torch.full((1000,), float(step)))


def test_the_version_counter_spares_reading_unchanged_tensors() -> None:
    from torchkeep.api import Describer
    from torchkeep.formats.manifest import plan_tensors

    frozen, trained = torch.randn(1000, 100), torch.randn(100)
    read: list[str] = []

    def plan() -> tuple[Any, Any, Any]:
        describer = Describer()
        _, payloads, originals = plan_tensors({"frozen": frozen, "trained": trained},
                                              describer)

        def storage_bytes(ref: Any) -> Any:
            read.append("frozen" if ref.nbytes == frozen.nbytes else "trained")
            return describer.storage_bytes(ref)

        return payloads, originals, storage_bytes

    payloads, originals, storage_bytes = plan()
    first = diff(payloads, originals, storage_bytes, None, chunk_bytes=CHUNK,
                 usable=lambda f: True)
    for item in first.new:  # as if written: the chunks lie in a shared file
        item.chunk["file"] = "../chunks/step-000000000000-00000000-00000.bin"
    base = Base(0, first.entries, 0, first.versions)
    trained.add_(1.0)
    read.clear()
    payloads, originals, storage_bytes = plan()
    second = diff(payloads, originals, storage_bytes, base, chunk_bytes=CHUNK,
                  usable=lambda f: True)
    assert read == ["trained"] and second.untouched == 1
    assert second.new_bytes == trained.nbytes
    # untrusted, every tensor is read and hashed (and the unchanged one still shared)
    read.clear()
    payloads, originals, storage_bytes = plan()
    third = diff(payloads, originals, storage_bytes, base, chunk_bytes=CHUNK,
                 usable=lambda f: True, trust_versions=False)
    assert sorted(read) == ["frozen", "trained"] and third.untouched == 0
    assert third.new_bytes == trained.nbytes
    # a chunk whose file is gone is written again, never named
    payloads, originals, storage_bytes = plan()
    fourth = diff(payloads, originals, storage_bytes, base, chunk_bytes=CHUNK,
                  usable=lambda f: False)
    assert fourth.new_bytes == frozen.nbytes + trained.nbytes


def test_writes_through_data_need_trust_versions_false(tmp_path) -> None:
    ema = torch.zeros(1000)
    with manager(tmp_path / "untrusted", trust_versions=False) as mgr:
        mgr.save(0, {"ema": ema})
        ema.data.add_(1.0)  # .data has a version counter of its own
        mgr.save(1, {"ema": ema})
        assert torch.equal(mgr.load(1)["ema"], torch.ones(1000))
    assert version_of(torch.zeros(1)) is not None
    with torch.inference_mode():
        assert version_of(torch.zeros(1)) is None  # inference tensors keep no counter
    assert version_of(np.zeros(1)) is None


def test_full_steps_on_demand_and_every_n(tmp_path) -> None:
    with manager(tmp_path, full_every=3) as mgr:
        for step in range(7):
            mgr.save(step, model_state(step), full=step == 4)
        fulls = [s for s in range(7) if info(mgr, s)["full"]]
        assert fulls == [0, 3, 4]  # 3 by full_every; 4 asked; 5, 6 follow 4
        assert info(mgr, 5)["since_full"] == 1
        mgr.save(7, model_state(7))
        assert info(mgr, 7)["full"]  # two incremental steps after 4, then full
        assert info(mgr, 4)["written_bytes"] == 1024 * 256 * 4 + 64 * 64 * 4
    with pytest.raises(ValueError, match="full_every"):
        torchkeep.ManagerOptions(full_every=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        torchkeep.ManagerOptions(chunk_bytes=0)


def test_a_restarted_manager_compares_with_the_newest_step(tmp_path) -> None:
    with manager(tmp_path) as mgr:
        mgr.save(0, model_state(0))
    with manager(tmp_path) as mgr:
        state = model_state(0)
        assert mgr.restore(state) == 0
        mgr.save(1, model_state(1))
        assert info(mgr, 1)["written_bytes"] == 64 * 64 * 4


def test_plain_and_incremental_steps_mix_in_one_run(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, model_state(0))
    with manager(tmp_path) as mgr:
        mgr.save(1, model_state(1))
        assert info(mgr, 1)["written_bytes"] > 1024 * 256 * 4  # nothing to share with
        mgr.save(2, model_state(2))
        assert info(mgr, 2)["written_bytes"] == 64 * 64 * 4
    with torchkeep.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(3, model_state(3))
        assert_equal(mgr.load(3), model_state(3))
    drain()
    assert pool_files(tmp_path) == set()  # no step names the shared files any more


# -- retention ------------------------------------------------------------------------------


def test_retention_keeps_every_shared_byte_and_frees_the_rest(tmp_path) -> None:
    with manager(tmp_path, keep_last=2, full_every=4) as mgr:
        for step in range(10):
            mgr.save(step, model_state(step))
            drain()
            assert pool_files(tmp_path) == referenced(tmp_path)
            for kept in mgr.all_steps():
                assert_equal(mgr.load(kept), model_state(kept))
        assert mgr.all_steps() == [8, 9]
        # 8 is full (full_every=4: 0, 4, 8) so nothing older is named
        assert {n.split("-")[1] for n in pool_files(tmp_path)} == {"000000000008",
                                                                   "000000000009"}


def test_ls_and_prune_show_own_and_shared_bytes(tmp_path, capsys) -> None:
    with manager(tmp_path) as mgr:
        for step in range(4):
            mgr.save(step, model_state(step), metrics={"loss": 1.0 / (step + 1)})
    code, listing = cli(capsys, "ls", tmp_path, "--json")
    assert code == 0, listing
    steps = json.loads(listing)["steps"]
    assert steps[0]["shared_bytes"] == 0 and steps[0]["bytes"] > 1024 * 256 * 4
    assert all(s["shared_bytes"] == 1024 * 256 * 4 for s in steps[1:])
    assert all(s["bytes"] < 64 << 10 for s in steps[1:])
    text = cli(capsys, "ls", tmp_path)[1]
    assert "own" in text and "shared" in text and "1.0 MiB" in text
    plan = json.loads(cli(capsys, "prune", tmp_path, "--keep-last", "1", "--dry-run",
                          "--json")[1])
    # deleting 0, 1, 2 frees their folders and the files of 1 and 2; not 0's file, where
    # the frozen part step 3 shares lies
    assert 2 * 64 * 64 * 4 < plan["would_free_bytes"] < 3 * 64 * 64 * 4
    code, done = cli(capsys, "prune", tmp_path, "--keep-last", "1")
    assert code == 0 and "deleted 3 of 4 steps, freed" in done
    assert pool_files(tmp_path) == referenced(tmp_path)
    assert_equal(torchkeep.load(tmp_path / "step-000000000003"), model_state(3))


# -- faults, kills, corruption ------------------------------------------------------------------


class FaultyFS(LocalFileSystem):
    """Fails the n-th call of any file system operation."""

    OPS = ("makedirs", "write_file", "rename", "fsync_dir", "rmtree", "remove", "listdir",
           "exists", "size", "read_bytes", "source", "isdir")

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls: list[str] = []

    def _tick(self, op: str) -> None:
        self.calls.append(op)
        if len(self.calls) == self.fail_at:
            from torchkeep.errors import StorageError

            raise StorageError(f"injected failure in {op}")


for _op in FaultyFS.OPS:
    def _wrapped(self: FaultyFS, *args: Any, _op: str = _op, **kwargs: Any) -> Any:
        self._tick(_op)
        return getattr(LocalFileSystem, _op)(self, *args, **kwargs)

    setattr(FaultyFS, _op, _wrapped)


def _check_run(run: Path, expected: dict[int, dict[str, Any]]) -> None:
    """Every committed step restores to what was saved, and a manager that opens the run
    leaves no debris and no unreferenced shared file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = manager(run)
    with mgr:
        for step in mgr.all_steps():
            assert_equal(mgr.load(step), expected[step])
            assert torchkeep.verify(mgr.step_path(step)).intact
    drain()
    assert tmp_debris(run) == []
    assert not [n for n in os.listdir(run) if n.startswith(".")]
    assert pool_files(run) == referenced(run)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_fault_at_every_file_operation_of_an_incremental_commit(tmp_path,
                                                                  async_save) -> None:
    expected = {}
    failures = ops = 0
    for fail_at in range(1, 200):
        run = tmp_path / f"run{fail_at}"
        with manager(run, keep_last=2, full_every=3) as mgr:
            for step in range(3):  # 0 full, 1 and 2 incremental, the next one full...
                expected[step] = model_state(step)
                mgr.save(step, expected[step])
        drain()
        # ...and 3 once more incremental: full_every is counted from the newest full step
        mgr = manager(run, keep_last=2, async_save=async_save)
        faulty = FaultyFS(fail_at)
        mgr.fs = faulty
        expected[3] = model_state(3)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mgr.save(3, expected[3])
                mgr.wait()
                drain()
        except TorchkeepError:
            failures += 1
        mgr.fs = LocalFileSystem()
        mgr.close()
        _check_run(run, expected)
        if len(faulty.calls) < fail_at:  # the save ran without reaching the fault: done
            ops = len(faulty.calls)
            break
    assert ops > 10 and failures >= 8, (ops, failures)


def test_a_fault_at_every_file_operation_of_a_retention_pass(tmp_path) -> None:
    expected = {step: model_state(step) for step in range(6)}
    done = False
    for fail_at in range(1, 200):
        run = tmp_path / f"run{fail_at}"
        with manager(run, full_every=2) as mgr:
            for step in range(6):
                mgr.save(step, expected[step])
        directory = RunDirectory(run)
        faulty = FaultyFS(fail_at)
        directory.fs = faulty
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                directory.delete([0, 1, 2, 3])
            except TorchkeepError:
                pass  # a failed listing of the pool: nothing removed
        _check_run(run, expected)
        if len(faulty.calls) < fail_at:
            done = True
            break
    assert done and fail_at > 10


WRITER = textwrap.dedent("""
    import sys, torch, torchkeep
    run = sys.argv[1]
    options = torchkeep.ManagerOptions(incremental=True, keep_last=3, full_every=4,
                                       chunk_bytes=64 << 10)
    g = torch.Generator().manual_seed(0)
    frozen = torch.randn(1 << 18, generator=g)
    table = torch.zeros(4096, 64)
    with torchkeep.CheckpointManager(run, options=options) as mgr:
        step = (mgr.latest_step() or 0) + 1
        print("ready", flush=True)
        while True:
            table.zero_()
            table[(step * 37) % 4096] = float(step)
            mgr.save(step, {"frozen": frozen, "table": table, "step": step})
            step += 1
""")


def _expected(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    table = torch.zeros(4096, 64)
    table[(step * 37) % 4096] = float(step)
    return {"frozen": torch.randn(1 << 18, generator=g), "table": table, "step": step}


def test_sigkill_at_random_moments_never_loses_a_chunk(tmp_path) -> None:
    run = tmp_path / "run"
    rng = random.Random(14)
    latest = 0
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run)],
                                  stdout=subprocess.PIPE, text=True, env=quiet_env())
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.8))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = RunDirectory(run).steps() if run.exists() else []
        if not steps:
            continue
        _check_run(run, {s: _expected(s) for s in steps})
        assert steps[-1] >= latest
        latest = steps[-1]
    assert latest > 3


def test_a_corrupt_shared_chunk_is_found_and_fallback_steps_past_it(tmp_path) -> None:
    with manager(tmp_path, full_every=2) as mgr:
        for step in range(4):  # 0 full, 1 shares 0's frozen part, 2 full, 3 shares 2's
            mgr.save(step, model_state(step))
        shared = [n for n in pool_files(tmp_path) if "-000000000002-" in n]
        assert len(shared) == 1
        flip_byte(tmp_path / POOL_NAME / shared[0], at=1000)  # in the frozen part
        problem = torchkeep.verify(mgr.step_path(3))
        assert not problem.intact and "frozen" in str(problem.problem), problem.problem
        with pytest.raises(IntegrityError, match="frozen"):
            mgr.restore(model_state(0))
        state = model_state(0)
        with pytest.warns(UserWarning, match="restored step 1 instead of step 3"):
            assert mgr.restore(state, fallback=True) == 1
        assert_equal(state, model_state(1))
        # the next save names nothing of the steps it stepped past
        mgr.save(4, model_state(4))
        assert info(mgr, 4)["full"]
        assert_equal(mgr.load(4), model_state(4))


def test_a_save_that_fails_leaves_no_shared_file(tmp_path, monkeypatch) -> None:
    with manager(tmp_path) as mgr:
        mgr.save(0, model_state(0))
        before = pool_files(tmp_path)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("torchkeep.manager.manager.commit_manifest", broken)
        with pytest.raises(OSError):
            mgr.save(1, model_state(1))
        monkeypatch.undo()
        assert pool_files(tmp_path) == before and tmp_debris(tmp_path) == []
        mgr.save(1, model_state(1))
        assert_equal(mgr.load(1), model_state(1))


# -- async and remote ---------------------------------------------------------------------------


def test_async_stages_only_the_changed_chunks(tmp_path) -> None:
    state = model_state(0)
    with manager(tmp_path, async_save=True) as mgr:
        mgr.save(0, state)
        mgr.wait()
        state["model"]["trained"].fill_(1.0)
        state["step"] = 1
        mgr.save(1, state)
        state["model"]["trained"].fill_(99.0)  # changed while step 1 is being written
        mgr.wait()
        assert mgr._arena._buffer is not None  # one arena, sized for step 0's chunks
        assert_equal(mgr.load(1)["model"]["trained"], torch.full((64, 64), 1.0))
        assert info(mgr, 1)["written_bytes"] == 64 * 64 * 4


def test_incremental_run_on_an_fsspec_store() -> None:
    import fsspec

    url = "memory://incremental/run"
    with manager(url, keep_last=2) as mgr:
        for step in range(5):
            mgr.save(step, model_state(step))
        drain()
        assert mgr.all_steps() == [3, 4]
        for step in (3, 4):
            assert_equal(mgr.load(step), model_state(step))
        assert info_remote(url, 4)["written_bytes"] == 64 * 64 * 4
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("/incremental/run/chunks", detail=False)}
    assert names == referenced(url) and len(names) == 3  # 0's frozen part, 3's and 4's
    assert_equal(torchkeep.load(f"{url}/step-000000000004"), model_state(4))


def info_remote(url: str, step: int) -> dict[str, Any]:
    import fsspec

    with fsspec.open(f"{url}/step-{step:012d}/{MANIFEST_NAME}") as f:
        return json.load(f)["incremental"]  # type: ignore[no-any-return]


def test_a_missing_shared_file_is_reported_and_never_named_again(tmp_path) -> None:
    with manager(tmp_path) as mgr:
        for step in range(3):
            mgr.save(step, model_state(step))
        first = next(n for n in pool_files(tmp_path) if "-000000000000-" in n)
        os.remove(tmp_path / POOL_NAME / first)
        problem = torchkeep.verify(mgr.step_path(2)).problem
        assert problem is not None and f"data file ../chunks/{first} is missing" in problem
        with pytest.raises(TorchkeepError, match="is missing"):
            mgr.load(2)
        mgr.save(3, model_state(3))  # the chunks of the missing file are written again
        assert first not in RunDirectory(tmp_path).references(3)
        assert_equal(mgr.load(3), model_state(3))


@pytest.mark.parametrize("mmap", [None, False])
def test_a_partly_changed_tensor_reads_its_chunks_from_both_files(tmp_path, mmap) -> None:
    table = torch.randn(4096, 64)  # 16 chunks of 64 KiB
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table})
        table[300:310] += 1.0
        mgr.save(1, {"emb": table})
    step1 = tmp_path / "step-000000000001"
    got = torchkeep.load(step1, mmap=mmap)["emb"]
    assert torch.equal(got, table)
    got[0, 0] = 123.0  # a private copy: neither the file nor the next load sees it
    assert torch.equal(torchkeep.load(step1, mmap=mmap)["emb"], table)
    assert np.array_equal(torchkeep.load(step1, backend="numpy")["emb"], table.numpy())
    first, second = sorted(pool_files(tmp_path))
    for name in (second, first):  # the changed chunk, then one of the unchanged ones
        flip_byte(tmp_path / POOL_NAME / name, at=100)
        with pytest.raises(IntegrityError, match="'emb' of step 1"):
            torchkeep.load(step1, mmap=mmap)
        flip_byte(tmp_path / POOL_NAME / name, at=100)


def _spy_on_fixed_maps(monkeypatch: Any, fail: bool = False) -> list[int]:
    """Count (and optionally fail) the page maps a restore lays over a private map."""
    from torchkeep.storage import fixedmap

    real = fixedmap._mmap
    if real is None:
        pytest.skip("this platform has no mmap at a fixed address: restores copy chunks")
    calls: list[int] = []

    def spy(*args: Any) -> Any:
        calls.append(args[1])
        return fixedmap.ctypes.c_void_p(-1).value if fail else real(*args)

    monkeypatch.setattr(fixedmap, "_mmap", spy)
    return calls


def test_changed_chunks_are_written_at_their_place_in_a_page(tmp_path) -> None:
    from torchkeep.formats.manifest import PAGE_PHASE

    table = torch.randn(4096, 63)  # rows of 252 bytes: chunk starts are not page multiples
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table, "bias": torch.ones(3)})
        table[1000:1010] += 1.0
        table[3000] += 1.0
        mgr.save(1, {"emb": table, "bias": torch.ones(3)})
        for step in (0, 1):
            chunks = tensor_chunks(mgr, step, "emb")
            assert len(chunks) > 1
            starts = [byte_range((4096, 63), c["offsets"], c["shape"], 4)[0] for c in chunks]
            assert all(c["offset"] % PAGE_PHASE == s % PAGE_PHASE
                       for c, s in zip(chunks, starts, strict=True))
            assert tensor_chunks(mgr, step, "bias")[0]["offset"] % 64 == 0


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="needs POSIX mmap")
def test_a_restore_maps_the_changed_chunks_over_the_first_file(tmp_path, monkeypatch) -> None:
    calls = _spy_on_fixed_maps(monkeypatch)
    table = torch.randn(4096, 64)  # 16 chunks of 256 rows
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table})
        table[300:310] += 1.0      # chunk 1
        table[1024:1536] += 1.0    # chunks 4 and 5
        table[4095] += 1.0         # chunk 15
        mgr.save(1, {"emb": table})
        first = tensor_chunks(mgr, 0, "emb")[0]["file"]
        changed = [c for c in tensor_chunks(mgr, 1, "emb") if c["file"] != first]
    assert len(changed) == 4
    step1 = tmp_path / "step-000000000001"
    got = torchkeep.load(step1)["emb"]
    assert torch.equal(got, table)
    # neighbouring changed chunks are one map; every changed byte is mapped, none copied
    assert sum(calls) == sum(c["nbytes"] for c in changed) and len(calls) == 3
    got[300:310] = 0.0  # copy-on-write: neither the shared file nor the next load sees it
    got[0] = 0.0
    assert torch.equal(torchkeep.load(step1)["emb"], table)
    assert np.array_equal(torchkeep.load(step1, backend="numpy")["emb"], table.numpy())


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="needs POSIX mmap")
def test_a_restore_whose_page_map_fails_copies_the_chunks(tmp_path, monkeypatch) -> None:
    table = torch.randn(4096, 64)
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table})
        table[300:310] += 1.0
        mgr.save(1, {"emb": table})
    calls = _spy_on_fixed_maps(monkeypatch, fail=True)
    assert torch.equal(torchkeep.load(tmp_path / "step-000000000001")["emb"], table)
    assert calls  # it was tried, failed, and the tensor was read instead


def test_map_into_maps_whole_pages_and_reads_the_rest(tmp_path) -> None:
    from torchkeep.storage.fixedmap import PAGE
    from torchkeep.storage.source import open_source

    first = np.random.default_rng(0).integers(0, 256, 16 * PAGE, dtype=np.uint8)
    second = np.random.default_rng(1).integers(0, 256, 16 * PAGE, dtype=np.uint8)
    (tmp_path / "a").write_bytes(first.tobytes())
    (tmp_path / "b").write_bytes(second.tobytes())
    a, b = open_source(str(tmp_path / "a")), open_source(str(tmp_path / "b"))
    cases = [(PAGE, PAGE, 4 * PAGE),            # whole pages
             (100, PAGE + 100, 3 * PAGE + 7),   # the same place in a page: ends read
             (100, 2 * PAGE + 37, 5 * PAGE),    # different places: all read
             (10, 10, 50)]                      # less than a page
    for at, offset, n in cases:
        view = a.private_map(0, 16 * PAGE)
        assert view is not None
        b.map_into(offset, view[at : at + n])
        expected = first.copy()
        expected[at : at + n] = second[offset : offset + n]
        assert np.array_equal(np.frombuffer(view, dtype=np.uint8), expected), (at, offset, n)
        view[at] = (view[at] + 1) % 256  # copy-on-write: the files never change
    assert (tmp_path / "a").read_bytes() == first.tobytes()
    assert (tmp_path / "b").read_bytes() == second.tobytes()
    a.close()
    b.close()


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="needs POSIX mmap")
@pytest.mark.parametrize("placed", [True, False])
def test_chunks_not_placed_in_a_page_are_copied_instead(tmp_path, monkeypatch, placed) -> None:
    """Runs written before chunks were placed at their phase in a page (64-byte aligned
    only) restore as well: those chunks are read into place."""
    from torchkeep.manager import incremental

    if not placed:
        monkeypatch.setattr(incremental, "PAGE_PHASE", 64)
    table = torch.randn(4096, 63)  # chunks of 260 rows, 65520 bytes: starts off the page
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table})
        table[800] += 1.0  # chunk 3, starting at byte 196560 of the tensor
        mgr.save(1, {"emb": table})
    calls = _spy_on_fixed_maps(monkeypatch)
    assert torch.equal(torchkeep.load(tmp_path / "step-000000000001")["emb"], table)
    assert len(calls) == (1 if placed else 0)


@pytest.mark.parametrize("nbytes", [4096 * 64 * 4, 16 << 20])  # read in turn; in parallel
def test_a_copied_restore_reads_each_byte_once(tmp_path, monkeypatch, nbytes) -> None:
    """mmap=False reads a partly changed tensor's unchanged bytes from the first file and
    its changed chunks from theirs, never both."""
    from torchkeep.storage.source import Source

    table = torch.randn(nbytes // 256, 64)
    with manager(tmp_path) as mgr:
        mgr.save(0, {"emb": table})
        table[300:310] += 1.0
        table[-1] += 1.0
        mgr.save(1, {"emb": table})
    read: list[int] = []
    real = Source.readinto

    def counted(self: Source, offset: int, out: memoryview) -> None:
        read.append(out.nbytes)
        real(self, offset, out)

    monkeypatch.setattr(Source, "readinto", counted)
    got = torchkeep.load(tmp_path / "step-000000000001", mmap=False)["emb"]
    assert torch.equal(got, table)
    assert sum(read) == table.nbytes
