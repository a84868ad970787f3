"""Stock torch.distributed.checkpoint (DCP) directories, read torch-free (formats/dcp.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).parent))  # dcp_scenarios, for the forkserver's ranks

import dcp_scenarios
import torchkeep
from conftest import flip_byte, run_without_torch
from hostile import Evil, Pickle, shell_touch
from torchkeep.distributed.launch import run_ranks
from torchkeep.errors import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

METADATA = "torch.distributed.checkpoint.metadata"


# -- helpers ------------------------------------------------------------------------------------


def dcp_save(state: dict[str, Any], directory: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    return directory


def assert_same(loaded: Any, saved: Any, path: str = "") -> None:
    """Equal trees; tensors bit for bit with the same dtype."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), path
        assert loaded.dtype == saved.dtype and loaded.shape == saved.shape, path
        assert torch.equal(loaded, saved), path
    elif isinstance(saved, dict):
        assert isinstance(loaded, dict) and list(loaded) == [str(k) for k in saved], path
        for key, value in saved.items():
            assert_same(loaded[str(key)], value, f"{path}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert type(loaded) is type(saved) and len(loaded) == len(saved), path
        for i, (a, b) in enumerate(zip(loaded, saved, strict=True)):
            assert_same(a, b, f"{path}/{i}")
    else:
        assert type(loaded) is type(saved) and loaded == saved, path


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_numpy(loaded: Any, saved: Any, path: str = "") -> None:
    """As assert_same, with numpy arrays loaded for the tensors (compared by their bytes)."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, np.ndarray), path
        assert loaded.shape == tuple(saved.shape), path
        assert str(loaded.dtype) == str(saved.dtype).removeprefix("torch."), path
        assert np.ascontiguousarray(loaded).tobytes() == raw_bytes(saved), path
    elif isinstance(saved, dict):
        assert isinstance(loaded, dict) and list(loaded) == [str(k) for k in saved], path
        for key, value in saved.items():
            assert_same_numpy(loaded[str(key)], value, f"{path}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), path
        for i, (a, b) in enumerate(zip(loaded, saved, strict=True)):
            assert_same_numpy(a, b, f"{path}/{i}")
    else:
        assert loaded == saved, path


def trained_state() -> dict[str, Any]:
    """Model and AdamW state after a step (get_state_dict: fqn-keyed optimizer state),
    plus tensors of several dtypes, nesting, a list and plain values."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 6)).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    return {
        "model": model_state,
        "optim": optim_state,
        "tensors": {
            "f32": torch.randn(3, 4),
            "bf16": torch.randn(5).to(torch.bfloat16),
            "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(2, 6),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 4),
            "transposed": torch.randn(4, 3).t(),  # a view: the item keeps its strides
            "deep": {"f16": torch.randn(2, 2).half(), "u8": torch.arange(7, dtype=torch.uint8)},
        },
        "list": [torch.ones(2), torch.zeros(3, dtype=torch.int32),
                 {"inner": torch.full((2,), 7.0)}],
        "plain_list": [1, 2.5, "three"],
        "pair": (torch.arange(4), 5),  # a tuple is one value: a torch.save holding a tensor
        "by_int": {3: torch.ones(1)},  # DCP's flattening turns the key into "3"
        "step": 3,
        "lr": 0.125,
        "name": "run-1",
        "none": None,
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    state = trained_state()
    return dcp_save(state, tmp_path_factory.mktemp("dcp") / "single"), state


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dcp") / "sharded"
    results = run_ranks(2, dcp_scenarios.save_sharded, str(directory), timeout=120)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.value["local_rows"] for r in results] == [4, 3]  # uneven Shard(0)
    return directory


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def rewrite_metadata(directory: Path, change: Any) -> None:
    """Edit ``.metadata`` with stock pickle (a trusted file of our own making)."""
    path = directory / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata, protocol=4))


def first_index(metadata: Any, fqn: str) -> Any:
    return next(k for k in metadata.storage_data if k.fqn == fqn)


# -- single process -----------------------------------------------------------------------------


