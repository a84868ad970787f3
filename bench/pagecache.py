"""The same page-cache state before every timed operation (bench/run.py and worker.py).

Two conditions: caches dropped (the kernel has free memory to hand out), and a full page
cache (clean pages of other data fill the memory, as on a training machine that streams
a big data set, so every page a write or a copy needs is reclaimed first).
"""

from __future__ import annotations

import os
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def read_through(path: Path | str) -> None:
    """Read ``path`` once, so its pages are in the cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


#: the filler file of the full-cache condition, when set (bench/run.py sets it)
FILLER_ENV = "TORCHKEEP_BENCH_FILLER"


def make_filler(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` of other data to ``path`` (the full-cache condition's filler)."""
    block = os.urandom(1 << 20) * 64
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])


def can_drop() -> bool:
    """True when this process may drop the page cache (root)."""
    return os.access(DROP_CACHES, os.W_OK)


def settle(warm: Path | None) -> None:
    """Dirty data written back; then either the clean cache dropped (when allowed) or,
    in the full-cache condition ($TORCHKEEP_BENCH_FILLER names the filler), the cache
    filled with the filler (what the last operation evicted is read back); then the
    operation's input (``warm``) read back in.

    Without dropping, a write's speed on this kind of VM swung 0.5-2.8 s per GiB with how
    much old cache the kernel had to reclaim first: the full-cache condition makes that
    state the same before every operation instead.
    """
    os.sync()
    filler = os.environ.get(FILLER_ENV)
    if filler:
        read_through(filler)
    elif can_drop():
        DROP_CACHES.write_text("1")
    if warm is not None:
        read_through(warm)
