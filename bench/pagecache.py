"""The same page-cache state before every timed operation (bench/run.py and worker.py)."""

from __future__ import annotations

import os
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def read_through(path: Path | str) -> None:
    """Read ``path`` once, so its pages are in the cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def settle(warm: Path | None) -> None:
    """Dirty data written back, clean cache dropped when allowed (root), and the
    operation's input file (``warm``) read back in.

    Without dropping, a write's speed on this kind of VM swung 0.5-2.8 s per GiB with how
    much old cache the kernel had to reclaim first.
    """
    os.sync()
    if os.access(DROP_CACHES, os.W_OK):
        DROP_CACHES.write_text("1")
    if warm is not None:
        read_through(warm)
