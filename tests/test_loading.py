"""load_into: prefixes normalised, mismatches reported, partial loads refused."""

from __future__ import annotations

import pytest
import torch

import torchkeep
from torchkeep.demo.model import SeedNet


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return SeedNet().state_dict()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_normalised(prefix: str) -> None:
    source = {prefix + k: v for k, v in _weights(1).items()}
    model = SeedNet()
    report = torchkeep.load_into(model, source)
    assert report.complete and len(report.renamed) == 10
    assert all(torch.equal(model.state_dict()[k], v) for k, v in _weights(1).items())


def test_nested_fsdp_segments_are_normalised() -> None:
    source = {k.replace("fc1.", "fc1._fsdp_wrapped_module."): v for k, v in _weights(2).items()}
    model = SeedNet()
    assert torchkeep.load_into(model, source).complete
    assert torch.equal(model.fc1.weight, _weights(2)["fc1.weight"])


def test_model_side_prefixes_too() -> None:
    wrapped = torch.nn.DataParallel(SeedNet())
    report = torchkeep.load_into(wrapped, _weights(3))
    assert report.complete
    assert torch.equal(wrapped.module.fc3.bias, _weights(3)["fc3.bias"])


def test_strict_refuses_mismatches_and_loads_nothing() -> None:
    source = _weights(4)
    source["fc1.weight"] = torch.zeros(3, 3)
    del source["fc3.bias"]
    source["head.weight"] = torch.ones(2)
    model = SeedNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torchkeep.PartialLoadError) as info:
        torchkeep.load_into(model, source)
    report = info.value.report
    assert report.missing == ["fc3.bias", "fc1.weight"]
    assert report.unexpected == ["head.weight"]
    assert report.shape_mismatch == [("fc1.weight", (3, 3), (120, 400))]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert "shape mismatch" in str(info.value) and "[3, 3]" in str(info.value)


def test_non_strict_loads_what_matches_and_casts() -> None:
    source = _weights(5)
    source["fc2.bias"] = source["fc2.bias"].double()
    del source["fc3.bias"]
    model = SeedNet()
    report = torchkeep.load_into(model, source, strict=False)
    assert report.missing == ["fc3.bias"]
    assert report.cast == [("fc2.bias", "float64", "float32")]
    assert model.fc2.bias.dtype == torch.float32
    assert torch.equal(model.fc2.bias, _weights(5)["fc2.bias"])
    assert "dtype cast" in str(report)


def test_mostly_untouched_needs_allow_partial() -> None:
    source = {"fc3.bias": _weights(6)["fc3.bias"]}
    with pytest.raises(torchkeep.PartialLoadError, match="untouched"):
        torchkeep.load_into(SeedNet(), source, strict=False)
    model = SeedNet()
    report = torchkeep.load_into(model, source, strict=False, allow_partial=True)
    assert report.loaded == ["fc3.bias"] and report.loaded_fraction < 0.01
    assert torch.equal(model.fc3.bias, source["fc3.bias"])


def test_paths_and_nested_checkpoint_dicts(tmp_path, seed_checkpoint) -> None:
    for name in ("ckpt.pt", "ckpt.safetensors"):
        torchkeep.save(seed_checkpoint, tmp_path / name)
        model = SeedNet()
        report = torchkeep.load_into(model, tmp_path / name)
        assert report.source_key == "model_state_dict" and report.complete
        assert torch.equal(model.fc1.weight, seed_checkpoint["model_state_dict"]["fc1.weight"])
    with pytest.raises(TypeError, match="not a state dict"):
        torchkeep.load_into(SeedNet(), {"epoch": 1})


class Hyper(dict):
    """A dict subclass with attribute access, like Lightning's AttributeDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class Steps(list):
    """A list subclass that carries an attribute."""


def test_allowed_dict_and_list_subclasses_load_as_their_class(tmp_path) -> None:
    steps = Steps([torch.ones(2), 3])
    steps.note = torch.zeros(1)
    path = tmp_path / "sub.pt"
    torch.save({"hp": Hyper(lr=0.5, w=torch.arange(3.0)), "steps": steps}, path)
    got = torchkeep.load(path, allow=[Hyper, Steps])
    stock = torch.load(path, weights_only=False)
    assert type(got["hp"]) is Hyper and got["hp"].lr == 0.5
    assert isinstance(got["hp"]["w"], torch.Tensor)
    assert torch.equal(got["hp"]["w"], stock["hp"]["w"])
    assert type(got["steps"]) is Steps and torch.equal(got["steps"][0], torch.ones(2))
    assert got["steps"][1] == 3 and torch.equal(got["steps"].note, torch.zeros(1))
