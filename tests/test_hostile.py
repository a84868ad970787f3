"""Hostile checkpoints: torchkeep must refuse them with its own errors, run nothing from
them, finish quickly, and never change a file on disk when asked to save bad input.

Payloads come from tests/hostile.py and are built at test time. Each code-execution
payload tries to create a marker file; a control test proves the payload is live (stock
``pickle.loads`` / ``torch.load(weights_only=False)`` do create it), and every refusal
test asserts the marker is absent afterwards.

The bugs this file found (raw exceptions escaping, recursion and memo-bomb walks, device
strings, view bounds) are fixed; their tests now guard against regressions.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import functools
import io
import json
import os
import pickle
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hostile as H
import torchkeep
from conftest import deadline
from hostile import FLOATS4, Gadget, Mutation, Pickle, Raw, ZipEntry, frag

# -- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def peak_memory(limit_mb: float) -> Iterator[None]:
    """Assert the Python heap (numpy included) grows by less than ``limit_mb`` inside."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"peak allocation {peak / 2**20:.1f} MiB"


def _load_bytes(data: bytes) -> Any:
    return torchkeep.load(data)


def _load_path(path: Path) -> Any:
    return torchkeep.load(path)


def _load_numpy(path: Path) -> Any:
    return torchkeep.load(path, backend="numpy")


def _load_stream(path: Path) -> Any:
    with open(path, "rb") as f:
        return torchkeep.load(f, mmap=False)


def _open(path: Path) -> Any:
    with torchkeep.open(path) as handle:
        return handle.load()


#: Every entry point a hostile file must be refused by: (name, takes a path?, call).
APIS: list[tuple[str, bool, Callable[[Any], Any]]] = [
    ("load(bytes)", False, _load_bytes),
    ("load(path)", True, _load_path),
    ("load(path, backend='numpy')", True, _load_numpy),
    ("load(file object)", True, _load_stream),
    ("open(path)", True, _open),
]


def refused(
    data: bytes,
    error: type[torchkeep.TorchkeepError],
    tmp_path: Path,
    marker: Path | None = None,
    *,
    apis: list[tuple[str, bool, Callable[[Any], Any]]] = APIS,
    seconds: float = 5.0,
) -> list[torchkeep.TorchkeepError]:
    """Assert every API raises ``error`` (nothing else) for ``data`` and ``marker`` stays
    absent; returns the errors."""
    path = tmp_path / "hostile.pt"
    path.write_bytes(data)
    errors = []
    for name, takes_path, call in apis:
        with deadline(seconds), pytest.raises(error) as info:
            call(path if takes_path else data)
        assert isinstance(info.value, torchkeep.TorchkeepError), name
        errors.append(info.value)
        if marker is not None:
            assert not marker.exists(), f"{name} ran the payload"
    return errors


def loads_or_refuses(data: bytes, tmp_path: Path, error: type[Exception] = torchkeep.FormatError,
                     *, seconds: float = 5.0) -> None:
    """Every API either loads ``data`` or raises ``error``; any other exception propagates."""
    path = tmp_path / "hostile.pt"
    path.write_bytes(data)
    for _name, takes_path, call in APIS:
        with deadline(seconds), contextlib.suppress(error):
            call(path if takes_path else data)


def load_or_refuse(data: Any, **kw: Any) -> Any:
    """Load ``data``; a TorchkeepError is fine (returned), any other exception propagates."""
    try:
        return torchkeep.load(data, **kw)
    except torchkeep.TorchkeepError as e:
        return e


@functools.cache
def files() -> H.Files:
    """Small valid checkpoints of each format (built once)."""
    return H.small_files()


@pytest.fixture
def extension(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the copyreg extension a gadget uses (code -> posix.system) for the test."""
    gadget: Gadget = request.param
    if gadget.extension is None:
        yield
        return
    copyreg.add_extension("posix", "system", gadget.extension)
    try:
        yield
    finally:
        copyreg.remove_extension("posix", "system", gadget.extension)


def ids(gadgets: list[Gadget]) -> list[str]:
    return [g.name for g in gadgets]


LIVE = [g for g in H.GADGETS + H.STRUCTURAL if g.live]
CONTAINERS: dict[str, Callable[[bytes], bytes]] = {
    "plain pickle": lambda p: p,
    "torch zip": H.in_torch_zip,
    "legacy stream": H.in_legacy,
}


def small_tensor_zip(**kw: Any) -> bytes:
    """{'w': tensor} over a 4-float storage, with tensor_pickle's arguments."""
    return H.torch_zip(H.tensor_pickle(**kw), {"0": FLOATS4})


# -- 0. the generators make valid files --------------------------------------------------------


def test_handmade_torch_zip_is_a_valid_checkpoint() -> None:
    data = H.zip_bytes(H.simple_entries())
    expected = torch.arange(4, dtype=torch.float32)
    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["w"], expected)
    assert torch.equal(torchkeep.load(data)["w"], expected)
    np.testing.assert_array_equal(torchkeep.load(data, backend="numpy")["w"], expected.numpy())


def test_handmade_legacy_stream_is_a_valid_checkpoint() -> None:
    data = H.legacy_stream(H.tensor_pickle(legacy_view=None))
    expected = torch.arange(4, dtype=torch.float32)
    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["w"], expected)
    assert torch.equal(torchkeep.load(data)["w"], expected)


def test_rebuilt_torch_save_zip_and_split_legacy_stream_still_load() -> None:
    state = H.small_state()
    rebuilt = H.replace_records(files().torch_zip, {})
    assert torch.equal(torchkeep.load(rebuilt)["w"], state["w"])
    assert torch.equal(torch.load(io.BytesIO(rebuilt), weights_only=True)["w"], state["w"])
    parts, tail = H.split_pickles(files().legacy, 5)
    assert len(parts) == 5
    assert b"".join(parts) + tail == files().legacy
    assert torchkeep.load(b"".join(parts) + tail)["step"] == 3


def test_handmade_safetensors_is_a_valid_checkpoint() -> None:
    from safetensors.numpy import load as st_load

    data = H.safetensors_bytes({"w": H.st_entry("F32", [4], 0, 16)}, FLOATS4)
    np.testing.assert_array_equal(st_load(data)["w"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(torchkeep.load(data, backend="numpy")["w"],
                                  np.arange(4, dtype=np.float32))
    forged = H.forged_safetensors({"$dict": {"w": {"$tensor": "w"}, "n": 1}})
    assert torchkeep.load(forged)["n"] == 1


# -- 1. code-execution gadgets -----------------------------------------------------------------


@pytest.mark.parametrize("extension", LIVE, ids=ids(LIVE), indirect=True)
def test_control_payload_is_live_under_pickle(extension: None, request: pytest.FixtureRequest,
                                              marker: Path) -> None:
    """The threat is real: a full unpickler creates the marker for every live payload."""
    gadget: Gadget = request.node.callspec.params["extension"]
    payload = gadget.make(marker)
    try:
        result = pickle.loads(payload)
        if hasattr(result, "wait"):  # subprocess.Popen
            result.wait()
    except Exception:
        pass  # some payloads fail after the code ran (torch.load of a non-checkpoint)
    assert marker.exists()


@pytest.mark.parametrize("wrap", [H.in_torch_zip, H.in_legacy], ids=["zip", "legacy"])
def test_control_torch_load_runs_the_wrapped_payload(wrap: Callable[[bytes], bytes],
                                                     marker: Path) -> None:
    """The containers are real checkpoints: torch.load(weights_only=False) runs the payload
    inside them, and weights_only=True refuses it."""
    data = wrap(H.GADGETS[0].make(marker))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data), weights_only=True)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("extension", H.GADGETS, ids=ids(H.GADGETS), indirect=True)
def test_gadget_is_refused_as_unsafe(extension: None, request: pytest.FixtureRequest,
                                     container: str, marker: Path, tmp_path: Path) -> None:
    gadget: Gadget = request.node.callspec.params["extension"]
    data = CONTAINERS[container](gadget.make(marker))
    for error in refused(data, torchkeep.UnsafeCheckpointError, tmp_path, marker):
        assert isinstance(error, ValueError)
        assert error.global_name == gadget.global_name
        if gadget.extension is None:
            assert f"global {gadget.global_name} " in str(error)
        else:
            assert f"extension code {gadget.extension}" in str(error)
        assert str(tmp_path / "hostile.pt") in str(error) or "<" in error.source


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("gadget", H.STRUCTURAL, ids=ids(H.STRUCTURAL))
def test_structural_abuse_is_a_format_error(gadget: Gadget, container: str, marker: Path,
                                            tmp_path: Path) -> None:
    data = CONTAINERS[container](gadget.make(marker))
    expected: type[torchkeep.TorchkeepError] = torchkeep.CorruptCheckpointError
    if gadget.name.startswith("persistent id ('module'") and container == "legacy stream":
        expected = torchkeep.UnsafeCheckpointError  # a pickled nn.Module with its source
    refused(data, expected, tmp_path, marker)


