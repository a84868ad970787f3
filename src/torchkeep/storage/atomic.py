"""Crash-safe file replacement: write a temporary file, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import Any

from torchkeep.storage.background import close_later
from torchkeep.storage.oserrors import translated

__all__ = ["TMP_MARKER", "fsync_dir", "write_atomically", "writer_for_fd"]

#: Every temporary name torchkeep creates contains this, so leftovers are recognisable.
TMP_MARKER = ".torchkeep-tmp-"

Write = Callable[[Any], None]


def writer_for_fd(fd: int) -> Write:
    """A ``write(buffer)`` that writes all of ``buffer`` to ``fd`` (looping on short writes)."""

    def write(data: Any) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = os.write(fd, view)
            view = view[written:]

    return write


def fsync_dir(path: str) -> None:
    """Make a rename or unlink inside folder ``path`` durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path or ".", flags)
    except OSError:  # some platforms cannot open folders; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (22, 95):  # EINVAL / EOPNOTSUPP: the file system does not sync dirs
            raise
    finally:
        os.close(fd)


def _resolve(path: str) -> str:
    # Replace what a symlink points at, as torch.save (which writes through it) does.
    return os.path.realpath(path) if os.path.islink(path) else path


def write_atomically(path: str | os.PathLike[str], produce: Callable[[Write], None], *,
                     fsync: bool = True) -> None:
    """Create or replace ``path`` with what ``produce(write)`` writes, all or nothing.

    The bytes go to a temporary file in the same folder; it is fsynced, renamed over
    ``path`` and the folder is fsynced. Any failure (including KeyboardInterrupt)
    removes the temporary file and leaves an existing ``path`` untouched. The new file
    keeps the permission bits of the one it replaces (else 0666 minus the umask).
    With ``fsync=False`` the rename is still atomic but not durable across power loss.
    """
    target = _resolve(os.fspath(path))
    folder, base = os.path.split(target)
    tmp = os.path.join(folder, f".{base}{TMP_MARKER}{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    with translated(target, "creating a temporary file"):
        fd = os.open(tmp, flags, 0o666)
    try:
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            mode = None
        with translated(target, "writing"):
            if mode is not None:
                os.fchmod(fd, mode)
            produce(writer_for_fd(fd))
            if fsync:
                os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    old = _hold(target)  # keeps the replaced file alive past the rename: freed later
    try:
        with translated(target, "closing"):
            os.close(fd)
        with translated(target, "renaming into place"):
            os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.close(old)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if old is not None:
        close_later(old)
    if fsync:
        with translated(target, "syncing the folder"):
            fsync_dir(folder)


def _hold(path: str) -> int | None:
    """A descriptor on the file at ``path`` (if any), so that replacing it does not free its
    pages inside the rename; closing it later does."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
