"""Hugging Face model folders as one checkpoint, against the real transformers: folders
written by save_pretrained (sharded safetensors, single file) and by huggingface_hub's
save_torch_state_dict (sharded .bin), read back by from_pretrained as the oracle."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import torchkeep
from hostile import Evil
from torchkeep.cli.main import main

transformers = pytest.importorskip("transformers", reason="the dev extra installs it")
huggingface_hub = pytest.importorskip("huggingface_hub", reason="transformers needs it")


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     vocab_size=99)
    return transformers.BertModel(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    model = _model()
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.save_pretrained(root / "single")
    (root / "bin").mkdir()
    huggingface_hub.save_torch_state_dict(model.state_dict(), root / "bin",
                                          safe_serialization=False, max_shard_size="20KB")
    shutil.copy(root / "sharded" / "config.json", root / "bin" / "config.json")
    return {"sharded": root / "sharded", "single": root / "single", "bin": root / "bin",
            "root": root}


def _oracle(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.BertModel.from_pretrained(folder).state_dict()


def _assert_equal_state(ours, theirs) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name


def test_the_folders_are_what_the_libraries_write(folders) -> None:
    assert (folders["sharded"] / "model.safetensors.index.json").exists()
    assert len(list(folders["sharded"].glob("model-*-of-*.safetensors"))) > 2
    assert (folders["single"] / "model.safetensors").exists()
    assert (folders["bin"] / "pytorch_model.bin.index.json").exists()
    assert len(list(folders["bin"].glob("pytorch_model-*-of-*.bin"))) > 2


@pytest.mark.parametrize("kind", ["sharded", "single", "bin"])
def test_load_of_a_folder_equals_from_pretrained(folders, kind) -> None:
    oracle = _oracle(folders[kind])
    _assert_equal_state(torchkeep.load(folders[kind]), oracle)
    if kind != "single":
        index = next(folders[kind].glob("*.index.json"))
        _assert_equal_state(torchkeep.load(index), oracle)  # the index file itself
        # the order is the index's
        assert list(torchkeep.load(index)) == list(json.loads(index.read_text())["weight_map"])


@pytest.mark.parametrize("kind", ["sharded", "bin"])
def test_open_lists_every_tensor_and_reads_one(folders, kind) -> None:
    oracle = _oracle(folders[kind])
    with torchkeep.open(folders[kind]) as handle:
        assert handle.format == "hf-index" and handle.info["shards"] == 5
        assert set(handle.tensors) == set(oracle)
        name = "encoder.layer.1.output.dense.weight"
        assert handle.tensors[name].shape == (32, 37)
        assert torch.equal(handle[name], oracle[name])


def test_cli_inspect_verify_scan_diff(folders, capsys) -> None:
    assert main(["inspect", str(folders["bin"])]) == 0
    out = capsys.readouterr().out
    assert "hf-index" in out and "shards 5" in out and "shard format torch" in out
    for kind in ("sharded", "bin"):
        assert main(["verify", str(folders[kind])]) == 0
        assert main(["scan", str(folders[kind])]) == 0
    out = capsys.readouterr().out
    assert "intact (hf-index; 69 checksums" in out and "clean (hf-index, 5 pickles" in out
    assert main(["diff", str(folders["sharded"]), str(folders["bin"])]) == 0
    capsys.readouterr()


def test_convert_bin_shards_to_safetensors_shards_that_transformers_loads(folders) -> None:
    out = folders["root"] / "converted"
    out.mkdir()
    shutil.copy(folders["bin"] / "config.json", out / "config.json")
    assert main(["convert", str(folders["bin"]), str(out / "model.safetensors"),
                 "--max-shard-size", "30KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    _assert_equal_state(_oracle(out), _oracle(folders["bin"]))
    assert main(["convert", str(folders["sharded"]), str(out / "one.pt")]) == 0
    _assert_equal_state(torch.load(out / "one.pt", weights_only=True), _oracle(folders["bin"]))


def _copy(folders, kind: str, tmp_path: Path) -> Path:
    target = tmp_path / kind
    shutil.copytree(folders[kind], target)
    return target


def test_a_corrupt_bin_shard_is_named_by_verify(folders, tmp_path, capsys) -> None:
    folder = _copy(folders, "bin", tmp_path)
    shard = folder / "pytorch_model-00002-of-00005.bin"
    with zipfile.ZipFile(shard) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size)
    data = bytearray(shard.read_bytes())
    local = info.header_offset  # the local header's own name and extra lengths
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + \
        int.from_bytes(data[local + 28:local + 30], "little")
    data[start + 1] ^= 0xFF  # a byte of a tensor's data
    shard.write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 1
    assert "pytorch_model-00002-of-00005.bin: record" in capsys.readouterr().out


def test_a_hostile_bin_shard_is_flagged_and_refused(folders, tmp_path, capsys) -> None:
    folder = _copy(folders, "bin", tmp_path)
    marker = tmp_path / "PWNED"
    shard = folder / "pytorch_model-00003-of-00005.bin"
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "evil": Evil(marker)}, shard)
    assert main(["scan", str(folder)]) == 1
    assert "pytorch_model-00003-of-00005.bin" in capsys.readouterr().out
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="system"):
        torchkeep.load(folder)
    shard.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.load(folder)
    assert not marker.exists()


_FIRST = "model-00001-of-00005.safetensors"


def _edit_index(folder: Path, edit) -> Path:
    index = next(folder.glob("*.index.json"))
    document = json.loads(index.read_text())
    edit(document["weight_map"])
    index.write_text(json.dumps(document))
    return index


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update({next(iter(m)): "../../etc/passwd"}), "not a file name inside"),
    (lambda m: m.update({next(iter(m)): "nowhere.safetensors"}), "is missing"),
    (lambda m: m.update({"ghost.weight": next(iter(m.values()))}), "no shard holds it"),
    (lambda m: m.update({next(k for k, v in m.items() if v != _FIRST): _FIRST}),
     "but it is in"),
])
def test_a_lying_index_is_a_clear_error(folders, tmp_path, edit, message) -> None:
    folder = _copy(folders, "sharded", tmp_path)
    _edit_index(folder, edit)
    with pytest.raises(torchkeep.CorruptCheckpointError, match=message):
        torchkeep.load(folder)
    assert main(["verify", str(folder)]) == 1


# -- Trainer and Accelerate folders -------------------------------------------------------

class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 99, (8,), generator=generator),
                "labels": torch.tensor(i % 2)}


@pytest.fixture(scope="module")
def training_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     vocab_size=99, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(root / "trainer"), max_steps=4, save_steps=2,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, learning_rate=3e-4)
    transformers.Trainer(model=model, args=args, train_dataset=_Data()).train()

    import accelerate

    accelerator = accelerate.Accelerator(cpu=True)
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)),
                                         batch_size=4, shuffle=True)
    net, optimizer, scheduler, loader = accelerator.prepare(net, optimizer, scheduler, loader)
    for (x,) in loader:
        accelerator.backward(net(x).sum())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    accelerator.save_state(str(root / "accelerate"))
    return {"trainer": root / "trainer" / "checkpoint-4", "accelerate": root / "accelerate",
            "args": args}


def _same(ours, theirs) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs)
        for key in theirs:
            _same(ours[key], theirs[key])
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _same(a, b)
    elif type(theirs).__module__ == "numpy":
        assert (ours == theirs).all() if hasattr(theirs, "shape") else ours == theirs
    else:
        assert ours == theirs


def test_a_trainer_checkpoint_folder_is_one_tree(training_folders) -> None:
    folder = training_folders["trainer"]
    tree = torchkeep.load(folder)
    assert list(tree) == ["model", "optimizer", "rng_state", "scheduler", "training_args",
                          "trainer_state"]
    oracle = transformers.BertForSequenceClassification.from_pretrained(folder).state_dict()
    _assert_equal_state(tree["model"], oracle)
    for part, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"),
                       ("rng_state", "rng_state.pth")):
        _same(tree[part], torch.load(folder / name, weights_only=False))  # trusted here
    assert tree["trainer_state"] == json.loads((folder / "trainer_state.json").read_text())
    assert tree["trainer_state"]["global_step"] == 4
    args = tree["training_args"]  # an inert record: fields readable, nothing imported
    assert isinstance(args, torchkeep.PickledObject)
    assert args.qualname == "transformers.training_args.TrainingArguments"
    assert args.state["learning_rate"] == training_folders["args"].learning_rate == 3e-4
    assert args.state["max_steps"] == 4


def test_an_accelerate_state_folder_is_one_tree(training_folders) -> None:
    folder = training_folders["accelerate"]
    tree = torchkeep.load(folder)
    assert sorted(tree) == ["model", "optimizer", "random_states_0", "scheduler"]
    from safetensors.torch import load_file

    _assert_equal_state(tree["model"], load_file(folder / "model.safetensors"))
    for part, name in (("optimizer", "optimizer.bin"), ("scheduler", "scheduler.bin"),
                       ("random_states_0", "random_states_0.pkl")):
        _same(tree[part], torch.load(folder / name, weights_only=False))  # trusted here


def test_cli_on_training_folders(training_folders, capsys) -> None:
    for kind in ("trainer", "accelerate"):
        folder = str(training_folders[kind])
        assert main(["inspect", folder, "--depth", "1"]) == 0
        assert main(["verify", folder]) == 0
        assert main(["scan", folder]) == 0
    out = capsys.readouterr().out
    assert "hf-training (kind transformers Trainer" in out and "kind Accelerate" in out
    assert "training_args/" in out and "random_states_0/" in out
    assert out.count("intact (hf-training") == 2 and out.count("clean (hf-training") == 2


def test_a_hostile_part_of_a_trainer_folder_is_refused(training_folders, tmp_path,
                                                       capsys) -> None:
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(training_folders["trainer"], folder)
    marker = tmp_path / "PWNED"
    torch.save({"x": Evil(marker)}, folder / "training_args.bin")
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="system") as caught:
        torchkeep.load(folder)
    assert "training_args" in str(caught.value)
    assert main(["scan", str(folder)]) == 1
    assert "training_args.bin" in capsys.readouterr().out
    assert not marker.exists()