def test_unsafe_error_names_the_global_and_offset(marker: Path) -> None:
    with pytest.raises(torchkeep.UnsafeCheckpointError) as info:
        torchkeep.load(H.in_torch_zip(H.GADGETS[0].make(marker)))
    message = str(info.value)
    assert "os.system" in message
    assert "data.pkl offset 2" in message
    assert "never allowed" in message
    assert info.value.exit_code == 4


def test_a_pickle_inside_bytes_is_only_data(marker: Path) -> None:
    """bytes holding an evil pickle come back as those bytes; nothing unpickles them."""
    inner = pickle.dumps(H.Evil(marker), protocol=2)
    p = Pickle().mark().str("blob").call("_codecs", "encode", inner.decode("latin-1"), "latin1")
    p.str("raw").push(inner).op(b"d")
    for data in (p.finish(), H.in_torch_zip(p.finish())):
        result = torchkeep.load(data)
        assert result == {"blob": inner, "raw": inner}
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.eval", "pickle.loads",
                                  "torch.hub.load", "torch.jit.load", "subprocess.Popen",
                                  "torch.serialization.load", "torch._C._load"])
def test_allow_cannot_admit_never_allowed_modules(name: str) -> None:
    with pytest.raises(ValueError, match="never allows"):
        torchkeep.load(b"\x80\x02N.", allow=[name])


def test_allow_cannot_admit_a_dangerous_callable() -> None:
    with pytest.raises(ValueError):
        torchkeep.load(b"\x80\x02N.", allow=[(os.system, "mypkg.Config")])


def test_allow_by_name_builds_inert_records(marker: Path) -> None:
    """An allowed-by-name global never runs: REDUCE / BUILD give a PickledObject."""
    data = Pickle().call("mypkg.evil", "Boom", H.shell_touch(marker)).push({"x": 1}).build()
    result = torchkeep.load(data.finish(), allow=["mypkg.evil.Boom"])
    assert isinstance(result, torchkeep.PickledObject)
    assert result.args == (H.shell_touch(marker),)
    assert result.state == {"x": 1}
    assert not marker.exists()


def test_legacy_header_pickles_are_restricted_too(marker: Path, tmp_path: Path) -> None:
    gadget = H.GADGETS[0].make(marker)
    main = H.tensor_pickle(legacy_view=None)
    for data in (H.legacy_stream(main, keys_pickle=gadget),
                 H.legacy_stream(main, sys_info_pickle=gadget)):
        refused(data, torchkeep.UnsafeCheckpointError, tmp_path, marker)


# -- 1b. BUILD / attribute state ---------------------------------------------------------------



def _od_with_state(state: Any) -> bytes:
    p = Pickle().glob("collections", "OrderedDict").empty_tuple().reduce()
    return p.push(state).build().finish()


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_ordered_dict_attributes_are_plain_data(backend: str) -> None:
    result = torchkeep.load(_od_with_state({"_metadata": {"": {"version": 1}}}), backend=backend)
    assert isinstance(result, collections.OrderedDict)
    assert result._metadata == {"": {"version": 1}}


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("state", [{"__class__": 1}, {"__dict__": 1}, (None, {"__class__": 1})],
                         ids=["__class__", "__dict__", "slotstate __class__"])
def test_ordered_dict_dunder_state_is_refused_cleanly(state: Any, backend: str) -> None:
    result = load_or_refuse(_od_with_state(state), backend=backend)
    assert isinstance(result, (torchkeep.FormatError, collections.OrderedDict))


def _tensor_with_state(state: Any) -> bytes:
    p = Pickle().push(H.tensor_v2(H.storage_pid(4))).push(state).build()
    return H.torch_zip(p.finish(), {"0": FLOATS4})


@pytest.mark.parametrize("attr", ["__class__", "__dict__", "not-an-identifier", "1x"])
def test_safetensors_tree_refuses_tensor_attributes_that_are_not_plain(attr: str) -> None:
    t = torch.arange(3.0)
    t.note = "hi"
    buf = io.BytesIO()
    torchkeep.save({"w": t}, buf, format="safetensors")
    data = buf.getvalue()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["torchkeep"] = header["__metadata__"]["torchkeep"].replace(
        '"note"', json.dumps(attr))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    forged = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    with pytest.raises(torchkeep.CorruptCheckpointError, match="plain attribute names"):
        torchkeep.load(forged)


def test_tensor_python_attributes_load() -> None:
    result = torchkeep.load(_tensor_with_state({"note": "hi"}))
    assert result.note == "hi"
    assert torch.equal(result, torch.arange(4, dtype=torch.float32))


def test_dunder_tensor_attributes_are_refused() -> None:
    with pytest.raises(torchkeep.CorruptCheckpointError, match="__setstate__"):
        torchkeep.load(_tensor_with_state({"note": "hi", "__setstate__": 1}))


@pytest.mark.parametrize("state", [
    {"data": 1}, {"grad": 1}, {"requires_grad": "x"}, {"shape": 1},
    {"__class__": Raw(frag().glob("torch", "FloatTensor"))},
], ids=["data", "grad", "requires_grad", "shape", "__class__"])
def test_tensor_attribute_state_is_refused_cleanly(state: Any) -> None:
    result = load_or_refuse(_tensor_with_state(state))
    assert isinstance(result, (torchkeep.FormatError, torch.Tensor))


def test_parameter_state_is_refused_cleanly() -> None:
    data = Pickle().call("torch._utils", "_rebuild_parameter_with_state",
                         H.tensor_v2(H.storage_pid(4)), True, H.ordered_dict(), {"data": 5})
    result = load_or_refuse(H.torch_zip(data.finish(), {"0": FLOATS4}))
    assert isinstance(result, (torchkeep.FormatError, torch.nn.Parameter))


# -- 1c. numpy payloads ------------------------------------------------------------------------


def _numpy_array(spec: str, shape: list[int], raw: bytes,
                 module: str = "numpy.core.multiarray") -> bytes:
    p = Pickle().glob(module, "_reconstruct").mark().glob("numpy", "ndarray").push((0,))
    p.push(b"b").tuple().reduce().mark().int(1).push(tuple(shape))
    p.glob("numpy", "dtype").push((spec, False, True)).reduce()
    p.push((3, "|", None, None, None, -1, -1, 0)).build()
    return p.bool(False).push(raw).tuple().build().finish()


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_array_pickle_loads(module: str) -> None:
    raw = np.arange(3, dtype="<i4").tobytes()
    result = torchkeep.load(_numpy_array("<i4", [3], raw, module))
    np.testing.assert_array_equal(result, np.arange(3))


@pytest.mark.parametrize("spec,shape,raw", [
    ("<f4", [2], b"\0" * 7),
    ("<f4", [-1, -2], b"\0" * 8),
    ("<f4", [1] * 65, b"\0" * 4),
    ("M8", [1], b"\0" * 8),
    ("V1099511627776", [0], b""),
], ids=["short data", "negative dims", "65 dims", "datetime", "huge void"])
def test_numpy_array_abuse_is_a_format_error(spec: str, shape: list[int], raw: bytes,
                                             tmp_path: Path) -> None:
    refused(_numpy_array(spec, shape, raw), torchkeep.FormatError, tmp_path)


@pytest.mark.parametrize("spec,shape", [("S0", [3]), ("V0", [3]), ("U0", [3]),
                                        ("<f4", [0, 2**62]), ("<f4", [0, 2**64])],
                         ids=["S0", "V0", "U0", "(0, 2**62)", "(0, 2**64)"])
def test_numpy_array_numpy_cannot_build_is_a_format_error(spec: str, shape: list[int],
                                                          tmp_path: Path) -> None:
    refused(_numpy_array(spec, shape, b""), torchkeep.FormatError, tmp_path)


