"""A file rewritten in place under loaded tensors: the default survives, as torch.load's.

torch.save over an existing path truncates the file and writes it again in place. A
tensor that is a page of a memory map of that file dies with SIGBUS when touched; a copy
does not notice. ``torchkeep.load`` copies by default (read in parallel), maps with
``mmap=True``, and maps the data files of step directories, which the manager never
rewrites in place (a deleted step stays readable while mapped).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep
from conftest import quiet_env

_REWRITE = """
import sys, torch, torchkeep
path, fmt, mode, backend, how = sys.argv[1:6]
mmap = {"default": None, "true": True, "false": False}[mode]
torchkeep.save({"w": torch.arange(1 << 21, dtype=torch.float32), "b": torch.ones(3)}, path,
               format=fmt)
if how == "open":
    with torchkeep.open(path) as handle:
        state = {"w": handle.tensor("w", backend=backend, mmap=mmap)}
else:
    state = torchkeep.load(path, mmap=mmap, backend=backend)
if how == "torch.save":  # what another training process does to the same path
    torch.save({"other": torch.zeros(10)}, path)
else:
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(b"rewritten")
print(float(state["w"][-1]))
"""


def _rewrite_under(tmp_path: Path, fmt: str, mode: str, backend: str = "torch",
                   how: str = "truncate") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _REWRITE, str(tmp_path / "ckpt"), fmt, mode,
                           backend, how], capture_output=True, text=True, timeout=120,
                          env=quiet_env(), check=False)


@pytest.mark.parametrize("fmt,backend,how", [
    *((fmt, "torch", how) for fmt in ("torch", "torch-legacy", "safetensors")
      for how in ("truncate", "torch.save", "open")),
    ("torch", "numpy", "truncate"), ("safetensors", "numpy", "open"),
])
def test_the_default_survives_a_file_rewritten_in_place(tmp_path: Path, fmt: str,
                                                        backend: str, how: str) -> None:
    done = _rewrite_under(tmp_path, fmt, "default", backend, how)
    assert done.returncode == 0, done.stderr[-500:]
    assert float(done.stdout) == float((1 << 21) - 1)  # the values as they were loaded


def test_mmap_true_maps_and_dies_on_a_rewrite_as_torch_load_mmap_does(tmp_path: Path) -> None:
    done = _rewrite_under(tmp_path, "torch", "true")
    assert done.returncode == -signal.SIGBUS
    assert _rewrite_under(tmp_path, "torch", "false").returncode == 0


def test_default_load_holds_copies_and_mmap_true_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torchkeep.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, path)
    copied = torchkeep.load(path)["w"]
    mapped = torchkeep.load(path, mmap=True)["w"]
    path.write_bytes(b"")  # a truncation; only the copy may be touched after it
    assert float(copied[-1]) == float((1 << 20) - 1)
    del mapped


def test_step_directories_are_mapped_and_survive_their_deletion(tmp_path: Path) -> None:
    import shutil

    from torchkeep.formats.loader import StorageLoader
    from torchkeep.formats.manifest import read_step_dir

    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": torch.arange(1 << 20, dtype=torch.float32)})
        step = mgr.step_path(1)
    parsed = read_step_dir(step)
    assert StorageLoader(parsed).use_mmap  # committed steps are never rewritten in place
    parsed.close()
    restored = torchkeep.load(step)
    shutil.rmtree(step)  # what retention and prune do: unlink, under the map
    assert float(restored["w"][-1]) == float((1 << 20) - 1)


def test_parallel_copies_equal_the_file_for_many_and_big_records(tmp_path: Path) -> None:
    tree = {f"t{i}": torch.randn(1000 + i) for i in range(300)}
    tree["big"] = torch.randn(10 << 20)  # read in 16 MiB pieces by several threads
    path = tmp_path / "many.pt"
    torch.save(tree, path)
    loaded = torchkeep.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in tree.items())
    # shared storages stay shared under the parallel read
    base = torch.arange(100.0)
    torch.save({"a": base[10:20], "b": base[50:]}, path)
    shared = torchkeep.load(path)
    assert shared["a"].untyped_storage().data_ptr() == shared["b"].untyped_storage().data_ptr()