def test_single_process_loads_bit_for_bit(single: tuple[Path, dict[str, Any]]) -> None:
    directory, state = single
    loaded = torchkeep.load(directory)
    assert_same(loaded, state)
    assert loaded["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded["tensors"]["transposed"].stride() == (1, 3)


def test_single_process_numpy_backend(single: tuple[Path, dict[str, Any]]) -> None:
    directory, state = single
    assert_same_numpy(torchkeep.load(directory, backend="numpy"), state)
    assert_same_numpy(torchkeep.load(directory, backend="numpy", mmap=True), state)


def test_open_inspect_verify_convert(single: tuple[Path, dict[str, Any]],
                                     tmp_path: Path) -> None:
    directory, state = single
    with torchkeep.open(directory) as handle:
        assert handle.format == "dcp"
        assert handle.info["version"] == "1.0.0"
        assert "model/0.weight" in handle
        assert torch.equal(handle.tensor("tensors/deep/u8"), state["tensors"]["deep"]["u8"])
    report = torchkeep.inspect(directory)
    assert report.format == "dcp"
    assert {v.name: v.repr for v in report.values}["step"] == "3"
    result = torchkeep.verify(directory)
    assert result.intact and result.format == "dcp" and result.checked > 0
    assert any("no checksums of its own" in note for note in result.notes)
    out = tmp_path / "out.safetensors"
    torchkeep.convert(directory, out)
    assert_same(torchkeep.load(out)["tensors"], state["tensors"])


def test_verify_finds_a_flipped_bit(single: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    saved = single[1]["tensors"]["f32"]
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    info = metadata.storage_data[first_index(metadata, "tensors.f32")]
    item = (directory / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    flip_byte(directory / info.relative_path, info.offset + item.index(raw_bytes(saved)) + 5,
              0x10)
    assert not torch.equal(torchkeep.load(directory)["tensors"]["f32"], saved)  # as DCP
    result = torchkeep.verify(directory)
    assert not result.intact
    assert "tensors.f32" in result.problem and "CRC-32" in result.problem


# -- two real ranks -----------------------------------------------------------------------------


def test_sharded_dtensors_assemble(sharded: Path) -> None:
    full = dcp_scenarios.full_tensors()
    loaded = torchkeep.load(sharded)
    for key, tensor in full.items():
        assert_same(loaded["model"][key], tensor, key)
    assert loaded["extra"] == {"step": 3, "note": "hello"}
    arrays = torchkeep.load(sharded, backend="numpy")
    for key, tensor in full.items():
        assert_same_numpy(arrays["model"][key], tensor, key)
    with torchkeep.open(sharded) as handle:
        assert handle.info["chunks"] == 5 and handle.info["data_files"] == 2
    assert torchkeep.verify(sharded).intact


def test_sharded_torch_free(sharded: Path, single: tuple[Path, dict[str, Any]],
                            tmp_path: Path) -> None:
    converted = tmp_path / "converted.safetensors"
    result = run_without_torch(f"""
        import json
        import torchkeep
        from torchkeep.cli.main import main
        tree = torchkeep.load({str(sharded)!r}, backend="numpy")
        model = tree["model"]
        print(json.dumps({{"w": model["w"].tolist(), "c": model["c"].tolist(),
                          "r": model["r"].astype("float32").tolist(), "extra": tree["extra"],
                          "single": torchkeep.load({str(single[0])!r}, backend="numpy")["step"]}}))
        for command in ("inspect", "verify"):
            code = main([command, {str(sharded)!r}])
            print("EXIT", command, code)
        print("EXIT convert", main(["convert", {str(sharded)!r}, {str(converted)!r}]))
        import sys
        assert sys.modules["torch"] is None
    """)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout.splitlines()[0])
    full = dcp_scenarios.full_tensors()
    assert doc["w"] == full["w"].tolist()
    assert doc["c"] == full["c"].tolist()
    assert doc["r"] == full["r"].float().tolist()
    assert doc["extra"] == {"step": 3, "note": "hello"} and doc["single"] == 3
    assert "EXIT inspect 0" in result.stdout and "EXIT verify 0" in result.stdout
    assert "format   dcp" in result.stdout and "intact (dcp;" in result.stdout
    assert "EXIT convert 0" in result.stdout
    converted_tree = torchkeep.load(converted)
    for key, tensor in full.items():
        assert_same(converted_tree["model"][key], tensor, key)


# -- hostile and broken directories -------------------------------------------------------------


def test_metadata_that_runs_code(single: tuple[Path, dict[str, Any]], tmp_path: Path,
                                 marker: Path) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    (directory / ".metadata").write_bytes(
        Pickle(4).call("os", "system", shell_touch(marker)).finish())
    for attempt in (torchkeep.load, torchkeep.inspect, torchkeep.verify, torchkeep.open):
        with pytest.raises(UnsafeCheckpointError) as info:
            attempt(directory)
        assert info.value.global_name == "os.system"
    assert not marker.exists()


@pytest.mark.parametrize("build", [
    # a default-table global that has no place in .metadata
    lambda p: p.call("collections", "OrderedDict"),
    lambda p: p.call("torch._utils", "_rebuild_tensor_v2"),
    lambda p: p.call("builtins", "getattr"),
])
def test_metadata_names_only_dcp_globals(build: Any, tmp_path: Path,
                                         single: tuple[Path, dict[str, Any]]) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    (directory / ".metadata").write_bytes(build(Pickle(4)).finish())
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load(directory)


@pytest.mark.parametrize("build", [
    # NEWOBJ with arguments
    lambda p: p.stack_global(METADATA, "Metadata").push((1,)).newobj(),
    # REDUCE on a record class (only NEWOBJ + BUILD builds one)
    lambda p: p.stack_global(METADATA, "Metadata").push(()).reduce(),
    # a memory format outside 0..2
    lambda p: p.stack_global(METADATA, "_MEM_FORMAT_ENCODING").push((7,)).reduce(),
    # BUILD states of the wrong types
    lambda p: p.stack_global(METADATA, "Metadata").empty_tuple().newobj()
               .push({"state_dict_metadata": 5, "storage_data": {}}).build(),
    lambda p: p.stack_global(METADATA, "TensorProperties").empty_tuple().newobj()
               .push({"dtype": 1}).build(),
    lambda p: p.stack_global(METADATA, "ChunkStorageMetadata").empty_tuple().newobj()
               .push({"offsets": (0, -1), "sizes": (1, 1)}).build(),
    # a Metadata never built, and something that is not a Metadata at all
    lambda p: p.stack_global(METADATA, "Metadata").empty_tuple().newobj(),
    lambda p: p.push({"a": 1}),
])
def test_malformed_metadata(build: Any, tmp_path: Path,
                            single: tuple[Path, dict[str, Any]]) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    (directory / ".metadata").write_bytes(build(Pickle(4)).finish())
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load(directory)


def test_byte_io_item_that_runs_code(tmp_path: Path, marker: Path) -> None:
    directory = dcp_save({"w": torch.ones(3), "x": Evil(marker)}, tmp_path / "evil")
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(directory)
    assert "system" in info.value.global_name
    assert "'x'" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.inspect(directory)
    assert not marker.exists()


def test_byte_io_item_of_a_user_class(tmp_path: Path) -> None:
    directory = dcp_save({"note": dcp_scenarios.Note("hi")}, tmp_path / "note")
    with pytest.raises(UnsafeCheckpointError, match=r"dcp_scenarios\.Note"):
        torchkeep.load(directory)
    loaded = torchkeep.load(directory, allow=["dcp_scenarios.Note"])
    assert loaded["note"].qualname == "dcp_scenarios.Note"
    assert loaded["note"].state == {"text": "hi"}


def test_relative_path_outside_the_directory(tmp_path: Path,
                                             single: tuple[Path, dict[str, Any]]) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    (tmp_path / "x").write_bytes((directory / "__0_0.distcp").read_bytes())

    def escape(metadata: Any) -> None:
        index = first_index(metadata, "tensors.f32")
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index],
                                                           relative_path="../x")

    rewrite_metadata(directory, escape)
    with pytest.raises(CorruptCheckpointError, match="relative_path"):
        torchkeep.load(directory)