# -- 2. zip tricks -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch_zip", "torchkeep_zip", "legacy", "safetensors"])
def test_truncation_at_every_offset_is_a_format_error(fmt: str) -> None:
    data = getattr(files(), fmt)
    assert not isinstance(load_or_refuse(data), Exception)
    with deadline(20):
        for cut in range(len(data)):
            with pytest.raises(torchkeep.FormatError):
                torchkeep.load(data[:cut])


@pytest.mark.parametrize("fmt", ["torch_zip", "legacy", "safetensors"])
def test_truncated_files_on_disk_are_format_errors(fmt: str, tmp_path: Path) -> None:
    data = getattr(files(), fmt)
    path = tmp_path / "cut.pt"
    with deadline(20):
        for cut in range(0, len(data), 23):
            path.write_bytes(data[:cut])
            for call in (_load_path, _load_numpy, _load_stream, _open):
                with pytest.raises(torchkeep.FormatError):
                    call(path)


def test_truncated_data_pkl_inside_a_valid_zip() -> None:
    pkl = {n.split("/", 1)[1]: d for n, d in H.read_zip(files().torch_zip)}["data.pkl"]
    for cut in range(len(pkl)):
        data = H.replace_records(files().torch_zip, {"data.pkl": pkl[:cut]})
        with pytest.raises(torchkeep.CorruptCheckpointError):
            torchkeep.load(data)


@pytest.mark.parametrize("count,count64,zip64", [
    (5, None, True), (3, None, True), (0, None, True), (5, 4, True), (4, 5, True),
    (65535, None, False), (5, None, False),
], ids=["one more", "one fewer", "zero", "classic lies", "zip64 lies", "65535", "no zip64"])
def test_lying_entry_count(count: int, count64: int | None, zip64: bool,
                           tmp_path: Path) -> None:
    entries = [e for e in H.simple_entries() if not e.name.endswith(("format_version",
                                                                      "storage_alignment"))]
    assert len(entries) == 4  # so 5 and 3 lie, and 4 in the other record does too
    data = H.zip_bytes(entries, count=count, count64=count64, zip64=zip64)
    refused(data, torchkeep.CorruptCheckpointError, tmp_path)


def test_zip64_entry_count_sentinel_is_honoured() -> None:
    """The classic record may say 0xFFFF when the zip64 record has the real count."""
    entries = H.simple_entries()
    data = H.zip_bytes(entries, count=0xFFFF, count64=len(entries))
    assert torch.equal(torchkeep.load(data)["w"], torch.arange(4, dtype=torch.float32))


def test_zip64_entry_count_above_the_limit_is_a_limit_error(tmp_path: Path) -> None:
    data = H.zip_bytes(H.simple_entries(), count=0xFFFF, count64=2**40)
    with peak_memory(20):
        refused(data, torchkeep.LimitExceededError, tmp_path, seconds=2)


@pytest.mark.parametrize("field,value", [("cd_size", 2**40), ("cd_offset", 2**40),
                                         ("cd_size", 0), ("cd_offset", 0)])
def test_zip64_directory_bounds_that_lie(field: str, value: int, tmp_path: Path) -> None:
    layout = H.zip_layout(H.simple_entries())
    assert layout.zip64_offset is not None
    data = bytearray(layout.data)
    # zip64 end record: sig, size, made, need, disk, cd disk, n, n, cd size @40, cd offset @48
    struct.pack_into("<Q", data, layout.zip64_offset + (40 if field == "cd_size" else 48), value)
    # keep the classic record consistent with it (0xFFFFFFFF means "see zip64")
    struct.pack_into("<I", data, layout.eocd_offset + (12 if field == "cd_size" else 16),
                     0xFFFFFFFF)
    with peak_memory(20):
        refused(bytes(data), torchkeep.CorruptCheckpointError, tmp_path, seconds=2)


def _entries_with(index_suffix: str, **changes: Any) -> list[ZipEntry]:
    entries = H.simple_entries()
    for e in entries:
        if e.name.endswith(index_suffix):
            for key, value in changes.items():
                setattr(e, key, value)
    return entries


@pytest.mark.parametrize("record,changes", [
    ("data.pkl", {"local_name": "archive/data.pkX"}),
    ("data/0", {"local_name": "archive/data/1"}),
    ("data/0", {"local_method": 8}),
    ("data/0", {"local_flags": 0x801}),
    ("data/0", {"local_crc": 0xDEADBEEF}),
    ("data/0", {"csize": 10**6, "usize": 10**6}),
    ("data/0", {"csize": 12, "usize": 12}),
    ("data/0", {"csize": 16, "usize": 20}),
    ("data/0", {"header_offset": 10**7}),
    ("data/0", {"header_offset": 2**40}),
    ("data/0", {"header_offset": 1}),
    ("version", {"csize": 2**33, "usize": 2**33}),
], ids=["local name (data.pkl)", "local name (data/0)", "local method", "local flags",
        "local crc", "size beyond file", "size too small", "stored sizes differ",
        "header past end", "zip64 header offset past end", "header offset inside a header",
        "zip64 size beyond file"])
def test_zip_records_that_lie(record: str, changes: dict[str, Any], tmp_path: Path) -> None:
    data = H.zip_bytes(_entries_with(record, **changes))
    refused(data, torchkeep.CorruptCheckpointError, tmp_path)


def test_wrong_crc_on_data_pkl_is_an_integrity_error(tmp_path: Path) -> None:
    data = H.zip_bytes(_entries_with("data.pkl", crc=1234))
    errors = refused(data, torchkeep.IntegrityError, tmp_path)
    assert "CRC-32" in str(errors[0])


@pytest.mark.parametrize("where", ["before", "after"])
def test_duplicate_record_names(where: str, tmp_path: Path) -> None:
    evil = ZipEntry("archive/data.pkl", Pickle().push("other").finish())
    entries = H.simple_entries()
    entries = [evil, *entries] if where == "before" else [*entries, evil]
    errors = refused(H.zip_bytes(entries), torchkeep.CorruptCheckpointError, tmp_path)
    assert "duplicate" in str(errors[0])


def test_overlapping_records(tmp_path: Path) -> None:
    errors = refused(H.overlapping_zip(), torchkeep.CorruptCheckpointError, tmp_path)
    assert "overlap" in str(errors[0])


def test_record_running_into_the_central_directory(tmp_path: Path) -> None:
    entries = H.simple_entries()
    layout = H.zip_layout(entries)
    index = next(i for i, e in enumerate(entries) if e.name.endswith("version"))
    size = layout.cd_offset - layout.data_offsets[index] + 8
    entries[index].csize = entries[index].usize = size
    refused(H.zip_bytes(entries), torchkeep.CorruptCheckpointError, tmp_path)


@pytest.mark.parametrize("claim", [2**40, 2**32 + 5, 10**9])
def test_deflate_claiming_a_huge_size_fails_fast(claim: int, tmp_path: Path) -> None:
    entries = _entries_with("data/0", method=8, usize=claim)
    data = H.zip_bytes(entries)
    start = time.perf_counter()
    with peak_memory(20):
        refused(data, torchkeep.FormatError, tmp_path, seconds=2)
    assert time.perf_counter() - start < 2


def test_deflate_claim_above_the_record_limit_is_a_limit_error(tmp_path: Path) -> None:
    entries = _entries_with("data/0", method=8, usize=2**50)
    with peak_memory(20):
        refused(H.zip_bytes(entries), torchkeep.LimitExceededError, tmp_path, seconds=2)


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_real_deflate_bomb_with_a_small_claim_inflates_only_the_claim(record: str,
                                                                      tmp_path: Path) -> None:
    bomb = H.deflated_zeros(64)  # 64 MiB of zeros in ~64 KiB
    entries = _entries_with(record, method=8, payload=bomb)
    start = time.perf_counter()
    with peak_memory(20):
        refused(H.zip_bytes(entries), torchkeep.CorruptCheckpointError, tmp_path, seconds=2)
    assert time.perf_counter() - start < 2


