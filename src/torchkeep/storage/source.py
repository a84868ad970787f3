"""Random-access input: the bytes of a checkpoint from a path, a file object or a buffer."""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable
from typing import IO, Any

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
    TorchkeepError,
)
from torchkeep.storage.fixedmap import map_over

__all__ = ["Source", "open_source"]


_SMALL_READ = 4096
_READ_AHEAD = 256 << 10
_MIN_READ_AHEAD = 4096


class Source:
    """The bytes of one input, read by absolute offset, bounded by the real size.

    Reads past the end raise CorruptCheckpointError ("truncated"), so no parser can
    allocate more than the input holds. ``path`` is set when the input is a local file
    (memory mapping needs one).
    """

    def __init__(
        self,
        *,
        name: str,
        size: int,
        path: str | None = None,
        fd: int | None = None,
        stream: IO[bytes] | None = None,
        buffer: memoryview | None = None,
        base: int = 0,
    ) -> None:
        self.name = name
        self.size = size
        self.path = path
        self._fd = fd
        self._stream = stream
        self._buffer = buffer
        self._base = base
        self._map: mmap.mmap | None = None
        self._window = b""  # read-ahead for small reads: bytes at _window_at
        self._window_at = 0
        self._window_reads = 0  # small reads the current window has served
        self._ahead = _READ_AHEAD  # the next window's size, adapted to how reads land

    # -- reading --------------------------------------------------------------------------

    def _check(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise CorruptCheckpointError(
                f"truncated: needs bytes {offset}..{offset + n}, the input has {self.size}",
                source=self.name,
            )

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``."""
        self._check(offset, n)
        if self._buffer is not None:
            return bytes(self._buffer[offset : offset + n])
        if n <= _SMALL_READ and self._fd is not None:
            start = offset - self._window_at
            if start < 0 or start + n > len(self._window):
                # a zip's local headers are read one by one, in file order: one pread of
                # the next 256 KiB serves the ones that follow (5 us a pread otherwise).
                # Where records are large, each window serves one header (two reads) and
                # the rest is wasted copying (50 us a record measured, for 441 records of
                # 1 MiB): the window shrinks to 4 KiB, and grows back when reads cluster.
                if self._window and self._window_reads <= 2:
                    self._ahead = max(_MIN_READ_AHEAD, self._ahead // 4)
                elif self._window_reads > 8:
                    self._ahead = min(_READ_AHEAD, self._ahead * 4)
                ahead = bytearray(max(n, min(self._ahead, self.size - offset)))
                self.readinto(offset, memoryview(ahead))
                self._window, self._window_at, start = bytes(ahead), offset, 0
                self._window_reads = 0
            self._window_reads += 1
            return self._window[start : start + n]
        buf = bytearray(n)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``offset`` (one copy, no intermediate buffer)."""
        n = out.nbytes
        self._check(offset, n)
        if self._buffer is not None:
            out.cast("B")[:] = self._buffer[offset : offset + n]
            return
        out = out.cast("B")
        done = 0
        try:
            if self._fd is not None:
                while done < n:
                    got = os.preadv(self._fd, [out[done:]], self._base + offset + done)
                    if got <= 0:
                        break
                    done += got
            else:
                assert self._stream is not None
                self._stream.seek(self._base + offset)
                while done < n:
                    got = self._stream.readinto(out[done:])  # type: ignore[attr-defined]
                    if not got:
                        break
                    done += got
        except OSError as e:
            raise StorageError(f"read failed at offset {offset}: {e}", source=self.name) from e
        if done != n:
            raise CorruptCheckpointError(
                f"truncated: the input ended {n - done} bytes early at offset {offset + done}",
                source=self.name,
            )

    @property
    def parallel_reads(self) -> bool:
        """True when several threads may ``readinto`` at once (a file descriptor: pread)."""
        return self._fd is not None

    @property
    def remote(self) -> bool:
        """True when reads are network requests (storage/remote.py): callers batch them."""
        return False

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """A hint that small reads of these (offset, n) follow; remote sources fetch them
        at once. Local reads are cheap enough one by one."""

    def expect(self, data_offset: int, header_offset: int,
               check: Callable[[bytes], None]) -> None:
        """Remote sources: when bytes at ``data_offset`` are first read, fetch the bytes
        from ``header_offset`` with them and pass those to ``check`` (which raises when
        they are wrong) before the data is used. Local sources are never asked."""
        raise NotImplementedError("only remote sources check headers on first read")

    def readinto_many(self, jobs: list[tuple[int, memoryview]]) -> None:
        """``readinto`` for each (offset, buffer)."""
        for offset, out in jobs:
            self.readinto(offset, out)

    def memory(self) -> memoryview | None:
        """The whole input as a read-only buffer when it is already in memory."""
        return self._buffer

    def read_only_map(self) -> mmap.mmap | None:
        """A read-only map of the whole input when it is a non-empty local file, else None.

        Unlike ``mapping`` it supports ``find``, which the pickle readers use. Only for
        short-lived reads where a crash is acceptable (``scan``): touching a page of a
        file truncated in place under the map raises SIGBUS.
        """
        if self._fd is None or self.size == 0 or self._base:
            return None
        return mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)

    def mapping(self) -> memoryview:
        """A private (copy-on-write) memory map of the whole input.

        Writes through it never reach the file. Only for local files.
        """
        if self._buffer is not None:
            return self._buffer
        if self._fd is None or self.size == 0:
            raise StorageError("memory mapping needs a non-empty local file", source=self.name)
        if self._map is None:
            try:
                self._map = mmap.mmap(self._fd, self._base + self.size, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise StorageError(f"cannot memory-map: {e}", source=self.name) from e
        return memoryview(self._map)[self._base : self._base + self.size]

    def private_map(self, offset: int, n: int) -> memoryview | None:
        """A private (copy-on-write) map of ``n`` bytes at ``offset`` of its own, writable
        without touching the file or any other map; None when the input is not a local
        file (or ``n`` is 0)."""
        self._check(offset, n)
        if self._fd is None or not n:
            return None
        at = self._base + offset
        start = at - at % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, at + n - start, access=mmap.ACCESS_COPY,
                               offset=start)
        except (OSError, ValueError) as e:
            raise StorageError(f"cannot memory-map: {e}", source=self.name) from e
        return memoryview(mapped)[at - start : at - start + n]

    def map_into(self, offset: int, out: memoryview) -> None:
        """Like ``readinto``, into a writable slice of a ``private_map``: the whole pages
        are mapped from this file in place (copy-on-write, nothing read until touched)
        where ``out`` and ``offset`` lie at the same place in a page, the rest is read.

        Raises StorageError when mapping fails; ``out``'s map may then have a hole and
        must not be touched again (storage/fixedmap.py)."""
        n = out.nbytes
        self._check(offset, n)
        head = body = 0
        if self._fd is not None:
            try:
                head, body = map_over(out, self._fd, self._base + offset)
            except OSError as e:
                raise StorageError(f"cannot memory-map: {e}", source=self.name) from e
        if not body:
            self.readinto(offset, out)
            return
        if head:
            self.readinto(offset, out[:head])
        if head + body < n:
            self.readinto(offset + head + body, out[head + body :])

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file descriptor; existing memory maps stay valid."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open_source(f: Any, *, storage_options: dict[str, Any] | None = None) -> Source:
    """Open ``f`` (path, fsspec URL, binary file object, bytes-like) as a Source.

    A file object is read from its current position; a non-seekable stream is read into
    memory first. A URL is read by ranged requests (``storage_options`` go to fsspec).
    """
    if isinstance(f, Source):
        return f
    from torchkeep.storage.remote import is_url

    if is_url(f):
        from torchkeep.storage.remote import open_remote

        return open_remote(os.fspath(f), storage_options=storage_options)
    if isinstance(f, str) and f.startswith("file://"):
        f = f.removeprefix("file://")
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError("no such file", source=path) from e
        except IsADirectoryError as e:
            raise CheckpointNotFoundError("is a directory", source=path) from e
        except OSError as e:
            raise StorageError(f"cannot open: {e.strerror}", source=path) from e
        try:
            st = os.fstat(fd)
            import stat

            if stat.S_ISDIR(st.st_mode):
                raise CheckpointNotFoundError("is a directory", source=path)
        except BaseException:
            os.close(fd)
            raise
        return Source(name=path, size=st.st_size, path=path, fd=fd)
    if isinstance(f, (bytes, bytearray, memoryview)):
        view = memoryview(f).cast("B")
        return Source(name="<bytes>", size=view.nbytes, buffer=view.toreadonly())
    if isinstance(f, io.BytesIO):
        pos = f.tell()
        view = f.getbuffer()[pos:].toreadonly()
        return Source(name="<BytesIO>", size=view.nbytes, buffer=view)
    if hasattr(f, "read"):
        name = str(getattr(f, "name", f"<{type(f).__name__}>"))
        try:
            seekable = f.seekable() if hasattr(f, "seekable") else False
        except (OSError, ValueError):
            seekable = False
        if not seekable:
            data = f.read()
            if not isinstance(data, (bytes, bytearray)):
                raise TorchkeepError("file object must be opened in binary mode", source=name)
            view = memoryview(data).toreadonly()
            return Source(name=name, size=view.nbytes, buffer=view)
        try:
            base = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(base)
        except OSError as e:
            raise StorageError(f"cannot seek: {e}", source=name) from e
        return Source(name=name, size=end - base, stream=f, base=base)
    raise TypeError(f"expected a path, a binary file object or bytes, got {type(f).__name__}")
