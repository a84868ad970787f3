"""What ``torchkeep check-resume`` asks of every CheckpointManager, through the environment.

The tool runs a user's unchanged training script several times. In each run it sets:

``TORCHKEEP_CHECK_RESUME_DIR``
    a folder the tool owns: every manager of the run keeps its steps in a folder under it
    (named after the directory the script asked for) instead of where the script said;
``TORCHKEEP_CHECK_RESUME_REPORT``
    a file the manager appends one JSON line to for each event (opened, saving, committed,
    restored, stopping), with what the tool needs to diagnose a divergence;
``TORCHKEEP_CHECK_RESUME_STOP_AFTER``
    a step number: once a step at least this large is committed, ``save`` raises
    ``SystemExit(0)`` so the script ends cleanly (its ``with`` blocks and ``finally``
    clauses run);
``TORCHKEEP_CHECK_RESUME_PAUSE_AFTER`` / ``TORCHKEEP_CHECK_RESUME_PAUSE_IN_SAVE``
    a step number: the manager stops (sleeps) right after the first step at least this
    large commits, or in the middle of saving it (files written, not committed), and
    waits there to be SIGKILLed, so the kill lands exactly where the tool wants.

While these are set the manager keeps every step (retention is not applied), so the tool
can compare each step of two runs. None of it is active unless the variables are set.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENV_DIR", "ENV_PAUSE_AFTER", "ENV_PAUSE_IN_SAVE", "ENV_REPORT", "ENV_STOP_AFTER",
           "CheckHooks", "run_key"]

ENV_DIR = "TORCHKEEP_CHECK_RESUME_DIR"
ENV_REPORT = "TORCHKEEP_CHECK_RESUME_REPORT"
ENV_STOP_AFTER = "TORCHKEEP_CHECK_RESUME_STOP_AFTER"
ENV_PAUSE_AFTER = "TORCHKEEP_CHECK_RESUME_PAUSE_AFTER"
ENV_PAUSE_IN_SAVE = "TORCHKEEP_CHECK_RESUME_PAUSE_IN_SAVE"
#: how long a paused manager waits to be killed before it ends the process itself, so a
#: tool that died cannot leave it behind (seconds)
ENV_PAUSE_LIMIT = "TORCHKEEP_CHECK_RESUME_PAUSE_LIMIT"
PAUSED_EXIT_CODE = 75


def run_key(directory: str) -> str:
    """The folder name a manager's directory gets under the tool's folder: readable (the
    last part of the path) and unique (a hash of the whole), the same in every run."""
    text = str(directory).rstrip("/\\")
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(text) or "run")[:40]
    return f"{tail}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be a step number, got {value!r}") from None


@dataclass
class CheckHooks:
    """One manager's side of a check-resume run (built from the environment)."""

    root: str
    key: str
    report_path: str | None
    stop_after: int | None
    pause_after: int | None
    pause_in_save: int | None
    pause_limit: float
    rank: int = 0
    _pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    _scanned: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls, directory: str | os.PathLike[str]) -> CheckHooks | None:
        """The hooks the environment asks for, or None outside a check-resume run."""
        root = os.environ.get(ENV_DIR)
        if not root:
            return None
        return cls(
            root=root, key=run_key(os.fspath(directory)),
            report_path=os.environ.get(ENV_REPORT) or None,
            stop_after=_int_env(ENV_STOP_AFTER), pause_after=_int_env(ENV_PAUSE_AFTER),
            pause_in_save=_int_env(ENV_PAUSE_IN_SAVE),
            pause_limit=float(os.environ.get(ENV_PAUSE_LIMIT) or 600),
            rank=int(os.environ.get("RANK", "0") or 0),
        )

    @property
    def directory(self) -> str:
        """Where this manager keeps its steps during the check."""
        return os.path.join(self.root, self.key)

    # -- events -----------------------------------------------------------------------------

    def report(self, event: str, **fields: Any) -> None:
        """Append one JSON line (one write: lines of several ranks never interleave)."""
        if self.report_path is None:
            return
        line = json.dumps({"event": event, "key": self.key, "pid": os.getpid(),
                           "rank": self.rank, "time": time.time(), **fields},
                          default=str) + "\n"
        fd = os.open(self.report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def opened(self, world_size: int) -> None:
        """The manager opened its (redirected) directory."""
        self.report("opened", world_size=world_size)

    def saving(self, step: int, state: dict[str, Any], async_save: bool) -> None:
        """``save`` was called: record what the process looks like at this moment (the
        random generators, what ``state`` holds, the data loaders alive)."""
        facts: dict[str, Any] = {"async": async_save, "rng": rng_digests(),
                                 "state": {name: kind_of(value) for name, value in state.items()}}
        if not self._scanned:  # once per process: gc.get_objects() is not free
            self._scanned = True
            facts.update(scan_process(state))
        with self._lock:
            self._pending[step] = facts

    def before_commit(self, step: int) -> None:
        """The step's files are written and it is not committed yet."""
        if self.pause_in_save is not None and step >= self.pause_in_save:
            self.report("paused", step=step, committed=False)
            self._pause()

    def committed(self, step: int) -> None:
        """The step is committed."""
        with self._lock:
            facts = self._pending.pop(step, {})
        self.report("committed", step=step, **facts)
        if self.pause_after is not None and step >= self.pause_after:
            self.report("paused", step=step, committed=True)
            self._pause()

    def restored(self, step: int) -> None:
        """``restore`` loaded ``step``."""
        self.report("restored", step=step)

    def after_save(self, step: int, wait: Any) -> None:
        """At the end of ``save``: end the process once the step limit is reached."""
        if self.stop_after is not None and step >= self.stop_after:
            wait()  # an async save commits before the process ends
            self.report("stopping", step=step)
            raise SystemExit(0)

    def _pause(self) -> None:
        deadline = time.monotonic() + self.pause_limit
        while time.monotonic() < deadline:
            time.sleep(0.05)
        self.report("pause-expired")
        os._exit(PAUSED_EXIT_CODE)


def rng_digests() -> dict[str, str]:
    """Short digests of every global random generator (the ones RNGState captures), to
    tell whether two runs' streams agree at a step, whatever the script saved."""
    from torchkeep.manager.rng import RNGState

    return {name: hashlib.sha256(_state_bytes(value)).hexdigest()[:16]
            for name, value in RNGState().state_dict().items()}


def _state_bytes(value: Any) -> bytes:
    """The bytes of a generator state as RNGState returns it (tensors, arrays, tuples)."""
    if isinstance(value, (list, tuple)):
        return b"".join(_state_bytes(v) + b"|" for v in value)
    tobytes = getattr(value, "tobytes", None)  # numpy keys
    if callable(tobytes):
        return bytes(tobytes())
    if callable(getattr(value, "numpy", None)):  # torch byte tensors
        return bytes(value.numpy().tobytes())
    return repr(value).encode()


def kind_of(value: Any) -> dict[str, Any]:
    """What a state entry is, in the terms the diagnosis uses."""
    cls = type(value)
    name = f"{cls.__module__}.{cls.__qualname__}"
    mro = {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}
    kind = "value"
    if "torchkeep.manager.rng.RNGState" in mro:
        kind = "rng"
    elif "torch.nn.modules.module.Module" in mro:
        kind = "module"
    elif "torch.optim.optimizer.Optimizer" in mro:
        kind = "optimizer"
    elif any(m.startswith("torch.optim.lr_scheduler.") for m in mro):
        kind = "scheduler"
    elif "torch.utils.data.sampler.Sampler" in mro:
        kind = "sampler"
    elif any("DataLoader" in m for m in mro):
        kind = "loader"
    elif "GradScaler" in cls.__qualname__:
        kind = "scaler"
    elif callable(getattr(value, "state_dict", None)):
        kind = "stateful"
    return {"kind": kind, "class": name}


def scan_process(state: dict[str, Any]) -> dict[str, Any]:
    """The data loaders, schedulers and optimizers alive in the process, and whether the
    state holds them (a scheduler outside the state restarts its schedule on resume)."""
    data = sys.modules.get("torch.utils.data")
    optim = sys.modules.get("torch.optim")
    if data is None and optim is None:
        return {}
    in_state = {id(v) for v in state.values()}
    loaders: list[dict[str, Any]] = []
    outside: list[dict[str, Any]] = []
    loader_type = getattr(data, "DataLoader", None)
    scheduler_type = getattr(getattr(optim, "lr_scheduler", None), "LRScheduler", None)
    optimizer_type = getattr(optim, "Optimizer", None)
    watched = tuple(t for t in (scheduler_type, optimizer_type) if t is not None)
    for obj in gc.get_objects():
        cls = type(obj)  # not isinstance: it reads __class__, which some proxies warn on
        if loader_type is not None and issubclass(cls, loader_type):
            loaders.append(_loader_facts(obj, in_state))
        elif watched and issubclass(cls, watched) and id(obj) not in in_state:
            outside.append(kind_of(obj))
    return {"loaders": loaders, "outside_state": outside}


def _loader_facts(loader: Any, in_state: set[int]) -> dict[str, Any]:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    samplers = [s for s in (sampler, batch_sampler, inner) if s is not None]
    resumable = [s for s in samplers if callable(getattr(s, "state_dict", None))
                 and callable(getattr(s, "load_state_dict", None))]
    consumed = getattr(sampler, "_consumed", "n/a")
    return {
        "class": f"{type(loader).__module__}.{type(loader).__qualname__}",
        "num_workers": int(getattr(loader, "num_workers", 0) or 0),
        "sampler": type(sampler).__qualname__ if sampler is not None else None,
        "shuffles": type(sampler).__qualname__ in ("RandomSampler", "SubsetRandomSampler",
                                                   "WeightedRandomSampler")
        or bool(getattr(sampler, "shuffle", False)),
        "sampler_in_state": any(id(s) in in_state for s in resumable),
        "loader_in_state": id(loader) in in_state,
        "loader_resumable": callable(getattr(loader, "state_dict", None)),
        "own_generator": getattr(loader, "generator", None) is not None,
        "consumed_recorded": None if consumed == "n/a" else consumed is not None,
    }