def test_a_deflate_bomb_storage_is_refused_from_its_sizes(tmp_path: Path) -> None:
    # a storage record that inflates 1000:1 to 3.5 GiB, declared consistently everywhere:
    # refused from the sizes, before anything is inflated or allocated
    mib = 3584
    bomb = H.repeated_deflate_zeros(mib)
    numel = (mib << 20) // 4
    entries = H.torch_entries(H.tensor_pickle(size=(numel,), numel=numel), {"0": b""})
    record = next(e for e in entries if e.name.endswith("data/0"))
    record.method, record.payload, record.crc = 8, bomb, 0
    record.csize, record.usize = len(bomb), mib << 20
    data = H.zip_bytes(entries)
    assert len(data) < (mib << 20) // 900
    with peak_memory(50):
        errors = refused(data, torchkeep.LimitExceededError, tmp_path, seconds=10)
    for error in errors:
        assert "archive/data/0" in str(error) and "max_inflated_bytes" in str(error)
    report = torchkeep.scan(data)  # the storage record is never read by a scan
    assert report.verdict == "clean"


def test_max_inflated_bytes_can_be_raised_for_a_trusted_file() -> None:
    entries = H.torch_entries(H.tensor_pickle(size=(1 << 18,), numel=1 << 18), {"0": b""})
    record = next(e for e in entries if e.name.endswith("data/0"))
    record.data, record.method = bytes(1 << 20), 8
    data = H.zip_bytes(entries)
    with pytest.raises(torchkeep.LimitExceededError, match="max_inflated_bytes"):
        torchkeep.load(data, limits=torchkeep.Limits(max_inflated_bytes=1 << 19))
    assert torchkeep.load(data)["w"].count_nonzero() == 0


def test_deflated_records_are_read() -> None:
    entries = H.simple_entries()
    for e in entries:
        e.method = 8
    assert torch.equal(torchkeep.load(H.zip_bytes(entries))["w"],
                       torch.arange(4, dtype=torch.float32))


@pytest.mark.parametrize("changes", [{"flags": 0x801}, {"flags": 0x841}, {"method": 12},
                                     {"method": 14}, {"method": 99}, {"method": 9}],
                         ids=["encrypted", "strong encryption", "bzip2", "lzma", "aes",
                              "deflate64"])
def test_unsupported_zip_features(changes: dict[str, Any], tmp_path: Path) -> None:
    refused(H.zip_bytes(_entries_with("data.pkl", **changes)), torchkeep.UnsupportedFormatError,
            tmp_path)


@pytest.mark.parametrize("offset", [10**6, 2**63, "cd", 0],
                         ids=["past locator", "2**63", "into directory", "start of file"])
def test_zip64_end_record_pointing_elsewhere(offset: Any, tmp_path: Path) -> None:
    if offset == "cd":
        offset = H.zip_layout(H.simple_entries()).cd_offset
    data = H.zip_bytes(H.simple_entries(), zip64_offset=offset)
    refused(data, torchkeep.CorruptCheckpointError, tmp_path)


def test_multi_disk_zip_is_unsupported(tmp_path: Path) -> None:
    layout = H.zip_layout(H.simple_entries(), zip64=False)
    data = bytearray(layout.data)
    struct.pack_into("<H", data, layout.eocd_offset + 4, 1)  # this disk = 1
    refused(bytes(data), torchkeep.UnsupportedFormatError, tmp_path)


@pytest.mark.parametrize("extra,first", [
    ([ZipEntry("other/x", b"x")], False),
    ([ZipEntry("data.pkl", b"x")], True),
    ([ZipEntry("../../etc/passwd", b"x")], False),
    ([ZipEntry("/abs/data.pkl", b"x")], True),
], ids=["other folder", "no folder first", "dot-dot", "absolute first"])
def test_records_outside_the_top_folder(extra: list[ZipEntry], first: bool,
                                        tmp_path: Path) -> None:
    entries = extra + H.simple_entries() if first else H.simple_entries() + extra
    refused(H.zip_bytes(entries), torchkeep.CorruptCheckpointError, tmp_path)


def test_missing_and_bad_version_records(tmp_path: Path) -> None:
    pkl = H.tensor_pickle()
    for data, error in [
        (H.torch_zip(pkl, {"0": FLOATS4}, version=None), torchkeep.CorruptCheckpointError),
        (H.torch_zip(pkl, {"0": FLOATS4}, version=b"abc"), torchkeep.CorruptCheckpointError),
        (H.torch_zip(pkl, {"0": FLOATS4}, version=b"0"), torchkeep.UnsupportedFormatError),
        (H.torch_zip(pkl, {"0": FLOATS4}, version=b"11"), torchkeep.UnsupportedFormatError),
        (H.torch_zip(pkl, {"0": FLOATS4}, version=b"9" * 5000),
         torchkeep.CorruptCheckpointError),
    ]:
        refused(data, error, tmp_path)


def test_zip_without_data_pkl_is_unsupported(tmp_path: Path) -> None:
    entries = [e for e in H.simple_entries() if not e.name.endswith("data.pkl")]
    refused(H.zip_bytes(entries), torchkeep.UnsupportedFormatError, tmp_path)


@pytest.mark.parametrize("record", ["constants.pkl", "code/__torch__/evil.py"])
def test_torchscript_like_archive_is_unsupported(record: str, marker: Path,
                                                 tmp_path: Path) -> None:
    payload = H.GADGETS[0].make(marker)
    entries = H.simple_entries()
    entries.insert(1, ZipEntry(f"archive/{record}", payload))
    errors = refused(H.zip_bytes(entries), torchkeep.UnsupportedFormatError, tmp_path, marker)
    assert "TorchScript" in str(errors[0])


def test_real_torchscript_archive_is_unsupported(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.ones(1, 2)), buf)
    refused(buf.getvalue(), torchkeep.UnsupportedFormatError, tmp_path)


def test_polyglot_evil_pickle_then_zip(marker: Path, tmp_path: Path) -> None:
    """Starts as a pickle (torch.load's legacy path would run it), ends as a valid zip."""
    data = H.GADGETS[0].make(marker) + files().torch_zip
    refused(data, torchkeep.UnsafeCheckpointError, tmp_path, marker)


def test_polyglot_benign_pickle_then_evil_zip(marker: Path) -> None:
    data = Pickle().push(1).finish() + H.in_torch_zip(H.GADGETS[0].make(marker))
    for backend in ("torch", "numpy"):
        result = load_or_refuse(data, backend=backend)
        assert result == 1 or isinstance(result, torchkeep.FormatError)
    assert not marker.exists()


@pytest.mark.parametrize("fake_eocd", [False, True])
def test_zip_whose_comment_holds_a_pickle(fake_eocd: bool, marker: Path) -> None:
    comment = H.GADGETS[0].make(marker)
    if fake_eocd:
        comment = b"PK\x05\x06" + bytes(16) + struct.pack("<H", 3) + comment
    data = H.zip_bytes(H.simple_entries(), comment=comment)
    result = torchkeep.load(data)
    assert torch.equal(result["w"], torch.arange(4, dtype=torch.float32))
    assert not marker.exists()


def _zip_hiding(gadget: bytes, where: str) -> bytes:
    entries = H.simple_entries()
    if where == "comment":
        return H.zip_bytes(entries, comment=gadget)
    if where == "inside the directory":
        return H.zip_bytes(entries, extra_central=gadget)
    index = 0 if where == "between records" else len(entries) - 1  # else: before the directory
    e = entries[index]
    entries[index] = H.ZipEntry(e.name, e.data, payload=e.data + b"\0" * 20 + gadget,
                                csize=len(e.data))
    return H.zip_bytes(entries)


@pytest.mark.parametrize("where", ["between records", "before the directory", "comment",
                                   "inside the directory"])
def test_scan_finds_pickles_hidden_outside_the_zip_records(where: str, marker: Path) -> None:
    data = _zip_hiding(H.GADGETS[0].make(marker), where)
    report = torchkeep.scan(data)
    assert not report.clean
    assert any(f.name == "os.system" and f.verdict == "unsafe" for f in report.findings)
    assert not marker.exists()


@pytest.mark.parametrize("record", [b"", FLOATS4[:12], FLOATS4 + b"\0" * 4, FLOATS4 * 100])
def test_storage_record_size_must_match_numel(record: bytes, tmp_path: Path) -> None:
    refused(H.torch_zip(H.tensor_pickle(), {"0": record}), torchkeep.CorruptCheckpointError,
            tmp_path)


def test_missing_storage_record(tmp_path: Path) -> None:
    refused(H.torch_zip(H.tensor_pickle(), {}), torchkeep.CorruptCheckpointError, tmp_path)


