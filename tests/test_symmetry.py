"""What torchkeep loads it saves again, and the saved file loads back equal.

Every type the default allowlist reads is written by every format that can hold it, and
stock ``torch.load(weights_only=True)`` reads torchkeep's torch zip output with exactly
the ``add_safe_globals`` docs/formats.md lists (a test checks the table). Python 2
spellings of plain types work in ``allow=``; inert records of allowed names are written
back and their tensors are loaded like any other.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import io
import pathlib
import pickle
from typing import Any

import numpy as np
import pytest
import torch

import hostile as H
import torchkeep
from hostile import Pickle

UTC = datetime.timezone.utc


def _catalogue() -> dict[str, Any]:
    """One value of every type the default allowlist reads (tensors inside containers)."""
    return {
        "argparse.Namespace": argparse.Namespace(lr=0.1, layers=[2, 3], w=torch.ones(2)),
        "numpy.ndarray": np.arange(6, dtype=np.float32).reshape(2, 3),
        "numpy scalar": np.float64(1.5),
        "torch.Size": torch.Size([2, 3]),
        "set": {1, 2, "a"},
        "frozenset": frozenset({3, (4, 5)}),
        "collections.OrderedDict": collections.OrderedDict(a=1, w=torch.zeros(1)),
        "collections.Counter": collections.Counter(a=2, b=1),
        "complex": 1.5 - 2j,
        "slice": slice(1, None, 2),
        "bytes": b"\x00\xffab",
        "bytearray": bytearray(b"ab"),
        "pathlib.PosixPath": pathlib.PosixPath("/data/run"),
        "pathlib.PurePosixPath": pathlib.PurePosixPath("a/b"),
        "pathlib.PureWindowsPath": pathlib.PureWindowsPath("C:/runs/x"),
        "datetime.datetime": datetime.datetime(2019, 5, 6, 7, 8, 9, 10),
        "datetime.datetime with tz": datetime.datetime(2019, 5, 6, tzinfo=datetime.timezone(
            datetime.timedelta(hours=-3), "BRT")),
        "datetime.date": datetime.date(2019, 5, 6),
        "datetime.time": datetime.time(7, 8, 9, 10, tzinfo=UTC),
        "datetime.timedelta": datetime.timedelta(days=-1, seconds=5, microseconds=6),
        "decimal.Decimal": decimal.Decimal("-1.25E-7"),
        "torch.device": torch.device("cpu"),
        "torch.dtype": torch.bfloat16,
        "tuple": (1, "two", None),
    }


CATALOGUE = _catalogue()


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, argparse.Namespace):
        return vars(a).keys() == vars(b).keys() and all(
            _same(vars(a)[k], vars(b)[k]) for k in vars(a))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torchkeep.PickledObject):
        return (a.qualname, a.items, a.dict_items) == (b.qualname, b.items, b.dict_items) \
            and _same(a.args, b.args) and _same(a.state, b.state)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _roundtrip(value: Any, fmt: str, **load: Any) -> Any:
    buffer = io.BytesIO()
    torchkeep.save({"v": value, "t": torch.arange(3)}, buffer, format=fmt)
    return torchkeep.load(io.BytesIO(buffer.getvalue()), **load)["v"]


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy", "safetensors"])
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_readable_type_saves_and_loads_back_equal(name: str, fmt: str) -> None:
    value = CATALOGUE[name]
    assert _same(_roundtrip(value, fmt), value)


@pytest.mark.parametrize("name", [n for n in CATALOGUE if n.split(".")[0] in (
    "argparse", "pathlib", "datetime", "decimal", "slice")])
def test_standard_library_values_are_written_as_torch_save_writes_them(name: str) -> None:
    tree = {"v": CATALOGUE[name], "t": torch.arange(3)}
    ours, theirs = io.BytesIO(), io.BytesIO()
    torchkeep.save(tree, ours)
    torch.save(tree, theirs)
    assert ours.getvalue() == theirs.getvalue()
    from torchkeep.formats.pickler import TreePickler  # the torch-free writer agrees

    plain = {"v": CATALOGUE[name]}
    if not any(isinstance(v, torch.Tensor) for v in vars(plain["v"]).values()) \
            if isinstance(plain["v"], argparse.Namespace) else True:
        assert TreePickler().dump(plain) == pickle.dumps(plain, protocol=2)


#: What stock torch.load(weights_only=True) needs to read torchkeep's torch zip output:
#: the globals to pass to torch.serialization.add_safe_globals (docs/formats.md).
SAFE_GLOBALS: dict[str, list[Any]] = {
    "argparse.Namespace": [argparse.Namespace],
    "numpy.ndarray": [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                      np.dtypes.Float32DType],
    "numpy scalar": [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType],
    "frozenset": [frozenset],
    "slice": [slice],
    "pathlib.PosixPath": [pathlib.PosixPath],
    "pathlib.PurePosixPath": [pathlib.PurePosixPath],
    "pathlib.PureWindowsPath": [pathlib.PureWindowsPath],
    "datetime.datetime": [datetime.datetime],
    "datetime.datetime with tz": [datetime.datetime, datetime.timezone, datetime.timedelta],
    "datetime.date": [datetime.date],
    "datetime.time": [datetime.time, datetime.timezone, datetime.timedelta],
    "datetime.timedelta": [datetime.timedelta],
    "decimal.Decimal": [decimal.Decimal],
}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_stock_torch_load_reads_it_with_the_documented_safe_globals(name: str) -> None:
    value = CATALOGUE[name]
    buffer = io.BytesIO()
    torchkeep.save({"v": value}, buffer)
    needed = SAFE_GLOBALS.get(name, [])
    if needed:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    with torch.serialization.safe_globals(needed):
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["v"]
    assert _same(loaded, value)


def test_an_inert_record_saves_back_as_its_own_global_with_its_tensors() -> None:
    record = torchkeep.PickledObject("mypkg.config", "Config", (1, "a"),
                                     {"w": torch.arange(4.0), "lr": 0.5}, [7], [("k", 2)])
    for fmt in ("torch", "torch-legacy"):
        with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"mypkg\.config\.Config"):
            _roundtrip(record, fmt)
        back = _roundtrip(record, fmt, allow=["mypkg.config.Config"])
        assert _same(back, record) and isinstance(back.state["w"], torch.Tensor)
    with pytest.raises(torchkeep.UnsupportedTypeError, match="only in the torch formats"):
        torchkeep.save({"v": record}, io.BytesIO(), format="safetensors")
    with pytest.raises(torchkeep.UnsupportedTypeError, match="runs code"):
        torchkeep.save({"v": torchkeep.PickledObject("os", "system", ("true",))}, io.BytesIO())


class Legacy:
    """A class as a 2018 script pickled it (protocol 0: copy_reg._reconstructor)."""

    def __init__(self) -> None:
        self.lr = 0.1
        self.names = ["a", "b"]


class LegacyTable(dict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_python_2_spellings_of_plain_types_are_their_python_3_names(protocol: int) -> None:
    table = LegacyTable(x=1)
    data = pickle.dumps({"opt": Legacy(), "table": table, "kind": dict, "pairs": {"a": 1}},
                        protocol=protocol)
    report = torchkeep.scan(data)
    unknown = sorted({f.name for f in report.flagged})
    assert unknown == [f"{__name__}.Legacy", f"{__name__}.LegacyTable"]
    # every name scan reported, plus the Python 2 spellings, opens the file
    allow = [*unknown, "__builtin__.dict", "__builtin__.list", "__builtin__.set",
             "copy_reg._reconstructor"]
    loaded = torchkeep.load(data, allow=allow)
    assert loaded["opt"].state == {"lr": 0.1, "names": ["a", "b"]}
    assert loaded["table"].dict_items == [("x", 1)] and loaded["pairs"] == {"a": 1}
    for never in ("__builtin__.eval", "copy_reg.__reduce_ex__", "__builtin__.getattr"):
        with pytest.raises(ValueError, match="never allows"):
            torchkeep.load(data, allow=[never])


@pytest.mark.parametrize("call,expected", [
    (("dict", [[("a", 1)]]), {"a": 1}), (("list", [(1, 2)]), [1, 2]),
    (("tuple", [[1, 2]]), (1, 2)), (("int", ["12"]), 12), (("int", ["ff", 16]), 255),
    (("float", ["1.5"]), 1.5), (("str", [7]), "7"), (("bool", [1]), True),
])
def test_plain_type_constructors_with_plain_arguments_load(call: tuple[str, list[Any]],
                                                           expected: Any) -> None:
    name, args = call
    data = Pickle().glob("__builtin__", name).push(tuple(args)).reduce().finish()
    assert torchkeep.load(data) == expected
    assert torchkeep.scan(data).verdict == "clean"


@pytest.mark.parametrize("name,args", [("dict", [H.Raw(Pickle(None).glob("os", "getcwd"))]),
                                       ("list", [1]), ("int", [[1]]), ("str", [b"x", "ascii"])])
def test_plain_type_constructors_refuse_anything_but_plain_arguments(name: str,
                                                                     args: list[Any]) -> None:
    data = Pickle().glob("__builtin__", name).push(tuple(args)).reduce().finish()
    with pytest.raises((torchkeep.CorruptCheckpointError, torchkeep.UnsafeCheckpointError)):
        torchkeep.load(data)


def test_a_pickled_module_loads_as_inert_records_with_real_tensors(tmp_path: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)  # the whole module, classes and all
    names = sorted({f.name for f in torchkeep.scan(path).flagged})
    assert "torch.nn.modules.linear.Linear" in names
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.load(path)
    loaded = torchkeep.load(path, allow=names, map_location="cpu")
    linear = loaded.state["_modules"]["0"]
    weight = linear.state["_parameters"]["weight"]
    assert isinstance(weight, torch.nn.Parameter) and torch.equal(weight, model[0].weight)
    # and the records can be written back and read again, tensors and all
    again = tmp_path / "again.pt"
    torchkeep.save(loaded, again)
    reloaded = torchkeep.load(again, allow=names)
    assert torch.equal(reloaded.state["_modules"]["0"].state["_parameters"]["bias"],
                       model[0].bias)


def test_tensors_inside_inert_records_honour_map_location() -> None:
    # a record whose tensor was saved on cuda:0: placeholders never leak out
    tensor = H.tensor_v2(H.storage_pid(4, location="cuda:0"))
    pkl = Pickle().glob("mypkg", "Holder").push(()).reduce().push({"w": tensor}).build()
    data = H.torch_zip(pkl.finish(), {"0": H.FLOATS4})
    loaded = torchkeep.load(data, allow=["mypkg.Holder"], map_location="cpu")
    assert isinstance(loaded.state["w"], torch.Tensor) and loaded.state["w"].device.type == "cpu"
    assert torch.equal(loaded.state["w"], torch.arange(4.0))
    if not torch.cuda.is_available():
        with pytest.raises(torchkeep.DeviceError):
            torchkeep.load(data, allow=["mypkg.Holder"])
    arrays = torchkeep.load(data, allow=["mypkg.Holder"], backend="numpy")
    assert isinstance(arrays.state["w"], np.ndarray)


def test_what_torchkeep_loads_from_an_old_checkpoint_it_saves_again(tmp_path: Any) -> None:
    # 2017-2020 training scripts: the argparse Namespace, numpy state, a Size, a set
    state = {"args": argparse.Namespace(lr=0.01, epochs=90, arch="resnet18"),
             "epoch": 89, "best_acc1": np.float64(69.7), "shape": torch.Size([3, 224, 224]),
             "classes": {"cat", "dog"}, "state_dict": collections.OrderedDict(
                 w=torch.randn(2, 2)), "rng": np.random.get_state()[1][:8]}
    old = tmp_path / "old.pth.tar"
    torch.save(state, old, _use_new_zipfile_serialization=False)
    loaded = torchkeep.load(old)
    for fmt, name in (("torch", "a.pt"), ("torch-legacy", "b.pt"), ("safetensors", "c.st")):
        torchkeep.save(loaded, tmp_path / name, format=fmt)
        assert _same(torchkeep.load(tmp_path / name), loaded), fmt
