"""Preemption: turn SIGTERM / SIGUSR1 into a request to save at the next step boundary."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["PreemptionGuard"]

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """Records preemption signals instead of dying on them.

    ::

        with torchkeep.PreemptionGuard() as guard:
            for step in range(start, total):
                train_one_step()
                if guard.requested or step % 100 == 0:
                    manager.save(step, state)
                if guard.requested:
                    break          # the save above is committed: exit cleanly

    Schedulers (SLURM, Kubernetes) send SIGTERM (SLURM can send SIGUSR1 earlier with
    ``--signal``) and kill the process some seconds later; checking ``requested`` at each
    step boundary leaves one step plus one save to finish. Previous handlers are
    restored on exit. Must be entered from the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once one of the signals has arrived."""
        return self._event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
