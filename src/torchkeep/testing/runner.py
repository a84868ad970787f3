"""Run a training command under the manager's check-resume hooks; kill it where asked.

Every run gets a process group of its own (``start_new_session``). A kill SIGKILLs that
group and the group of every process that reported to the tool (``torchrun`` starts its
ranks in sessions of their own), so neither a killed run, a timed-out one, nor the tool
being interrupted leaves a process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchkeep.errors import ScriptFailedError
from torchkeep.manager import check_hooks as hooks

__all__ = ["Run", "run_command"]

#: how long to wait for the other ranks to pause once one has (they commit together)
RANK_GRACE_S = 10.0
POLL_S = 0.02
TAIL_LINES = 30


@dataclass
class Run:
    """One process (or ``torchrun`` job) of the check and what it reported."""

    label: str
    #: the folder the run's managers keep their steps in
    root: str
    #: where the run's events and output go (``STEM.events.jsonl``, ``STEM.output.txt``)
    stem: str
    returncode: int | None = None
    killed: bool = False
    seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    output_path: str = ""

    def _rank0(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event and e.get("rank", 0) == 0]

    def committed(self) -> list[int]:
        """The steps this run committed (rank 0's reports), in order."""
        return [e["step"] for e in self._rank0("committed")]

    def restored(self) -> int | None:
        """The step the run restored (rank 0's), or None when it restored nothing."""
        steps = [e["step"] for e in self._rank0("restored")]
        return steps[0] if steps else None

    def facts(self, step: int) -> dict[str, Any]:
        """What the manager recorded when it saved ``step`` (rank 0's)."""
        for e in self._rank0("committed"):
            if e["step"] == step:
                return e
        return {}

    def first_facts(self) -> dict[str, Any]:
        """The process scan of the first save (loaders, schedulers outside the state)."""
        for e in self._rank0("committed"):
            if "loaders" in e:
                return e
        return {}

    def output_tail(self) -> str:
        """The last lines of the run's stdout and stderr."""
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-TAIL_LINES:])


def run_command(command: list[str], run: Run, *, env: dict[str, str], timeout: float,
                pause_after: int | None = None, pause_in_save: int | None = None,
                stop_after: int | None = None, cwd: str | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> Run:
    """Run ``command`` to its end (or until it pauses where asked and is SIGKILLed)."""
    report = run.stem + ".events.jsonl"
    run.output_path = run.stem + ".output.txt"
    environment = dict(env)
    environment.update({hooks.ENV_DIR: run.root, hooks.ENV_REPORT: report,
                        hooks.ENV_PAUSE_LIMIT: str(int(timeout) + 60)})
    for name, value in ((hooks.ENV_STOP_AFTER, stop_after),
                        (hooks.ENV_PAUSE_AFTER, pause_after),
                        (hooks.ENV_PAUSE_IN_SAVE, pause_in_save)):
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = str(value)
    os.makedirs(run.root, exist_ok=True)
    started = time.monotonic()
    with open(run.output_path, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=environment, cwd=cwd,
                                   start_new_session=True)
    reader = _EventReader(report)
    paused_since: float | None = None
    try:
        while True:
            for event in reader.read():
                run.events.append(event)
                if on_event is not None:
                    on_event(event)
            world = max((e.get("world_size", 1) for e in run.events
                         if e["event"] == "opened"), default=1)
            paused = {e["rank"] for e in run.events if e["event"] == "paused"}
            if paused and paused_since is None:
                paused_since = time.monotonic()
            if paused and (len(paused) >= world
                           or time.monotonic() - (paused_since or 0) > RANK_GRACE_S):
                _kill(process, run.events)
                run.killed = True
                break
            if process.poll() is not None:
                break
            if time.monotonic() - started > timeout:
                _kill(process, run.events)
                raise ScriptFailedError(
                    f"{run.label} did not finish within {timeout:.0f} s (killed)",
                    output=run.output_tail())
            time.sleep(POLL_S)
    except BaseException:
        _kill(process, run.events)  # Ctrl-C or an error in the tool: leave nothing behind
        raise
    process.wait()
    run.events.extend(reader.read())
    run.returncode = process.returncode
    run.seconds = time.monotonic() - started
    # the run's own children (loader workers) end with it; only process groups here: a
    # group id is not reused while a member lives, a bare pid of an ended process may be
    _kill(process, run.events, pids=False)
    return run


class _EventReader:
    """Reads the JSON lines the managers append to the report file, as they come."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _kill(process: subprocess.Popen[bytes], events: list[dict[str, Any]], *,
          pids: bool = True) -> None:
    """SIGKILL the run's process group and the group of every process that reported
    (and, while they live, those processes themselves)."""
    groups = {process.pid} | {int(e["pid"]) for e in events if "pid" in e}
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in (groups - {process.pid}) if pids else ():
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
