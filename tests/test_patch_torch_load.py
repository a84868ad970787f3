"""torchkeep.patch_torch_load: torch.load's arguments and meanings through the restricted
loader; exact undo; refusal of weights_only=False; real libraries that load bundled weights
(lpips, facenet-pytorch) build identical models with and without it."""

from __future__ import annotations

import inspect
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.serialization

import torchkeep
from hostile import Evil
from thirdparty import NODEPS_DIR, run_thirdparty

ORIGINAL = torch.serialization.load


@pytest.fixture(autouse=True)
def _no_patch_left_behind():
    assert torch.load is ORIGINAL
    yield
    torchkeep.unpatch_torch_load()
    assert torch.load is ORIGINAL and torch.serialization.load is ORIGINAL


class Point:
    """A class a user registers with torch.serialization.add_safe_globals."""

    def __init__(self, x: int) -> None:
        self.x = x


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert a.device == b.device
        assert torch.equal(a.view(torch.uint8) if a.numel() else a,
                           b.view(torch.uint8) if b.numel() else b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.fixture
def saved(tmp_path, seed_checkpoint) -> Path:
    path = tmp_path / "seed.pt"
    state = dict(seed_checkpoint, param=torch.nn.Parameter(torch.arange(4.0)),
                 half=torch.ones(3, dtype=torch.bfloat16))
    torch.save(state, path)
    return path


def test_patch_and_undo_restore_the_exact_function_objects() -> None:
    patch = torchkeep.patch_torch_load()
    assert patch.active and torch.load is not ORIGINAL
    assert torch.serialization.load is torch.load
    assert inspect.signature(torch.load) == inspect.signature(ORIGINAL)
    assert torch.load.__name__ == "load" and torch.load.__doc__ == ORIGINAL.__doc__
    patch.undo()
    assert not patch.active and torch.load is ORIGINAL and torch.serialization.load is ORIGINAL
    patch.undo()  # a second undo does nothing
    assert torch.load is ORIGINAL


def test_nested_patches_undo_newest_first() -> None:
    outer = torchkeep.patch_torch_load()
    after_outer = torch.load
    with torchkeep.patch_torch_load() as inner:
        assert torch.load is not after_outer
        with pytest.raises(RuntimeError, match="reverse order"):
            outer.undo()
        assert outer.active
    assert not inner.active and torch.load is after_outer
    second = torchkeep.patch_torch_load()
    assert torchkeep.unpatch_torch_load() == 2
    assert not outer.active and not second.active and torch.load is ORIGINAL


def test_results_equal_stock_torch_load_for_every_argument_form(saved, tmp_path) -> None:
    expected = ORIGINAL(saved, weights_only=True)
    with torchkeep.patch_torch_load() as patch:
        calls = {
            "path": lambda: torch.load(saved),
            "str": lambda: torch.load(str(saved), "cpu"),
            "weights_only": lambda: torch.load(saved, weights_only=True),
            "device": lambda: torch.load(saved, map_location=torch.device("cpu")),
            "dict": lambda: torch.load(saved, map_location={"cpu": "cpu"}),
            "callable": lambda: torch.load(saved, map_location=lambda storage, loc: storage),
            "mmap": lambda: torch.load(saved, mmap=True),
            "file object": lambda: torch.load(open(saved, "rb")),  # noqa: SIM115
            "BytesIO": lambda: torch.load(io.BytesIO(saved.read_bytes())),
            "encoding": lambda: torch.load(saved, encoding="utf-8"),
        }
        for what, call in calls.items():
            got = call()
            try:
                _assert_same(expected, got)
            except AssertionError:
                pytest.fail(f"torch.load with {what} differs from stock torch.load")
        assert type(got["param"]) is torch.nn.Parameter
        assert len(patch.loaded) == len(calls) and patch.loaded[0] == str(saved)
    assert torch.load is ORIGINAL


def test_weights_only_false_is_refused_before_anything_is_read(tmp_path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=2))
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with torchkeep.patch_torch_load():
        for path in (plain, evil):
            with pytest.raises(torchkeep.UnsafeCheckpointError, match="weights_only=False"):
                torch.load(path, weights_only=False)
        with pytest.raises(torchkeep.UnsafeCheckpointError, match="pickle_module"):
            torch.load(plain, pickle_module=type("dill", (), {}))
        with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"os\.system|posix"):
            torch.load(evil)  # the default (weights-only) call reads it, and refuses it
        with pytest.raises(TypeError, match="unexpected keyword"):
            torch.load(plain, nonsense=1)
        assert torch.load(plain, pickle_module=pickle)["w"].tolist() == [1.0, 1.0]
    assert not marker.exists()


