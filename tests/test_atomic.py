"""Saving to a path is all or nothing: every failure leaves the old file and no debris."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch

import torchkeep
from conftest import tmp_debris
from torchkeep.errors import StorageError, UnsupportedTypeError


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "model.pt"
    torchkeep.save({"w": torch.ones(3)}, path)
    return path


def _raiser(exc: BaseException):
    def hook(*args, **kwargs):
        raise exc

    return hook


@pytest.mark.parametrize("where", ["write1", "write2", "write3", "fsync", "replace", "interrupt"])
def test_failure_keeps_the_old_file(existing, monkeypatch, where: str) -> None:
    before = existing.read_bytes()
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace
    if where.startswith("write"):
        state = {"n": 0}

        def write(fd, data):
            state["n"] += 1
            if state["n"] == int(where[-1]):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        expected: type[BaseException] = StorageError
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", _raiser(OSError(errno.EIO, "EIO")))
        expected = StorageError
    elif where == "replace":
        monkeypatch.setattr(os, "replace", _raiser(OSError(errno.EXDEV, "x")))
        expected = StorageError
    else:
        def interrupted(fd, data):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "write", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected) as info:
        torchkeep.save({"w": torch.zeros(100_000), "b": torch.ones(100_000)}, existing)
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "replace", real_replace)
    assert existing.read_bytes() == before
    assert tmp_debris(existing.parent) == []
    if expected is StorageError:
        assert str(existing) in str(info.value)
        assert isinstance(info.value, OSError)


def test_enospc_names_the_cause(existing, monkeypatch) -> None:
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="No space left"):
        torchkeep.save({"w": torch.ones(10)}, existing)


def test_unsupported_object_leaves_no_trace(existing) -> None:
    before = existing.read_bytes()
    with pytest.raises(UnsupportedTypeError, match=r"obj\['model'\]\['head'\]: unsupported type"):
        torchkeep.save({"model": {"head": object()}}, existing)
    assert existing.read_bytes() == before
    assert tmp_debris(existing.parent) == []


def test_new_file_appears_only_complete(tmp_path, monkeypatch) -> None:
    path = tmp_path / "new.pt"
    monkeypatch.setattr(os, "fsync", _raiser(OSError(errno.EIO, "EIO")))
    with pytest.raises(StorageError):
        torchkeep.save({"w": torch.ones(3)}, path)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_replacement_keeps_permissions(existing) -> None:
    os.chmod(existing, 0o640)
    torchkeep.save({"w": torch.zeros(3)}, existing)
    assert os.stat(existing).st_mode & 0o777 == 0o640


def test_new_file_mode_follows_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        torchkeep.save({"w": torch.zeros(3)}, tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.pt").st_mode & 0o777 == 0o644


def test_symlink_target_is_replaced(existing, tmp_path) -> None:
    link = tmp_path / "latest.pt"
    link.symlink_to(existing.name)
    torchkeep.save({"w": torch.full((2,), 7.0)}, link)
    assert link.is_symlink()
    assert torch.equal(torch.load(existing, weights_only=True)["w"], torch.full((2,), 7.0))


def test_not_durable_still_atomic(tmp_path, monkeypatch) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "a.pt",
                   options=torchkeep.SaveOptions(durable=False))
    assert calls == []
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "b.pt")
    assert len(calls) == 2  # the file, then its folder


class _WriteOnly:
    """A non-seekable sink, like a pipe or a socket."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data) -> int:
        return self.buffer.write(data)


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy", "safetensors"])
def test_streams_need_no_seek(fmt: str) -> None:
    sink = _WriteOnly()
    torchkeep.save({"w": torch.arange(4.0)}, sink, format=fmt)
    out = torchkeep.load(sink.buffer.getvalue())
    assert torch.equal(out["w"], torch.arange(4.0))


# -- a write that fails under the CRC-32 / checksum running on the other core ---------------

_FAILING_SAVES = """
import os, resource, signal, sys
import torch, torchkeep
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit: EFBIG, not a signal
folder, limit, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
failed = 0
for i in range(4):
    tensor = torch.randn((96 << 20) // 4)  # 96 MiB: checksummed on the worker thread
    try:
        if kind == "file":
            torchkeep.save({"w": tensor}, os.path.join(folder, f"x{i}.pt"))
        else:
            with torchkeep.CheckpointManager(os.path.join(folder, "run")) as mgr:
                mgr.save(i, {"w": tensor})
    except torchkeep.TorchkeepError as e:
        assert isinstance(e, (torchkeep.StorageError, torchkeep.AsyncSaveError)), repr(e)
        failed += 1
    del tensor  # freed at once: a checksum still reading it would crash the process
print("failed", failed)
"""


def _run_failing_saves(folder: str, limit: int, kind: str, *, wrap: list[str] = ()) -> str:
    import subprocess
    import sys

    from conftest import quiet_env

    done = subprocess.run([*wrap, sys.executable, "-c", _FAILING_SAVES, folder, str(limit),
                           kind], capture_output=True, text=True, timeout=300,
                          env=quiet_env(), check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-800:]}"
    return done.stdout


@pytest.mark.parametrize("kind", ["file", "manager"])
def test_a_write_failing_at_the_file_size_limit_never_crashes(tmp_path, kind: str) -> None:
    # the CRC-32 of the record being written ran on after the write failed; the caller
    # freed the tensor and the process died of SIGSEGV (every run here, before the fix)
    for run in range(4):
        folder = tmp_path / str(run)
        folder.mkdir()
        assert "failed 4" in _run_failing_saves(str(folder), 8 << 20, kind)
        if kind == "file":
            assert tmp_debris(folder) == [] and not list(folder.glob("*.pt"))


@pytest.mark.parametrize("kind", ["file", "manager"])
def test_a_write_failing_on_a_full_filesystem_never_crashes(tmp_path, kind: str) -> None:
    import shutil
    import subprocess

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-Urm", "true"], capture_output=True,
                                         check=False).returncode != 0:
        pytest.skip("needs unshare -Urm (a mount namespace) to mount a small tmpfs")
    folder = tmp_path / "small"
    folder.mkdir()
    script = ("mount -t tmpfs -o size=24m tmpfs \"$0\" && exec \"$@\"")
    for _ in range(3):
        out = _run_failing_saves(str(folder), 0, kind,
                                 wrap=[unshare, "-Urm", "sh", "-c", script, str(folder)])
        assert "failed 4" in out
