"""Named single-thread workers, created on first use and shared by the whole process."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["worker"]

_workers: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def worker(name: str) -> ThreadPoolExecutor:
    """The one-thread executor called ``name`` (threads are named torchkeep-<name>)."""
    with _lock:
        found = _workers.get(name)
        if found is None:
            found = _workers[name] = ThreadPoolExecutor(1, thread_name_prefix=f"torchkeep-{name}")
        return found
