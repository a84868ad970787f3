"""scan and load classify every input alike; scan never calls clean what it did not read."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile as H
import torchkeep
from torchkeep.cli.main import main


def _scan_exit(path: Path) -> int:
    return main(["scan", str(path)])


def _framed_gadget(marker: Path) -> bytes:
    # a 2-byte FRAME around a BINBYTES that hides GLOBAL + REDUCE: CPython's C unpickler
    # runs the hidden call, a reader that ignores frames sees only bytes
    hidden = H.GADGETS[0].make(marker)[2:]  # without its PROTO
    return (b"\x80\x05N0(\x95" + (2).to_bytes(8, "little") + b"B"
            + len(hidden).to_bytes(4, "little") + hidden + b"1N.")


def test_a_frame_that_splits_an_opcode_is_dangerous(marker: Path) -> None:
    report = torchkeep.scan(_framed_gadget(marker))
    assert report.verdict == "dangerous"
    assert any(f.name == "<FRAME violation>" and f.verdict == "unsafe" for f in report.findings)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="FRAME"):
        torchkeep.load(_framed_gadget(marker))
    framed = pickle.dumps({"a": [1, 2.5, "x" * 100_000]}, protocol=5)  # CPython's own frames
    assert torchkeep.scan(framed).verdict == "clean"
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol_0_and_1_pickles_are_recognised(protocol: int, marker: Path,
                                                 tmp_path: Path) -> None:
    benign = tmp_path / "benign.pkl"
    benign.write_bytes(pickle.dumps({"a": [1, "b"], "c": (2.5, None)}, protocol=protocol))
    report = torchkeep.scan(benign)
    assert (report.format, report.verdict) == ("pickle", "clean")
    assert torchkeep.load(benign) == {"a": [1, "b"], "c": (2.5, None)}
    assert _scan_exit(benign) == 0
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(H.Evil(marker), protocol=protocol))
    report = torchkeep.scan(evil)
    assert (report.format, report.verdict) == ("pickle", "dangerous")
    assert [f.name for f in report.flagged] == ["posix.system"]
    assert _scan_exit(evil) == 1
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"posix\.system"):
        torchkeep.load(evil)
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"hello, world\n" * 10,
                                  b"7z\xbc\xaf\x27\x1c" + b"\0" * 40, b"\0" * 100],
                         ids=["png", "text", "7z", "zeros"])
def test_bytes_in_no_known_format_are_never_clean(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "mystery.bin"
    path.write_bytes(data)
    report = torchkeep.scan(path)
    assert (report.format, report.verdict) == ("unrecognised", "incomplete")
    assert _scan_exit(path) == 3
    with pytest.raises(torchkeep.FormatError, match="not a checkpoint torchkeep recognises"):
        torchkeep.load(path)


def test_an_empty_file_is_not_clean(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert torchkeep.scan(path).verdict == "incomplete"
    assert _scan_exit(path) == 3


def test_a_truncated_pickle_keeps_its_findings_and_is_dangerous(tmp_path: Path) -> None:
    path = tmp_path / "broken.pkl"
    path.write_bytes(b"cbuiltins\nexec\n(X\x00\x01\x00\x00payload")  # BINUNICODE past the end
    report = torchkeep.scan(path)
    assert report.verdict == "dangerous" and report.errors
    assert [f.name for f in report.flagged] == ["builtins.exec"]


def _torch_tar(tmp_path: Path, payload: bytes | None = None) -> Path:
    """A file in torch's pre-0.1.10 tar layout (members sys_info, pickle, storages,
    tensors, each holding pickles)."""
    members = {
        "sys_info": pickle.dumps({"protocol_version": 1000, "little_endian": True}, protocol=2),
        "pickle": payload or pickle.dumps({"epoch": 3}, protocol=2),
        "storages": pickle.dumps(0, protocol=2),
        "tensors": pickle.dumps(0, protocol=2),
    }
    path = tmp_path / "old.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_torch_tar_layout_is_one_format_for_every_command(tmp_path: Path,
                                                              marker: Path) -> None:
    path = _torch_tar(tmp_path)
    report = torchkeep.scan(path)
    assert (report.format, report.verdict) == ("torch-tar", "clean")
    assert report.pickles >= 2
    with pytest.raises(torchkeep.UnsupportedFormatError) as refused:
        torchkeep.load(path)
    assert refused.value.format == "torch-tar" and "pre-0.1.10" in str(refused.value)
    assert main(["inspect", str(path)]) == 2  # a format torchkeep will not handle
    evil = _torch_tar(tmp_path, H.GADGETS[0].make(marker))
    report = torchkeep.scan(evil)
    assert report.verdict == "dangerous"
    assert any(f.name == "os.system" and f.location == "pickle" for f in report.flagged)
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    assert torchkeep.scan(plain).format == "tar"
    with pytest.raises(torchkeep.UnsupportedFormatError) as refused:
        torchkeep.load(plain)
    assert refused.value.format == "tar"
    assert not marker.exists()


def test_torchscript_is_one_format_for_every_command(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    report = torchkeep.scan(path)
    assert (report.format, report.verdict) == ("torchscript", "dangerous")
    with pytest.raises(torchkeep.UnsupportedFormatError) as refused:
        torchkeep.load(path)
    assert refused.value.format == "torchscript"
    assert main(["inspect", str(path)]) == 2
    assert main(["verify", str(path)]) == 2


def test_numpy_files_are_scanned_for_pickled_object_arrays(tmp_path: Path,
                                                           marker: Path) -> None:
    plain = tmp_path / "ints.npy"
    np.save(plain, np.arange(10))
    assert (torchkeep.scan(plain).format, torchkeep.scan(plain).verdict) == ("numpy", "clean")
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([H.Evil(marker), 1], dtype=object), allow_pickle=True)
    report = torchkeep.scan(objects)
    assert report.verdict == "dangerous" and "posix.system" in {f.name for f in report.flagged}
    archive = tmp_path / "arrays.npz"
    np.savez(archive, a=np.arange(3), b=np.array([H.Evil(marker)], dtype=object))
    report = torchkeep.scan(archive)
    assert (report.format, report.verdict) == ("numpy", "dangerous")
    for path in (plain, objects, archive):
        with pytest.raises(torchkeep.UnsupportedFormatError) as refused:
            torchkeep.load(path)
        assert refused.value.format == "numpy"
    assert not marker.exists()


def test_a_zip_that_is_no_checkpoint_is_scanned_member_by_member(tmp_path: Path,
                                                                 marker: Path) -> None:
    import zipfile

    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("model/config.bin", pickle.dumps(H.Evil(marker), protocol=0))
    report = torchkeep.scan(path)
    assert (report.format, report.verdict) == ("zip", "dangerous")
    assert [f.location for f in report.flagged] == ["model/config.bin"]
    with pytest.raises(torchkeep.UnsupportedFormatError) as refused:
        torchkeep.load(path)
    assert refused.value.format == "zip"


def _every_format(tmp_path: Path) -> dict[str, Path]:
    tree = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    paths: dict[str, Path] = {}
    for fmt, name in (("torch", "a.pt"), ("torch-legacy", "a_legacy.pt"),
                      ("safetensors", "a.safetensors")):
        paths[fmt] = tmp_path / name
        torchkeep.save(tree, paths[fmt], format=fmt)
    paths["pickle"] = tmp_path / "plain.pkl"
    paths["pickle"].write_bytes(pickle.dumps({"epoch": 3}, protocol=0))
    paths["torch-tar"] = _torch_tar(tmp_path)
    paths["numpy"] = tmp_path / "arr.npy"
    np.save(paths["numpy"], np.arange(3))
    paths["unrecognised"] = tmp_path / "text.txt"
    paths["unrecognised"].write_text("not a checkpoint\n")
    return paths


def test_scan_load_and_inspect_agree_on_what_every_file_is(tmp_path: Path) -> None:
    for fmt, path in _every_format(tmp_path).items():
        assert torchkeep.scan(path).format == fmt, path
        try:
            assert torchkeep.inspect(path).format == fmt
        except torchkeep.UnsupportedFormatError as e:
            assert e.format == fmt
        except torchkeep.FormatError:
            assert fmt == "unrecognised"


@pytest.mark.parametrize("data,name", [
    (b"\x80\x02cos\nsys", "os.sy"),  # the GLOBAL's name cut off by the end of the file
    (b"I0x10\ncos\nsystem\n.", "os.system"),  # an INT pickletools refuses, CPython reads
    (b"S'\x83'\nS'x'\n\x93.", "\x83.x"),  # a STRING that is not ASCII, then STACK_GLOBAL
    (b"\x95\x16\x00\x00\x00\x00\x00\x00\x00\x8c\x03sys\x94\x8c\x04exit\x94\x93\x94K\x00"
     b"\x85\x94R\x94.", "sys.exit"),  # protocol 4 opcodes with no PROTO
], ids=["cut-off GLOBAL", "hex INT", "latin-1 STRING", "FRAME first"])
def test_what_cpython_reads_where_pickletools_refuses_is_still_scanned(data: bytes,
                                                                       name: str) -> None:
    # found by the oracle rule on the fuzzers' saved inputs: CPython's unpicklers import
    # these names, pickletools stops before them
    from pickle_oracle import recorded_imports_of

    report = torchkeep.scan(data)
    assert report.verdict == "dangerous"
    assert name in {f.name for f in report.flagged}
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        f.write(data)
        f.flush()
        assert name in recorded_imports_of([f.name])[f.name]["imports"]
