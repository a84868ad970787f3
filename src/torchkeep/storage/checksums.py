"""CRC-32 on the second core: checksums computed while the bytes are being written.

``zlib.crc32`` releases the GIL for buffers over a few KiB, so a single worker thread
checksums one record while the main thread writes it (measured on a 2-core machine:
CRC-32 costs 0.16-0.22 s/GiB, as much as the write itself; overlapped, it disappears).
Small buffers are checksummed inline, where a thread hand-off costs more than the CRC.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from torchkeep.storage.workers import worker

__all__ = ["INLINE_BYTES", "crc32_async", "digest_async"]

#: Below this size the CRC is computed in the calling thread.
INLINE_BYTES = 1 << 20

class _Done:
    """A finished "future" for checksums computed inline."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def digest_async(function: Callable[[Any], Any], data: Any) -> Future[Any] | _Done:
    """Start ``function(data)`` (a checksum that releases the GIL) on the worker thread;
    ``.result()`` waits for it. ``data`` must not change until then."""
    view = memoryview(data)
    if view.nbytes < INLINE_BYTES:
        return _Done(function(view))
    return worker("checksum").submit(function, view)


def crc32_async(data: Any) -> Future[int] | _Done:
    """Start the CRC-32 of ``data``; ``.result()`` waits for it."""
    return digest_async(zlib.crc32, data)