def test_storage_declared_with_two_sizes(tmp_path: Path) -> None:
    pkl = Pickle().push([H.tensor_v2(H.storage_pid(4)),
                         H.tensor_v2(H.storage_pid(2), size=(2,))]).finish()
    refused(H.torch_zip(pkl, {"0": FLOATS4}), torchkeep.CorruptCheckpointError, tmp_path)


@pytest.mark.parametrize("offset,size,stride", [
    (1, (4,), (1,)), (0, (5,), (1,)), (0, (2, 2), (3, 1)), (0, (4,), (-1,)), (-1, (1,), (1,)),
    (3, (2,), (-1,)), (0, (-4,), (1,)), (2**80, (1,), (1,)), (0, (4,), (1, 1)),
    (0, (2, 2), (1,)), ("0", (4,), (1,)), (0, (4.0,), (1,)), (0, [True], (1,)),
], ids=["offset past end", "size past end", "stride past end", "negative stride",
        "negative offset", "negative stride from the end", "negative size",
        "offset 2**80", "stride longer than shape",
        "shape longer than stride", "str offset", "float size", "bool size"])
def test_tensor_views_outside_their_storage(offset: Any, size: Any, stride: Any,
                                            tmp_path: Path) -> None:
    refused(small_tensor_zip(offset=offset, size=size, stride=stride),
            torchkeep.CorruptCheckpointError, tmp_path)


def test_an_empty_view_past_its_storage_loads_as_torch_loads_it() -> None:
    """torch accepts any offset for a view with no elements (it reads nothing)."""
    data = small_tensor_zip(offset=5, size=(0,), stride=(1,))
    for backend in ("torch", "numpy"):
        assert torchkeep.load(data, backend=backend)["w"].shape == (0,)


@pytest.mark.parametrize("size,stride", [((2**62,), (0,)), ((2**31, 2**31), (0, 0)),
                                         ((2,) * 47, (0,) * 47), ((1,) * 65, (0,) * 65)],
                         ids=["2**62 stride 0", "2**62 2-d stride 0", "2**47 elements",
                              "65 dims"])
def test_absurd_tensor_shapes_are_limit_errors(size: Any, stride: Any, tmp_path: Path) -> None:
    refused(small_tensor_zip(size=size, stride=stride), torchkeep.LimitExceededError, tmp_path)


def test_stride_zero_expansion_within_the_limits_loads_without_allocating() -> None:
    data = small_tensor_zip(size=(2**20, 2**20), stride=(0, 0))
    with peak_memory(20):
        result = torchkeep.load(data)["w"]
    assert result.shape == (2**20, 2**20)
    assert result.stride() == (0, 0)
    assert result.untyped_storage().nbytes() == 16  # the file's 4 floats, nothing expanded




@pytest.mark.parametrize("size,stride", [((0, 2**80), (1, 1)), ((1,), (2**80,)),
                                         ((0, 2**62), (1, 1)), ((0, 2**63), (1, 1))],
                         ids=["(0, 2**80)", "stride 2**80", "(0, 2**62)", "(0, 2**63)"])
def test_views_torch_or_numpy_cannot_represent_load_or_are_format_errors(size: Any, stride: Any,
                                                                  tmp_path: Path) -> None:
    loads_or_refuses(small_tensor_zip(size=size, stride=stride), tmp_path)


def _meta_tensor(shape: Any, stride: Any) -> bytes:
    p = Pickle().call("torch._utils", "_rebuild_meta_tensor_no_storage",
                      Raw(frag().glob("torch", "float32")), shape, stride, False)
    return H.torch_zip(p.finish())


def test_meta_tensor_loads() -> None:
    result = torchkeep.load(_meta_tensor((2, 3), (3, 1)))
    assert result.is_meta
    assert result.shape == (2, 3)


def test_meta_tensor_limits(tmp_path: Path) -> None:
    refused(_meta_tensor((2**62,), (1,)), torchkeep.LimitExceededError, tmp_path)


@pytest.mark.parametrize("shape,stride", [((-1,), (1,)), ((0, 2**80), (1, 1))],
                         ids=["negative", "2**80"])
def test_meta_tensor_bad_shapes_are_format_errors(shape: Any, stride: Any) -> None:
    assert isinstance(load_or_refuse(_meta_tensor(shape, stride)), torchkeep.FormatError)


# -- 2b. devices and locations -----------------------------------------------------------------



def test_unknown_location_under_numpy_or_map_location_loads() -> None:
    data = H.torch_zip(Pickle().push({"w": H.tensor_v2(H.storage_pid(4, location="cpx"))})
                       .finish(), {"0": FLOATS4})
    np.testing.assert_array_equal(torchkeep.load(data, backend="numpy")["w"],
                                  np.arange(4, dtype=np.float32))
    assert torch.equal(torchkeep.load(data, map_location="cpu")["w"],
                       torch.arange(4, dtype=torch.float32))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_unknown_storage_location_is_a_torchkeep_error(container: str) -> None:
    if container == "zip":
        pkl = Pickle().push({"w": H.tensor_v2(H.storage_pid(4, location="cpx"))}).finish()
        data = H.torch_zip(pkl, {"0": FLOATS4})
    else:
        pid = H.storage_pid(4, location="cpx", legacy_view=None)
        data = H.legacy_stream(Pickle().push({"w": H.tensor_v2(pid)}).finish())
    assert isinstance(load_or_refuse(data), torchkeep.TorchkeepError)


@pytest.mark.parametrize("how", ["torch.device", "device tensor", "safetensors $device"])
def test_unknown_device_type_is_a_torchkeep_error(how: str) -> None:
    if how == "torch.device":
        data = Pickle().call("torch", "device", "evil").finish()
    elif how == "device tensor":
        data = H.torch_zip(Pickle().call(
            "torch._utils", "_rebuild_device_tensor_from_cpu_tensor",
            H.tensor_v2(H.storage_pid(4)), Raw(frag().glob("torch", "float32")), "evil:0",
            False).finish(), {"0": FLOATS4})
    else:
        data = H.forged_safetensors({"$device": "evil"})
    assert isinstance(load_or_refuse(data), torchkeep.TorchkeepError)


# -- 2c. nesting and memo bombs ----------------------------------------------------------------


@pytest.mark.parametrize("wrap", [lambda p: p, H.in_torch_zip], ids=["plain", "zip"])
def test_mark_nesting_bomb_is_a_limit_error(wrap: Callable[[bytes], bytes],
                                            tmp_path: Path) -> None:
    start = time.perf_counter()
    refused(wrap(H.nested_marks(100_000)), torchkeep.LimitExceededError, tmp_path, seconds=2)
    assert time.perf_counter() - start < 2


BOMBS = {"lists": H.nested_lists, "tuples": H.nested_tuples, "dicts": H.nested_dicts}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_nesting_bomb_fails_cleanly_in_open(kind: str, tmp_path: Path) -> None:
    refused(BOMBS[kind](100_000), torchkeep.FormatError, tmp_path, apis=[APIS[4]], seconds=2)


@pytest.mark.parametrize("kind", list(BOMBS))
@pytest.mark.parametrize("wrap", [lambda p: p, H.in_torch_zip], ids=["plain", "zip"])
def test_nesting_bomb_is_a_limit_error(kind: str, wrap: Callable[[bytes], bytes],
                                       tmp_path: Path) -> None:
    refused(wrap(BOMBS[kind](100_000)), torchkeep.FormatError, tmp_path, apis=APIS[:4],
            seconds=2)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_nesting_just_under_max_depth_loads(backend: str) -> None:
    result = torchkeep.load(H.nested_lists(250), backend=backend)
    depth = 0
    while result:
        result = result[0]
        depth += 1
    assert depth == 250


def test_nesting_in_safetensors_tree_is_a_limit_error(tmp_path: Path) -> None:
    doc = '{"version":1,"tree":' + "[" * 300 + "]" * 300 + "}"
    data = H.safetensors_bytes({"__metadata__": {"torchkeep": doc},
                                "w": H.st_entry("F32", [4], 0, 16)}, FLOATS4)
    refused(data, torchkeep.LimitExceededError, tmp_path, seconds=2)


@pytest.mark.parametrize("tuples", [False, True], ids=["lists", "tuples"])
def test_memo_bomb_loads_fast_and_small(tuples: bool) -> None:
    data = H.memo_bomb(64, tuples=tuples)
    assert len(data) < 1000
    for backend in ("torch", "numpy"):
        start = time.perf_counter()
        with deadline(5), peak_memory(20):
            result = load_or_refuse(data, backend=backend)
        assert time.perf_counter() - start < 2
        if not isinstance(result, torchkeep.TorchkeepError):
            assert result[0] is result[1]  # sharing is kept, not expanded


