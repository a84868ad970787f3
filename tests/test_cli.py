"""Every command, run in-process: output, --json shapes, exit codes, failure modes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torchkeep
from conftest import flip_byte
from hostile import Evil
from torchkeep.cli.main import main


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def run(capsys):
    def invoke(*args: str) -> Result:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def files(tmp_path: Path, seed_checkpoint) -> dict[str, Path]:
    pt = tmp_path / "seed.pt"
    torch.save(seed_checkpoint, pt)
    st = tmp_path / "seed.safetensors"
    torchkeep.save(seed_checkpoint, st)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil(tmp_path / "PWNED")}, protocol=2))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(pt.read_bytes()[:-100])
    return {"pt": pt, "st": st, "evil": evil, "broken": broken, "missing": tmp_path / "no.pt"}


def test_inspect_human_and_json(run, files) -> None:
    result = run("inspect", files["pt"])
    assert result.code == 0
    assert "model_state_dict/" in result.out and "fc1.weight" in result.out
    assert "[120, 400]" in result.out and "by dtype" in result.out
    doc = run("inspect", files["pt"], "--json").json()
    assert doc["format"] == "torch"
    assert doc["num_tensors"] == 20
    fc1 = next(t for t in doc["tensors"] if t["name"] == "model_state_dict/fc1.weight")
    assert fc1 == {**fc1, "path": ["model_state_dict", "fc1.weight"], "dtype": "float32",
                   "shape": [120, 400], "nbytes": 120 * 400 * 4}
    assert doc["total_bytes"] == sum(t["nbytes"] for t in doc["tensors"])
    epoch = next(v for v in doc["values"] if v["name"] == "epoch")
    assert epoch["repr"] == "2" and epoch["path"] == ["epoch"]
    momentum = next(t for t in doc["tensors"] if t["name"].endswith("0/momentum_buffer"))
    assert momentum["path"][:3] == ["optimizer_state_dict", "state", 0]


def test_inspect_depth_folds_subtrees(run, files) -> None:
    out = run("inspect", files["pt"], "--depth", "1").out
    assert "model_state_dict/" in out and "(10 tensors" in out
    assert "fc1.weight" not in out


def test_inspect_step_directory_and_safetensors(run, files, tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, {"w": torch.ones(3)}, metrics={"loss": 1.0})
        step_dir = mgr.step_path(5)
    assert run("inspect", step_dir, "--json").json()["format"] == "torchkeep"
    assert run("inspect", files["st"], "--json").json()["num_tensors"] == 20


@pytest.mark.parametrize("command", ["inspect", "verify", "scan"])
def test_missing_file_is_a_one_line_error_with_exit_3(run, files, command) -> None:
    result = run(command, files["missing"])
    assert result.code == 3
    assert result.err.strip().count("\n") == 0
    assert "no such file" in result.err and "Traceback" not in result.err


def test_malformed_and_hostile_files(run, files) -> None:
    bad = run("inspect", files["broken"])
    assert bad.code == 3 and "torchkeep: error:" in bad.err and "Traceback" not in bad.err
    hostile = run("inspect", files["evil"])
    assert hostile.code == 4 and "posix.system" in hostile.err


def test_diff_equal_across_formats_and_different(run, files, tmp_path) -> None:
    assert run("diff", files["pt"], files["st"]).code == 0
    changed = torchkeep.load(files["pt"])
    changed["model_state_dict"]["fc1.bias"] = changed["model_state_dict"]["fc1.bias"] + 0.5
    changed["epoch"] = 3
    changed["extra"] = 1
    other = tmp_path / "other.pt"
    torchkeep.save(changed, other)
    result = run("diff", files["pt"], other)
    assert result.code == 1
    assert "fc1.bias" in result.out and "0.5" in result.out and "epoch" in result.out
    doc = run("diff", files["pt"], other, "--json").json()
    assert doc["equal"] is False and doc["only_in_b"] == ["extra"]
    assert doc["tensors"][0]["name"] == "model_state_dict/fc1.bias"
    assert doc["tensors"][0]["max_abs_diff"] == pytest.approx(0.5)
    assert doc["values"] == [{"name": "epoch", "a": "2", "b": "3"}]
    assert run("diff", files["pt"], other, "--atol", "0.6").code == 1  # epoch still differs


def test_diff_tolerance_and_dtype_changes(run, tmp_path) -> None:
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torchkeep.save({"w": torch.ones(4)}, a)
    torchkeep.save({"w": torch.ones(4) + 1e-4}, b)
    torchkeep.save({"w": torch.ones(4, dtype=torch.float64)}, c)
    assert run("diff", a, b).code == 1
    assert run("diff", a, b, "--atol", "1e-3").code == 0
    assert run("diff", a, b, "--rtol", "1e-3").code == 0
    changed = run("diff", a, c, "--json").json()["changed"]
    assert changed == [{"name": "w", "what": "dtype", "a": "float32", "b": "float64"}]


def test_convert_formats_select_dtype(run, files, tmp_path) -> None:
    st = tmp_path / "model.safetensors"
    assert run("convert", files["pt"], st, "--select", "model_state_dict").code == 0
    from safetensors.torch import load_file

    plain = load_file(st)
    assert sorted(plain) == sorted(torchkeep.load(files["pt"])["model_state_dict"])
    half = tmp_path / "half.pt"
    assert run("convert", files["pt"], half, "--dtype", "bfloat16").code == 0
    loaded = torch.load(half, weights_only=True)
    assert loaded["model_state_dict"]["fc1.weight"].dtype == torch.bfloat16
    assert loaded["epoch"] == 2
    legacy = tmp_path / "legacy.pt"
    assert run("convert", files["st"], legacy, "--to", "torch-legacy").code == 0
    assert run("diff", files["pt"], legacy).code == 0


def test_convert_shards_like_hugging_face(run, files, tmp_path) -> None:
    dst = tmp_path / "out" / "model.safetensors"
    result = run("convert", files["pt"], dst, "--select", "model_state_dict",
                 "--max-shard-size", "100KB", "--json")
    assert result.code == 0
    doc = result.json()
    assert len(doc["files"]) >= 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    names = {Path(f).name for f in doc["files"]}
    assert set(index["weight_map"].values()) == names
    assert all(n.startswith("model-000") and "-of-" in n for n in names)
    from safetensors.torch import load_file

    merged = {}
    for name in names:
        merged.update(load_file(tmp_path / "out" / name))
    reference = torchkeep.load(files["pt"])["model_state_dict"]
    assert sorted(merged) == sorted(reference)
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in reference.values())


def test_convert_usage_errors(run, files, tmp_path) -> None:
    assert run("convert", files["pt"], tmp_path / "x.pt", "--select", "nope").code == 2
    assert run("convert", files["pt"], tmp_path / "x.pt", "--max-shard-size", "lots").code == 2
    sharding_a_tree = run("convert", files["pt"], tmp_path / "x.pt", "--max-shard-size", "1MB")
    assert sharding_a_tree.code == 2 and "--select" in sharding_a_tree.err
    assert run("convert", files["missing"], tmp_path / "x.pt").code == 3


def test_scan_clean_and_findings(run, files, tmp_path) -> None:
    clean = run("scan", files["pt"], files["st"])
    assert clean.code == 0 and "clean" in clean.out
    found = run("scan", files["pt"], files["evil"], "--json")
    assert found.code == 1
    reports = found.json()
    evil = next(r for r in reports if r["path"].endswith("evil.pt"))
    assert evil["clean"] is False
    assert {"name": "posix.system", "verdict": "unsafe"}.items() <= evil["globals"][0].items()
    unknown = tmp_path / "unknown.pkl"
    unknown.write_bytes(b"\x80\x02cmylib.models\nNet\n)\x81.")
    assert run("scan", unknown).code == 1


def test_scan_sees_a_stack_global_built_from_memoized_strings(run, tmp_path) -> None:
    path = tmp_path / "memo.pkl"
    # push "os", memoize it, pop, then rebuild os.system from the memo
    path.write_bytes(b"\x80\x04\x8c\x02os\x94\x30h\x00\x8c\x06system\x93\x8c\x04true\x85R.")
    result = run("scan", path, "--json")
    assert result.code == 1
    assert result.json()[0]["globals"][0]["name"] == "os.system"


def test_verify_intact_and_corrupt(run, files, tmp_path) -> None:
    assert run("verify", files["pt"]).code == 0
    assert run("verify", files["st"]).code == 0
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(files["pt"].read_bytes())
    flip_byte(bad)  # inside a tensor record
    result = run("verify", bad)
    assert result.code == 1 and "CORRUPT" in result.out and "CRC-32" in result.out
    doc = run("verify", bad, "--json").json()
    assert doc["intact"] is False and "data/" in doc["problem"]


def test_verify_step_directory(run, tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": torch.ones(1000)})
        step = Path(mgr.step_path(1))
    assert run("verify", step).code == 0
    flip_byte(step / "data-00000.bin", at=100, mask=1)
    result = run("verify", step)
    assert result.code == 1 and "'w'" in result.out


def _run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    with torchkeep.CheckpointManager(path, keep_last=2, keep_best=1, best_metric="loss") as mgr:
        for step, loss in enumerate([3.0, 1.0, 2.0, 4.0, 5.0]):
            mgr.save(step * 10, {"w": torch.full((10,), float(step))}, metrics={"loss": loss})
    return path


def test_ls_shows_steps_metrics_and_reasons(run, tmp_path) -> None:
    path = _run_dir(tmp_path)
    result = run("ls", path)
    assert result.code == 0
    assert "keep_last=2, keep_best=1 by loss (min)" in result.out
    assert "best loss" in result.out and "newest" in result.out
    doc = run("ls", path, "--json").json()
    assert [s["step"] for s in doc["steps"]] == [10, 30, 40]
    assert all(s["kept"] for s in doc["steps"])
    assert doc["steps"][0]["metrics"] == {"loss": 1.0}
    assert doc["steps"][0]["reason"].startswith("best loss")
    what_if = run("ls", path, "--keep-last", "1", "--json").json()
    # the run recorded best_metric=loss: its best step (10) stays protected
    assert [s["kept"] for s in what_if["steps"]] == [True, False, True]


def test_prune_uses_the_policies_and_spares_newest_and_best(run, tmp_path) -> None:
    path = _run_dir(tmp_path)
    dry = run("prune", path, "--keep-last", "1", "--metric", "loss", "--dry-run", "--json")
    assert dry.code == 0 and dry.json()["would_delete"] == [30]
    assert sorted(p.name for p in path.iterdir()) == [
        "step-000000000010", "step-000000000030", "step-000000000040"]
    done = run("prune", path, "--keep-last", "1", "--metric", "loss")
    assert done.code == 0 and "deleted 1 of 3" in done.out
    assert sorted(p.name for p in path.iterdir()) == ["step-000000000010", "step-000000000040"]
    assert run("prune", path, "--keep-best", "1").code == 2  # needs --metric


def test_run_commands_on_empty_and_missing_directories(run, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("ls", empty)
    assert result.code == 0 and "0 committed steps" in result.out
    assert run("prune", empty).code == 2  # no policy given or recorded
    assert run("ls", tmp_path / "nope").code == 3


def test_usage_errors_exit_2(run) -> None:
    assert run("inspect").code == 2
    assert run("nonsense").code == 2
    assert run("diff", "a.pt").code == 2


def test_python_dash_m_and_no_torch_or_numpy_import_for_fast_commands(files, tmp_path) -> None:
    # numpy's import is 0.1-0.2 s, most of what `inspect` of a big file costs: the read-only
    # commands on files without numpy values never load it
    run_dir = _run_dir(tmp_path)
    code = (
        "import sys\nfrom torchkeep.cli.main import main\n"
        f"for args in (['inspect', {str(files['pt'])!r}], ['scan', {str(files['pt'])!r}], "
        f"['verify', {str(files['pt'])!r}], ['inspect', {str(files['st'])!r}], "
        f"['verify', {str(files['st'])!r}], ['ls', {str(run_dir)!r}], "
        f"['prune', {str(run_dir)!r}, '--keep-last', '1', '--dry-run']):\n"
        "    assert main(args) == 0, args\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "print('numpy imported:', 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "torch imported: False" in out
    assert "numpy imported: False" in out
    module = subprocess.run([sys.executable, "-m", "torchkeep", "inspect", str(files["pt"]),
                             "--json"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert module.returncode == 0 and json.loads(module.stdout)["num_tensors"] == 20


def test_numpy_values_show_in_inspect(run, tmp_path) -> None:
    path = tmp_path / "np.pt"
    torchkeep.save({"a": np.arange(3), "n": None}, path)
    doc = run("inspect", path, "--json").json()
    assert doc["tensors"][0]["dtype"] == "numpy.int64"
    assert doc["values"][0]["repr"] == "None"


def test_prune_protects_the_runs_own_best_step_without_metric_flag(run, tmp_path) -> None:
    path = _run_dir(tmp_path)  # recorded best_metric=loss: step 10 is the best
    doc = run("prune", path, "--keep-last", "1", "--dry-run", "--json").json()
    assert doc["would_delete"] == [30]
    assert doc["kept"]["10"].startswith("best loss")


def test_verify_step_directory_names_structural_damage(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": torch.ones(1000), "b": torch.zeros(10)})
        step = Path(mgr.step_path(1))
    intact = torchkeep.verify(step)
    assert intact.intact and intact.checked == 3 and intact.checked_bytes == 4040
    data = step / "data-00000.bin"
    data.write_bytes(data.read_bytes()[:1000])
    truncated = torchkeep.verify(step)
    assert not truncated.intact and "runs past the end of data-00000.bin" in truncated.problem
    (step / "manifest.json").write_text("{}")
    assert "does not match its checksum in the commit marker" in torchkeep.verify(step).problem