def test_truncated_data_file(tmp_path: Path, single: tuple[Path, dict[str, Any]]) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    data = directory / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-300])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        torchkeep.load(directory)
    assert not torchkeep.verify(directory).intact


def test_missing_data_file(tmp_path: Path, single: tuple[Path, dict[str, Any]]) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    (directory / "__0_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        torchkeep.load(directory)


def test_transform_descriptors_are_refused(tmp_path: Path,
                                           single: tuple[Path, dict[str, Any]]) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")

    def zstd(metadata: Any) -> None:
        index = first_index(metadata, "tensors.f32")
        metadata.storage_data[index] = dataclasses.replace(
            metadata.storage_data[index], transform_descriptors=["stream.zstd/1"])

    rewrite_metadata(directory, zstd)
    with pytest.raises(UnsupportedFormatError, match=r"stream\.zstd/1"):
        torchkeep.load(directory)


def test_chunks_must_tile_the_tensor(tmp_path: Path, sharded: Path) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def resize(which: int, sizes: tuple[int, ...]) -> Any:
        def change(metadata: Any) -> None:
            chunks = metadata.state_dict_metadata["model.w"].chunks
            chunks[which] = ChunkStorageMetadata(chunks[which].offsets, torch.Size(sizes))
        return change

    cases = [
        (resize(1, (2, 5)), "do not cover"),  # a gap: row 6 in no chunk
        (resize(0, (5, 5)), "overlap"),  # row 4 in both chunks
        (resize(1, (4, 5)), "outside"),  # rows 4..8 of a 7-row tensor
    ]
    for i, (change, message) in enumerate(cases):
        directory = copy_dir(sharded, tmp_path / f"case{i}")
        rewrite_metadata(directory, change)
        with pytest.raises(CorruptCheckpointError, match=message):
            torchkeep.load(directory)
        assert not torchkeep.verify(directory).intact


def test_chunk_rank_must_match(tmp_path: Path, sharded: Path) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def change(metadata: Any) -> None:
        chunks = metadata.state_dict_metadata["model.w"].chunks
        chunks[0] = ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))

    directory = copy_dir(sharded, tmp_path / "copy")
    rewrite_metadata(directory, change)
    with pytest.raises(CorruptCheckpointError, match="dimensions"):
        torchkeep.load(directory)