def test_tensor_memo_bomb_loads_fast_and_small() -> None:
    data = H.torch_zip(H.tensor_memo_bomb(64), {"0": FLOATS4})
    start = time.perf_counter()
    with deadline(5), peak_memory(20):
        result = load_or_refuse(data)
    assert time.perf_counter() - start < 2
    if not isinstance(result, torchkeep.TorchkeepError):
        leaf = result
        while isinstance(leaf, list):
            leaf = leaf[0]
        assert torch.equal(leaf, torch.arange(4, dtype=torch.float32))


@pytest.mark.parametrize("tensors", [False, True], ids=["lists", "tensor leaves"])
def test_memo_bomb_opens_fast(tensors: bool) -> None:
    data = H.torch_zip(H.tensor_memo_bomb(64), {"0": FLOATS4}) if tensors else H.memo_bomb(64)
    start = time.perf_counter()
    with deadline(3):
        try:
            with torchkeep.open(data) as handle:
                handle.keys()
        except torchkeep.TorchkeepError:
            pass
    assert time.perf_counter() - start < 2


def test_tuple_bomb_as_a_dict_key_is_refused_fast(tmp_path: Path) -> None:
    p = Pickle().empty_tuple().put(0)
    for i in range(1, 80):
        p.get(i - 1).get(i - 1).tuple2().put(i).pop()
    for tail in (frag().empty_dict().get(79).int(1).setitem(),
                 frag().glob("__builtin__", "set").mark().mark().get(79).list().tuple().reduce()):
        data = Pickle().op(p.ops()[2:]).op(tail.ops()).finish()
        refused(data, torchkeep.CorruptCheckpointError, tmp_path, seconds=2)


def test_many_keys_sharing_a_costly_tuple_are_refused_fast(tmp_path: Path) -> None:
    # each key is one tuple of 2**15 - 1 nodes as a tree (a DAG of 15 DUP'd levels): under
    # the per-key bound, but 2,000 of them cost 65M node visits to check and to hash
    p = Pickle().empty_tuple().put(0)
    for i in range(1, 15):
        p.get(i - 1).get(i - 1).tuple2().put(i).pop()
    keys = frag().glob("__builtin__", "frozenset").mark().mark()
    for _ in range(2000):
        keys.get(14)
    data = Pickle().op(p.ops()[2:]).op(keys.list().tuple().reduce().ops()).finish()
    with pytest.raises(torchkeep.CorruptCheckpointError, match="too large to hash"), \
            deadline(10):
        torchkeep.load(data)
    small = Pickle().op(p.ops()[2:]).op(frag().empty_dict().get(14).int(1).setitem().ops())
    assert len(next(iter(torchkeep.load(small.finish())))) == 2  # one such key is fine


@pytest.mark.parametrize("ops", [
    b"\x8b" + struct.pack("<i", 1 << 20) + b"\x01" * (1 << 20),
    b"L" + b"9" * 100_000 + b"L\n",
    b"I" + b"9" * 100_000 + b"\n",
], ids=["LONG4 1 MiB", "LONG 100k digits", "INT 100k digits"])
def test_huge_integer_literals_are_limit_errors(ops: bytes, tmp_path: Path) -> None:
    refused(Pickle().op(ops).finish(), torchkeep.LimitExceededError, tmp_path, seconds=2)


@pytest.mark.parametrize("ops", [
    b"\x8d" + (2**63).to_bytes(8, "little"),
    b"\x8e" + (2**64 - 1).to_bytes(8, "little"),
    b"\x96" + (2**62).to_bytes(8, "little"),
    b"X\xff\xff\xff\xff",
    b"\x95" + (2**63).to_bytes(8, "little"),
    b"j\xff\xff\xff\xff",
], ids=["BINUNICODE8", "BINBYTES8", "BYTEARRAY8", "BINUNICODE", "FRAME", "LONG_BINGET"])
def test_lying_lengths_in_the_pickle_allocate_nothing(ops: bytes, tmp_path: Path) -> None:
    with peak_memory(20):
        refused(Pickle(5).op(ops).finish(), torchkeep.CorruptCheckpointError, tmp_path,
                seconds=2)


# -- 3. safetensors tricks ---------------------------------------------------------------------

ST_W = {"w": H.st_entry("F32", [4], 0, 16)}


def test_safetensors_header_length_beyond_eof(tmp_path: Path) -> None:
    refused(H.safetensors_bytes(ST_W, FLOATS4, length=10**6), torchkeep.FormatError, tmp_path)
    refused(H.safetensors_bytes(ST_W, FLOATS4, length=2**64 - 1), torchkeep.FormatError,
            tmp_path)


def test_safetensors_header_above_100mb_is_a_limit_error(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # a sparse 110 MB file: header claims 100,000,001 bytes
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(110_000_000)
    start = time.perf_counter()
    with peak_memory(20):
        for call in (_load_path, _load_numpy, _load_stream, _open):
            with deadline(2), pytest.raises(torchkeep.LimitExceededError):
                call(path)
    assert time.perf_counter() - start < 4


@pytest.mark.parametrize("header", [
    b"{not json}", b"\xff\xfe{}", b"[1, 2]", b"\"text\"", b'{"w": 5}', b"{" + b"\0" * 7,
    b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
    b'"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
], ids=["not json", "not utf-8", "array", "string", "entry not object", "NUL padding",
        "nested 100k", "duplicate keys"])
def test_safetensors_bad_headers(header: bytes, tmp_path: Path) -> None:
    # a header not starting with "{" is not recognised as safetensors at all: FormatError
    refused(H.safetensors_bytes(header, FLOATS4), torchkeep.FormatError, tmp_path, seconds=2)


@pytest.mark.parametrize("tensors,data", [
    ({"a": H.st_entry("F32", [2], 0, 8), "b": H.st_entry("F32", [2], 12, 20)}, bytes(20)),
    ({"a": H.st_entry("F32", [2], 0, 8), "b": H.st_entry("F32", [2], 4, 12)}, bytes(12)),
    ({"a": H.st_entry("F32", [4], 0, 16)}, bytes(20)),
    ({"a": H.st_entry("F32", [4], 0, 16)}, bytes(12)),
    ({"a": H.st_entry("F32", [4], 4, 20)}, bytes(20)),
    ({"a": H.st_entry("F32", [3], 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F64", [4], 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F32", [-4], 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F32", [4.0], 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F32", [True, 4], 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F32", ["4"], 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F32", 4, 0, 16)}, bytes(16)),
    ({"a": H.st_entry("F32", [4], 16, 0)}, bytes(16)),
    ({"a": H.st_entry("F32", [4], -16, 0)}, bytes(16)),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, bytes(16)),
    ({"a": {"dtype": "F32", "shape": [4]}}, bytes(16)),
    ({"a": {"shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
    ({"a": H.st_entry("F4", [3], 0, 1)}, bytes(1)),
    ({"a": H.st_entry("F32", [2**62, 2**62], 0, 16)}, bytes(16)),
], ids=["gap", "overlap", "trailing bytes", "truncated buffer", "not starting at 0",
        "shape/offsets mismatch", "dtype/offsets mismatch", "negative shape", "float shape",
        "bool shape", "str shape", "shape not a list", "begin > end", "negative offset",
        "three offsets", "no offsets", "no dtype", "odd F4", "2**124 elements"])
def test_safetensors_bad_tensor_entries(tensors: dict[str, Any], data: bytes,
                                        tmp_path: Path) -> None:
    refused(H.safetensors_bytes(tensors, data), torchkeep.FormatError, tmp_path)


@pytest.mark.parametrize("dtype", ["X99", "F6_E2M3", "f32", ""])
def test_safetensors_unknown_dtype(dtype: str, tmp_path: Path) -> None:
    header = {"a": H.st_entry(dtype, [4], 0, 4)}
    refused(H.safetensors_bytes(header, bytes(4)), torchkeep.FormatError, tmp_path)


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"a": "b"}},
                                      ["k", "v"], "kv", 5])
def test_safetensors_metadata_must_map_strings_to_strings(metadata: Any,
                                                          tmp_path: Path) -> None:
    header = {"__metadata__": metadata, **ST_W}
    refused(H.safetensors_bytes(header, FLOATS4), torchkeep.CorruptCheckpointError, tmp_path)


