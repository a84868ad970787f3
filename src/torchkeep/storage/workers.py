"""Named single-thread workers, created on first use and shared by the whole process."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["worker"]

_workers: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def worker(name: str, threads: int = 1) -> ThreadPoolExecutor:
    """The executor called ``name`` with ``threads`` threads (named torchkeep-<name>),
    made on first use."""
    with _lock:
        found = _workers.get(name)
        if found is None:
            found = _workers[name] = ThreadPoolExecutor(threads,
                                                        thread_name_prefix=f"torchkeep-{name}")
        return found