def test_item_that_is_not_its_chunk(tmp_path: Path, single: tuple[Path, dict[str, Any]]) -> None:
    # point tensors.f32 at the item of another tensor: dtype or shape no longer match
    directory = copy_dir(single[0], tmp_path / "copy")

    def swap(metadata: Any) -> None:
        a = first_index(metadata, "tensors.f32")
        b = first_index(metadata, "tensors.i64")
        metadata.storage_data[a] = metadata.storage_data[b]

    rewrite_metadata(directory, swap)
    with pytest.raises(CorruptCheckpointError, match=r"tensors\.f32"):
        torchkeep.load(directory)


def test_a_torchkeep_step_is_not_dcp(tmp_path: Path) -> None:
    from torchkeep.formats.detect import directory_format
    from torchkeep.storage.filesystem import LocalFileSystem

    fs = LocalFileSystem()
    (tmp_path / "COMMITTED").write_text("{}")
    (tmp_path / ".metadata").write_bytes(b"")
    assert directory_format(fs, str(tmp_path)) == "torchkeep"
    (tmp_path / "COMMITTED").unlink()
    assert directory_format(fs, str(tmp_path)) == "dcp"
    (tmp_path / ".metadata").unlink()
    (tmp_path / "__0.metadata").write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="per-rank"):
        torchkeep.load(tmp_path)


# -- scan ---------------------------------------------------------------------------------------


def test_scan_of_a_stock_dcp_directory_is_clean(single: tuple[Path, dict[str, Any]],
                                                sharded: Path) -> None:
    for directory in (single[0], sharded):
        report = torchkeep.scan(directory)
        assert report.format == "dcp" and report.verdict == "clean", report
        assert report.pickles > 1  # .metadata and every item's data.pkl


def test_scan_flags_hostile_metadata_and_items(single: tuple[Path, dict[str, Any]],
                                               tmp_path: Path, marker: Path) -> None:
    directory = copy_dir(single[0], tmp_path / "copy")
    (directory / ".metadata").write_bytes(
        Pickle(4).call("os", "system", shell_touch(marker)).finish())
    report = torchkeep.scan(directory)
    assert report.verdict == "dangerous"
    assert any(f.name == "os.system" for f in report.flagged)
    evil = dcp_save({"w": torch.ones(3), "x": Evil(marker)}, tmp_path / "evil")
    report = torchkeep.scan(evil)
    assert report.verdict == "dangerous" and any("system" in f.name for f in report.flagged)
    assert not marker.exists()
    # DCP's record classes are safe only inside .metadata: in a value item they are not
    assert all(f.location != ".metadata" for f in report.flagged)