def test_safetensors_zero_dim_and_empty_tensors_load() -> None:
    header = {"s": H.st_entry("F32", [], 0, 4), "e": H.st_entry("F32", [0, 3], 4, 4)}
    result = torchkeep.load(H.safetensors_bytes(header, FLOATS4[:4]))
    assert result["s"].shape == ()
    assert result["e"].shape == (0, 3)


@pytest.mark.parametrize("tree,error", [
    ({"$tensor": "missing"}, torchkeep.CorruptCheckpointError),
    ({"$dict": {"a": {"$tensor": "w"}, "b": {"$ndarray": "nope"}}},
     torchkeep.CorruptCheckpointError),
    ({"$tensor": ["w"]}, torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "offset": 1, "shape": [4], "stride": [1]},
     torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "shape": [2, 2], "stride": [3, 1]}, torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "shape": [4], "stride": [-1]}, torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "offset": -1, "shape": [1], "stride": [1]},
     torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "shape": [4], "stride": [1, 1]}, torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "dtype": "float64", "shape": [4]}, torchkeep.CorruptCheckpointError),
    ({"$tensor": "w", "dtype": "evil"}, torchkeep.CorruptCheckpointError),
    ({"$evil": 1}, torchkeep.CorruptCheckpointError),
    ({}, torchkeep.CorruptCheckpointError),
    ({"$dtype": "evil"}, torchkeep.CorruptCheckpointError),
    ({"$int": "9" * 5000}, torchkeep.CorruptCheckpointError),
    ({"$bytes": "!!!"}, torchkeep.CorruptCheckpointError),
    ({"$set": [{"$dict": {}}]}, torchkeep.CorruptCheckpointError),
    ({"$dict": [[{"$dict": {}}, 1]]}, torchkeep.CorruptCheckpointError),
    ({"$dict": "ab"}, torchkeep.CorruptCheckpointError),
    ({"$ndbytes": "", "npdtype": "O", "shape": [0]}, torchkeep.CorruptCheckpointError),
    ({"$ndbytes": "", "npdtype": {"names": ["a"], "formats": ["O"]}, "shape": [0]},
     torchkeep.CorruptCheckpointError),
    ({"$ndbytes": "", "npdtype": "S0", "shape": [3]}, torchkeep.CorruptCheckpointError),
    ({"$ndbytes": "AAAAAA==", "npdtype": "<f4", "shape": [-1, -1]},
     torchkeep.CorruptCheckpointError),
    ({"$ndbytes": "", "npdtype": "<f4", "shape": [0, 2**62]}, torchkeep.CorruptCheckpointError),
    ({"$npscalar": "", "npdtype": "O"}, torchkeep.CorruptCheckpointError),
    ({"$device": "cpu:x"}, torchkeep.CorruptCheckpointError),
], ids=["missing tensor", "missing ndarray", "unhashable name", "view past end",
        "strided view past end", "negative stride", "negative offset", "stride/shape length",
        "wider dtype view past end", "unknown view dtype",
        "unknown tag", "empty node", "unknown dtype", "huge int", "bad base64",
        "unhashable set item", "unhashable key", "bad pairs", "object ndbytes",
        "structured object ndbytes", "zero itemsize ndbytes", "negative ndbytes shape",
        "huge ndbytes shape", "object npscalar", "bad device index"])
def test_forged_torchkeep_tree(tree: Any, error: type[torchkeep.TorchkeepError],
                               tmp_path: Path) -> None:
    refused(H.forged_safetensors(tree), error, tmp_path)


@pytest.mark.parametrize("doc", ['{"version":2,"tree":1}', "[]", '{"version":1}', "{{", "",
                                 '{"version":1,"tree":' + "[" * 100_000 + "]" * 100_000 + "}"],
                         ids=["version 2", "list", "no tree", "not json", "empty",
                              "nested 100k"])
def test_forged_torchkeep_document(doc: str, tmp_path: Path) -> None:
    data = H.safetensors_bytes({"__metadata__": {"torchkeep": doc}, **ST_W}, FLOATS4)
    refused(data, torchkeep.FormatError, tmp_path, seconds=2)


@pytest.mark.parametrize("tree", [{"$dtype": 5}, {"$dtype": ["float32"]},
                                  {"$tensor": "w", "dtype": 5}],
                         ids=["$dtype int", "$dtype list", "view dtype int"])
def test_forged_tree_non_string_dtype_is_a_format_error(tree: Any, tmp_path: Path) -> None:
    refused(H.forged_safetensors(tree), torchkeep.CorruptCheckpointError, tmp_path)


@pytest.mark.parametrize("view", [
    {"shape": [2**62], "stride": [0]}, {"shape": [2**80], "stride": [0]},
    {"shape": [0, 2**80], "stride": [1, 1]}, {"shape": [1] * 100, "stride": [1] * 100},
], ids=["2**62 stride 0", "2**80 stride 0", "(0, 2**80)", "100 dims"])
def test_forged_tree_views_respect_the_limits(view: dict[str, Any], tmp_path: Path) -> None:
    refused(H.forged_safetensors({"$tensor": "w", **view}), torchkeep.FormatError, tmp_path)


# -- 4. legacy stream tricks -------------------------------------------------------------------

LEGACY_MAIN = H.tensor_pickle(legacy_view=None)


@pytest.mark.parametrize("kw,error", [
    ({"version": 1000}, torchkeep.CorruptCheckpointError),
    ({"version": "1001"}, torchkeep.CorruptCheckpointError),
    ({"storages": [(5, FLOATS4)]}, torchkeep.CorruptCheckpointError),
    ({"storages": [(-1, FLOATS4)]}, torchkeep.CorruptCheckpointError),
    ({"storages": [(4, FLOATS4[:13])]}, torchkeep.CorruptCheckpointError),
    ({"storages": [(4, b"")]}, torchkeep.CorruptCheckpointError),
    ({"storages": []}, torchkeep.CorruptCheckpointError),
    ({"keys": ["0", "1"], "storages": [(4, FLOATS4)] * 2}, torchkeep.CorruptCheckpointError),
    ({"keys": []}, torchkeep.CorruptCheckpointError),
    ({"keys": ["1"]}, torchkeep.CorruptCheckpointError),
    ({"keys": ["0", "0"], "storages": [(4, FLOATS4)] * 2}, torchkeep.CorruptCheckpointError),
    ({"keys_pickle": pickle.dumps("0", protocol=2)}, torchkeep.CorruptCheckpointError),
    ({"keys_pickle": pickle.dumps([0], protocol=2)}, torchkeep.CorruptCheckpointError),
    ({"keys_pickle": b"\x80\x02]"}, torchkeep.CorruptCheckpointError),
], ids=["version 1000", "version str", "count mismatch", "negative count",
        "truncated storage", "empty storage", "no storage", "extra key", "missing key",
        "wrong key", "duplicate key", "keys not a list", "int keys", "truncated keys"])
def test_legacy_stream_tricks(kw: dict[str, Any], error: type[torchkeep.TorchkeepError],
                              tmp_path: Path) -> None:
    refused(H.legacy_stream(LEGACY_MAIN, **kw), error, tmp_path)


def test_legacy_truncated_at_every_offset() -> None:
    data = H.legacy_stream(LEGACY_MAIN)
    assert torch.equal(torchkeep.load(data)["w"], torch.arange(4, dtype=torch.float32))
    for cut in range(len(data)):
        with pytest.raises(torchkeep.FormatError):
            torchkeep.load(data[:cut])


@pytest.mark.parametrize("magic", [12345, H.MAGIC_NUMBER + 1, "magic", None])
def test_legacy_wrong_magic_is_never_read_as_a_checkpoint(magic: Any, marker: Path) -> None:
    """Without the exact pickled magic number the stream is not a legacy checkpoint: at most
    its first pickle is read, as a plain pickle; the object pickle never runs."""
    main = H.GADGETS[0].make(marker)
    data = H.legacy_stream(main, magic=magic)
    for backend in ("torch", "numpy"):
        result = load_or_refuse(data, backend=backend)
        assert isinstance(result, torchkeep.FormatError) or result == magic
    assert not marker.exists()