def test_restricted_mode_serves_weights_only_false_and_still_refuses_code(tmp_path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=2))
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2), "point": Point(3)}, plain)
    with torchkeep.patch_torch_load(weights_only_false="restricted"):
        with pytest.raises(torchkeep.UnsafeCheckpointError, match="Point") as caught:
            torch.load(plain, weights_only=False)
        assert caught.value.global_name.endswith("Point")
        with pytest.raises(torchkeep.UnsafeCheckpointError):
            torch.load(evil, weights_only=False)
    with torchkeep.patch_torch_load(weights_only_false="restricted", allow=[Point]):
        got = torch.load(plain, weights_only=False)
        assert isinstance(got["point"], Point) and got["point"].x == 3
    assert not marker.exists()
    with pytest.raises(ValueError, match="refuse"):
        torchkeep.patch_torch_load(weights_only_false="yes")
    with pytest.raises(ValueError):
        torchkeep.patch_torch_load(allow=["os.system"])  # fails at patch time, not in a call
    assert torch.load is ORIGINAL


def test_torch_safe_globals_are_honoured(tmp_path) -> None:
    path = tmp_path / "point.pt"
    torch.save({"point": Point(5)}, path)
    with torchkeep.patch_torch_load():
        with pytest.raises(torchkeep.UnsafeCheckpointError):
            torch.load(path)
        with torch.serialization.safe_globals([Point]):
            stock = ORIGINAL(path, weights_only=True)
            got = torch.load(path)
    assert isinstance(got["point"], Point) and got["point"].x == stock["point"].x == 5


def test_missing_file_raises_file_not_found(tmp_path) -> None:
    with torchkeep.patch_torch_load(), pytest.raises(FileNotFoundError):
        torch.load(tmp_path / "nothing.pt")


# -- real libraries -----------------------------------------------------------------------

_BUILD = """
import hashlib, json, sys, torch, torchkeep
def digest(module):
    out = {}
    for name, t in module.state_dict().items():
        out[name] = [str(t.dtype), list(t.shape),
                     hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()]
    return out
def build():
    torch.manual_seed(0)
    CONSTRUCT
    return model
plain = digest(build())
with torchkeep.patch_torch_load() as patch:
    patched = digest(build())
print(json.dumps({"plain": plain, "patched": patched, "loaded": patch.loaded}))
"""


def _build_twice(construct: str, **kwargs) -> dict:
    proc = run_thirdparty(_BUILD.replace("CONSTRUCT", construct), **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lpips_builds_the_same_model_through_the_patch() -> None:
    # LPIPS loads its bundled linear-layer weights with torch.load(path, map_location='cpu');
    # the AlexNet trunk is torchvision's, randomly initialised (pnet_rand: no download)
    result = _build_twice("import lpips\n    model = lpips.LPIPS(net='alex', pnet_rand=True, "
                          "verbose=False)")
    assert result["plain"] == result["patched"] and len(result["plain"]) > 10
    assert [Path(p).name for p in result["loaded"]] == ["alex.pth"]


def test_facenet_mtcnn_builds_the_same_model_through_the_patch() -> None:
    # MTCNN's three networks torch.load their bundled pnet/rnet/onet.pt with no arguments
    result = _build_twice("from facenet_pytorch import MTCNN\n    model = MTCNN()")
    assert result["plain"] == result["patched"] and len(result["plain"]) > 20
    assert [Path(p).name for p in result["loaded"]] == ["pnet.pt", "rnet.pt", "onet.pt"]


def test_a_hostile_file_where_lpips_loads_from_is_refused_and_nothing_runs(tmp_path) -> None:
    # a copy of the real package whose bundled weights were replaced by an attack file
    copy = tmp_path / "site"
    shutil.copytree(NODEPS_DIR / "lpips", copy / "lpips")
    marker = tmp_path / "PWNED"
    (copy / "lpips" / "weights" / "v0.1" / "alex.pth").write_bytes(
        pickle.dumps({"x": Evil(marker)}, protocol=2))
    code = f"""
        import torch, torchkeep, lpips
        assert lpips.__file__.startswith({str(copy)!r}), lpips.__file__
        with torchkeep.patch_torch_load():
            try:
                lpips.LPIPS(net='alex', pnet_rand=True, verbose=False)
            except torchkeep.UnsafeCheckpointError as e:
                print("REFUSED", e.global_name)
    """
    proc = run_thirdparty(code, extra_path=copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED" in proc.stdout and "system" in proc.stdout
    assert not marker.exists()
