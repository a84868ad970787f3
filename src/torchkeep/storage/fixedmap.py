"""Pages of a file mapped over part of a private memory map, in place (``MAP_FIXED``).

An incremental step's tensor lies mostly in one file, with its changed chunks in others.
Restoring it maps the first file's range copy-on-write and then needs the changed chunks
over it. Copying them in costs a copy-on-write fault, a page copy and the read's copy per
page; mapping their pages over the range costs one ``mmap`` call per run of neighbouring
chunks and nothing until a page is touched, as for the unchanged bytes. Measured on the
1 GiB embedding table of bench/incremental.py (164 MiB of changed chunks in three other
files, 28 runs of neighbouring chunks, warm page cache): copying them took 0.12-0.14 s,
more than a whole full step's restore (0.09 s); mapping them takes 0.3 ms. Python's mmap
module cannot map at a chosen address, so this calls the C library's ``mmap`` through
ctypes, only ever inside a map this process made copy-on-write.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any

__all__ = ["PAGE", "map_over"]

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same value on Linux and macOS


def _libc_mmap() -> Any:
    if sys.platform not in ("linux", "darwin") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, ctypes.c_int64]
    return fn


_mmap = _libc_mmap()


def _address(view: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def map_over(target: memoryview, fd: int, file_offset: int) -> tuple[int, int]:
    """Map the pages of file ``fd`` from ``file_offset`` on over the whole pages of
    ``target``, a writable slice of an ``mmap.mmap`` this process made copy-on-write.

    Returns ``(head, body)``: ``target[head : head + body]`` now shows the file's bytes at
    ``file_offset + head`` (copy-on-write: writes never reach the file); the caller fills
    the rest. ``(0, 0)`` when nothing was mapped: the platform has no such call, the
    target is not such a map, or the address and the file offset do not lie at the same
    place in a page. Raises OSError when the call fails; the target's map may then have a
    hole, so nothing may touch it again.
    """
    owner = target.obj
    n = target.nbytes
    if _mmap is None or n < PAGE or target.readonly or not isinstance(owner, mmap.mmap):
        return 0, 0
    start = _address(target)
    base = _address(owner)
    if start < base or start + n > base + len(owner):  # a slice of owner: cannot happen
        return 0, 0
    head = -start % PAGE
    if (file_offset + head) % PAGE:
        return 0, 0
    body = (n - head) // PAGE * PAGE
    if body <= 0:
        return 0, 0
    got = _mmap(start + head, body, mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | _MAP_FIXED, fd, file_offset + head)
    if got != start + head:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap over a private map failed (errno {errno})")
    return head, body