@pytest.mark.parametrize("view,error", [
    (("1", 2, 4), torchkeep.CorruptCheckpointError),
    (("1", -1, 4), torchkeep.CorruptCheckpointError),
    (("1", 0, 2**62), torchkeep.CorruptCheckpointError),
    (("1", 0), torchkeep.CorruptCheckpointError),
    ((1, 0, 4), torchkeep.CorruptCheckpointError),
    ([("1", 0, 4)], torchkeep.CorruptCheckpointError),
], ids=["outside root", "negative offset", "huge", "2-tuple", "int key", "list"])
def test_legacy_view_metadata(view: Any, error: type[torchkeep.TorchkeepError],
                              tmp_path: Path) -> None:
    refused(H.legacy_stream(H.tensor_pickle(legacy_view=view)), error, tmp_path)


def test_legacy_view_inside_its_root_loads() -> None:
    data = H.legacy_stream(H.tensor_pickle(legacy_view=("1", 1, 3), size=(3,)))
    assert torch.equal(torchkeep.load(data)["w"], torch.tensor([1.0, 2.0, 3.0]))


def test_legacy_zip_style_persistent_id_is_refused(tmp_path: Path) -> None:
    refused(H.legacy_stream(H.tensor_pickle()), torchkeep.CorruptCheckpointError, tmp_path)


def test_legacy_pickled_module_is_unsafe() -> None:
    data = H.torch_save_bytes(torch.nn.Linear(2, 2), _use_new_zipfile_serialization=False)
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.load(data, allow=["torch.nn.modules.linear.Linear"])


def test_legacy_pickled_module_class_is_unsafe() -> None:
    data = H.torch_save_bytes(torch.nn.Linear(2, 2), _use_new_zipfile_serialization=False)
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="Linear"):
        torchkeep.load(data)


# -- 5. fuzzing --------------------------------------------------------------------------------

MUTATIONS = st.lists(
    st.builds(Mutation, kind=st.sampled_from(["flip", "insert", "delete", "set", "token"]),
              at=st.integers(0, 1 << 16), value=st.integers(0, 255)),
    min_size=1, max_size=4,
)
#: A corrupted "cpu" location tag: the known-bad input pinned for the targets that reach it.
LOCATION = [Mutation("token", at=0, value=2)]


def _fuzz_input(target: str, mutations: list[Mutation]) -> bytes:
    if target == "data.pkl in a zip":  # mutate the pickle, keep the zip (and CRC) valid
        pkl = {n.split("/", 1)[1]: d for n, d in H.read_zip(files().torch_zip)}
        return H.replace_records(files().torch_zip,
                                 {"data.pkl": H.mutate(pkl["data.pkl"], mutations)})
    return H.mutate(getattr(files(), target), mutations)


FUZZ_CASES = [
    pytest.param(target, backend, id=f"{target}-{backend}")
    for target, backend in [
        ("torch_zip", "torch"), ("torch_zip", "numpy"),
        ("torchkeep_zip", "torch"),
        ("legacy", "numpy"), ("legacy", "torch map_location=cpu"),
        ("legacy", "torch"),
        ("safetensors", "torch"), ("safetensors", "numpy"),
        ("data.pkl in a zip", "numpy"), ("data.pkl in a zip", "torch map_location=cpu"),
        ("data.pkl in a zip", "torch"),
    ]
]


@pytest.mark.parametrize("target,backend", FUZZ_CASES)
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@example(mutations=LOCATION)
@given(mutations=MUTATIONS)
def test_fuzz_mutated_checkpoints(target: str, backend: str, mutations: list[Mutation]) -> None:
    data = _fuzz_input(target, mutations)
    kw: dict[str, Any] = {"backend": "numpy"} if backend == "numpy" else {}
    if backend.endswith("map_location=cpu"):
        kw["map_location"] = "cpu"
    with deadline(10):
        try:
            torchkeep.load(data, **kw)
        except torchkeep.TorchkeepError:
            pass
        try:
            with torchkeep.open(data) as handle:
                for name in handle:
                    handle.tensor(name, **kw)
        except torchkeep.TorchkeepError:
            pass


# -- 6. bad input changes nothing on disk ------------------------------------------------------


@pytest.mark.parametrize("fmt,name", [("torch", "ckpt.pt"), ("torch-legacy", "ckpt.pt"),
                                      ("safetensors", "ckpt.safetensors")])
@pytest.mark.parametrize("obj,where", [
    ({"a": object()}, "obj['a']"),
    ({"model": {"fc1": object()}}, "obj['model']['fc1']"),
    ([1, {"k": object()}], "obj[1]['k']"),
    ({"t": torch.ones(3), "z": object()}, "obj['z']"),
    ({"x": [torch.ones(2), (1, object())]}, "obj['x'][1][1]"),
], ids=["top", "nested", "list", "after a tensor", "tuple in list"])
def test_save_of_unsupported_object_changes_nothing(fmt: str, name: str, obj: Any, where: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / name
    torchkeep.save({"keep": torch.arange(3)}, path, format=fmt)
    before = path.read_bytes()
    stat = path.stat()
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(torchkeep.UnsupportedTypeError) as info:
        torchkeep.save(obj, path, format=fmt)
    assert isinstance(info.value, TypeError)
    assert str(info.value).startswith(where + ":"), str(info.value)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == listing
    assert torch.equal(torchkeep.load(path)["keep"], torch.arange(3))


def test_save_of_unsupported_object_through_a_symlink_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "real.pt"
    torchkeep.save({"keep": 1}, target)
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    before = target.read_bytes()
    with pytest.raises(torchkeep.UnsupportedTypeError, match=r"obj\['a'\]"):
        torchkeep.save({"a": object()}, link)
    assert target.read_bytes() == before
    assert link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["link.pt", "real.pt"]


def test_save_of_unsupported_object_to_a_new_path_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.UnsupportedTypeError):
        torchkeep.save({"a": object()}, tmp_path / "new.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("obj", [torch.ones(2).to_sparse(), torch.empty(2, device="meta"),
                                 json.JSONDecoder()], ids=["sparse", "meta", "foreign class"])
def test_save_refusals_are_unsupported_type_errors(obj: Any, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")
    with pytest.raises(torchkeep.UnsupportedTypeError, match=r"^obj\['x'\]: "):
        torchkeep.save({"x": obj}, path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_error_messages_never_repr_a_shared_reference_bomb(tmp_path: Path) -> None:
    # the legacy stream's protocol version is a pickle: a 10-level list bomb there made the
    # error message's repr run for ever (found by the load fuzzer)
    bomb = H.memo_bomb(40)
    data = (H.split_pickles(H.torch_save_bytes(H.small_state(),
                                               _use_new_zipfile_serialization=False), 5)[0][0]
            + bomb)
    refused(data, torchkeep.CorruptCheckpointError, tmp_path, seconds=5)
    record = torchkeep.PickledObject("m", "C", (), torchkeep.load(bomb))
    with deadline(5):
        assert len(repr(record)) < 300


def _deep_step(tmp_path: Path) -> Path:
    """A committed step whose manifest nests 100,000 lists (its checksum made to match)."""
    from torchkeep.formats.manifest import MANIFEST_NAME, MARKER_NAME, checksum

    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        step = Path(mgr.step_path(1))
    raw = (step / MANIFEST_NAME).read_text().replace(
        '"tree":', '"tree":' + "[" * 100_000 + "1" + "]" * 100_000 + ',"x":').encode()
    (step / MANIFEST_NAME).write_bytes(raw)
    marker = json.loads((step / MARKER_NAME).read_text())
    (step / MARKER_NAME).write_text(json.dumps({**marker, "manifest_xxh3": checksum(raw)}))
    return step


@pytest.mark.parametrize("where", ["safetensors header", "step manifest"])
def test_json_nested_past_the_parsers_stack_is_a_format_error(where: str,
                                                              tmp_path: Path) -> None:
    # json.loads raised a bare RecursionError out of scan (safetensors) and out of every
    # entry point (step manifests)
    if where == "step manifest":
        target: Any = _deep_step(tmp_path)
    else:
        header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        target = tmp_path / "deep.safetensors"
        target.write_bytes(struct.pack("<Q", len(header)) + header)
    for call in (torchkeep.load, torchkeep.inspect, torchkeep.open):
        with deadline(10), pytest.raises(torchkeep.FormatError):
            call(target)
    report = torchkeep.scan(target)
    assert report.verdict == "incomplete" and report.errors
    assert not torchkeep.verify(target).intact
