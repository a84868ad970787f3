"""Where run directories live: the local file system, or any fsspec URL (``memory://``...)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from torchkeep.errors import CheckpointNotFoundError, StorageError
from torchkeep.storage.atomic import Write, fsync_dir, writer_for_fd
from torchkeep.storage.oserrors import translated
from torchkeep.storage.remote import (
    is_url,
    open_remote,
    protocol_of,
    remote_errors,
    retried,
    url_filesystem,
    write_remote,
)
from torchkeep.storage.source import Source, open_source

__all__ = ["FileSystem", "FsspecFileSystem", "LocalFileSystem", "open_filesystem"]


class FileSystem:
    """The operations a run directory needs. Paths are strings in the backend's syntax."""

    #: True when ``rename`` of a directory is atomic and ``fsync`` makes data durable.
    atomic_rename = False

    def join(self, *parts: str) -> str:
        """Join path parts."""
        raise NotImplementedError

    def parent(self, path: str) -> str:
        """The folder holding ``path``."""
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) inside folder ``path``; empty when it does not exist."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        """True when ``path`` exists."""
        raise NotImplementedError

    def isdir(self, path: str) -> bool:
        """True when ``path`` is a folder."""
        raise NotImplementedError

    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents."""
        raise NotImplementedError

    def write_file(self, path: str, produce: Callable[[Write], None], *, fsync: bool) -> None:
        """Create ``path`` with what ``produce(write)`` writes; fsync it when asked."""
        raise NotImplementedError

    def read_bytes(self, path: str) -> bytes:
        """The whole content of ``path``."""
        raise NotImplementedError

    def source(self, path: str) -> Source:
        """``path`` opened for random-access reading."""
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` (a file or folder) to ``dst``, which must not exist."""
        raise NotImplementedError

    def rmtree(self, path: str) -> None:
        """Remove folder ``path`` and everything in it."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """Remove file ``path``."""
        raise NotImplementedError

    def fsync_dir(self, path: str) -> None:
        """Make renames and removals inside folder ``path`` durable."""

    def size(self, path: str) -> int:
        """Bytes in file ``path``."""
        raise NotImplementedError

    def describe(self, path: str) -> str:
        """``path`` as a user would write it (for messages)."""
        return path


class LocalFileSystem(FileSystem):
    """The local file system, with fsync and atomic renames."""

    atomic_rename = True

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def parent(self, path: str) -> str:
        return os.path.dirname(os.path.normpath(path))

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"listing failed: {e.strerror}", source=path) from e

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def makedirs(self, path: str) -> None:
        with translated(path, "creating the folder", missing_is_not_found=True):
            os.makedirs(path, exist_ok=True)

    def write_file(self, path: str, produce: Callable[[Write], None], *, fsync: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        with translated(path, "writing", missing_is_not_found=True):
            fd = os.open(path, flags, 0o666)
            try:
                produce(writer_for_fd(fd))
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def read_bytes(self, path: str) -> bytes:
        with translated(path, "reading", missing_is_not_found=True), open(path, "rb") as f:
            return f.read()

    def source(self, path: str) -> Source:
        return open_source(path)

    def rename(self, src: str, dst: str) -> None:
        with translated(src, "renaming", missing_is_not_found=True):
            if os.path.exists(dst):
                raise FileExistsError(17, "destination exists", dst)
            os.rename(src, dst)

    def rmtree(self, path: str) -> None:
        with translated(path, "removing", missing_is_not_found=True):
            shutil.rmtree(path)

    def remove(self, path: str) -> None:
        with translated(path, "removing", missing_is_not_found=True):
            os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        with translated(path, "syncing the folder", missing_is_not_found=True):
            fsync_dir(path)

    def size(self, path: str) -> int:
        with translated(path, "stat", missing_is_not_found=True):
            return os.path.getsize(path)


class FsspecFileSystem(FileSystem):
    """Any fsspec file system. Object stores have no atomic rename: run directories on
    them commit by writing the marker last (manager/rundir.py). Failures are
    translated into torchkeep errors naming the URL; reads are ranged requests."""

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))

    def parent(self, path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""

    def listdir(self, path: str) -> list[str]:
        try:
            with remote_errors(self.describe(path), "listing"):
                entries = self.fs.ls(path, detail=False, refresh=True)
        except CheckpointNotFoundError:
            return []
        base = path.rstrip("/")
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries
                 if str(e).rstrip("/") != base)
        return sorted(set(names))

    def exists(self, path: str) -> bool:
        with remote_errors(self.describe(path), "looking up"):
            return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        with remote_errors(self.describe(path), "looking up"):
            return bool(self.fs.isdir(path))

    def makedirs(self, path: str) -> None:
        with remote_errors(self.describe(path), "creating the folder"):
            self.fs.makedirs(path, exist_ok=True)

    def write_file(self, path: str, produce: Callable[[Write], None], *, fsync: bool) -> None:
        write_remote(self.describe(path), produce, fs=self.fs, path=path)

    def read_bytes(self, path: str) -> bytes:
        return retried(lambda: bytes(self.fs.cat_file(path)), self.describe(path), "reading")

    def source(self, path: str) -> Source:
        return open_remote(self.describe(path), fs=self.fs, path=path)

    def rename(self, src: str, dst: str) -> None:
        with remote_errors(self.describe(src), "renaming"):
            if self.fs.exists(dst):
                raise FileExistsError(17, "destination exists", dst)
            self.fs.mv(src, dst, recursive=True)

    def remove(self, path: str) -> None:
        """Remove file ``path``."""
        with remote_errors(self.describe(path), "removing"):
            self.fs.rm_file(path)

    def rmtree(self, path: str) -> None:
        with remote_errors(self.describe(path), "removing"):
            self.fs.rm(path, recursive=True)

    def size(self, path: str) -> int:
        with remote_errors(self.describe(path), "stat"):
            return int(self.fs.size(path))

    def describe(self, path: str) -> str:
        return f"{self.protocol}://{path.lstrip('/')}" if "://" not in path else path


def open_filesystem(directory: str | os.PathLike[str], *,
                    storage_options: dict[str, Any] | None = None) -> tuple[FileSystem, str]:
    """The file system and path of ``directory`` (a local path or an fsspec URL;
    ``storage_options`` go to fsspec)."""
    text = os.fspath(directory)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if is_url(text):
        fs, path = url_filesystem(text, storage_options)
        return FsspecFileSystem(fs, protocol_of(text)), path
    return LocalFileSystem(), os.path.abspath(text.removeprefix("file://"))
