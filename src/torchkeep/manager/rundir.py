"""A run directory as files: committed steps, their metrics, leftovers, retention deletes.

torch-free, so ``torchkeep ls`` and ``torchkeep prune`` start fast; CheckpointManager
builds on it.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from torchkeep.errors import CheckpointNotFoundError, StorageError, TorchkeepError
from torchkeep.formats.manifest import (
    MARKER_NAME,
    POOL_NAME,
    POOL_PREFIX,
    pool_file_step,
    read_manifest,
)
from torchkeep.manager.layout import deleting_name, is_leftover, parse_step_name, step_name
from torchkeep.manager.retention import (
    Mode,
    Policy,
    RetentionPlan,
    StepInfo,
    best_step,
    plan_retention,
)
from torchkeep.storage.background import run_later
from torchkeep.storage.filesystem import open_filesystem

__all__ = ["RunDirectory", "StepSummary"]


@dataclass(frozen=True, slots=True)
class StepSummary:
    """One committed step as ``torchkeep ls`` shows it."""

    step: int
    path: str
    metrics: dict[str, Any]
    #: bytes of the step's own files (its folder, and the shared data file it wrote)
    nbytes: int
    created: str | None
    tensors: int
    #: bytes of its chunks that lie in data files earlier steps wrote (incremental steps)
    shared_bytes: int = 0


class RunDirectory:
    """The committed steps of one run directory and the operations on them."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True,
                 storage_options: dict[str, Any] | None = None) -> None:
        fs, root = open_filesystem(directory, storage_options=storage_options)
        self.fs = fs
        self.root = root
        self._display = str(os.fspath(directory))
        if create:
            fs.makedirs(root)
        elif not fs.isdir(root):
            raise CheckpointNotFoundError("no such run directory", source=fs.describe(root))
        self._lock = threading.Lock()
        self._metrics: dict[int, dict[str, Any]] = {}
        #: the shared data files each committed step's chunks name (manifests never change)
        self._refs: dict[int, dict[str, int]] = {}

    @property
    def name(self) -> str:
        """The directory as the user gave it."""
        return self._display

    def step_path(self, step: int) -> str:
        """The folder of committed step ``step``."""
        return self.fs.join(self.root, step_name(step))

    def scan(self) -> tuple[list[int], list[str]]:
        """One listing of the directory: the committed steps (oldest first) and the names an
        interrupted save or deletion left behind."""
        steps: list[int] = []
        leftovers: list[str] = []
        for name in self.fs.listdir(self.root):
            step = parse_step_name(name)
            if step is not None:
                if self.fs.exists(self.fs.join(self.root, name, MARKER_NAME)):
                    steps.append(step)
                else:  # a step folder without its marker never finished committing
                    leftovers.append(name)
            elif is_leftover(name):
                leftovers.append(name)
        return sorted(steps), leftovers

    def steps(self) -> list[int]:
        """Every committed step, oldest first (read from the directory now)."""
        return self.scan()[0]

    def leftovers(self) -> list[str]:
        """Names an interrupted save or deletion left behind (not removed)."""
        return self.scan()[1]

    def clean_leftovers(self) -> list[str]:
        """Remove what interrupted saves and deletions left (shared data files no
        committed step names among them); returns the names removed."""
        removed = []
        for name in self.leftovers():
            path = self.fs.join(self.root, name)
            try:
                self.fs.rmtree(path)
                removed.append(name)
            except TorchkeepError as e:
                warnings.warn(f"could not remove leftover {path}: {e}", stacklevel=3)
        removed += [f"{POOL_NAME}/{name}" for name in self.collect_chunks(newer=True)]
        return removed

    # -- the shared data files of incremental steps ---------------------------------------

    @property
    def pool(self) -> str:
        """The folder of the shared data files (``chunks/``)."""
        return self.fs.join(self.root, POOL_NAME)

    def references(self, step: int) -> dict[str, int]:
        """The shared data files (names in ``chunks/``) the chunks of committed ``step``
        lie in, with the bytes it reads from each (raises when its manifest cannot be
        read)."""
        with self._lock:
            found = self._refs.get(step)
        if found is not None:
            return found
        manifest = read_manifest(self.fs, self.step_path(step))
        found = _references(manifest)
        with self._lock:
            self._refs[step] = found
        return found

    def unreferenced_chunks(self, *, newer: bool = False) -> list[str] | None:
        """Shared data files no committed step names, written by a step no newer than the
        newest committed one (a newer one may belong to a save in flight; ``newer``
        includes those: when a manager opens the run nothing is in flight); None when a
        committed step's manifest cannot be read, as nothing is then known unreferenced."""
        names = [n for n in self.fs.listdir(self.pool) if pool_file_step(n) is not None]
        if not names:
            return []
        steps = self.steps()
        if not steps and not newer:
            return []
        referenced: set[str] = set()
        for step in steps:
            try:
                referenced.update(self.references(step))
            except TorchkeepError as e:
                warnings.warn(f"step {step} is unreadable ({e}): no shared data file is "
                              "removed", stacklevel=3)
                return None
        newest = steps[-1] if steps and not newer else None
        return [n for n in names if n not in referenced
                and (newest is None or (pool_file_step(n) or 0) <= newest)]

    def collect_chunks(self, *, newer: bool = False) -> list[str]:
        """Remove the shared data files no committed step names; returns their names.

        Safe at any moment: a file is removed only once the committed steps, listed after
        the deletions that freed it, do not name it; a save names only files its base
        step (the newest, which retention never deletes) names, or the one it writes."""
        doomed = self.unreferenced_chunks(newer=newer) or []
        removed = []
        for name in doomed:
            try:
                self.fs.remove(self.fs.join(self.pool, name))
                removed.append(name)
            except TorchkeepError as e:
                warnings.warn(f"could not remove unreferenced {POOL_NAME}/{name}: {e}",
                              stacklevel=3)
        return removed

    def _collect_quietly(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the next manager to open the run says it
            self.collect_chunks()

    def reclaimable(self, steps: list[int]) -> int:
        """Bytes deleting ``steps`` would free: their folders, and the shared data files
        only they name."""
        doomed = set(steps)
        kept_refs: set[str] = set()
        doomed_refs: set[str] = set()
        for step in self.steps():
            try:
                refs = self.references(step)
            except TorchkeepError:
                refs = {}
            (doomed_refs if step in doomed else kept_refs).update(refs)
        total = sum(self._folder_bytes(self.step_path(s)) for s in doomed)
        for name in doomed_refs - kept_refs:
            try:
                total += self.fs.size(self.fs.join(self.pool, name))
            except TorchkeepError:
                continue
        return total

    def _folder_bytes(self, path: str) -> int:
        return sum(self.fs.size(self.fs.join(path, n)) for n in self.fs.listdir(path))

    def refresh(self) -> dict[int, dict[str, Any]]:
        """Re-list committed steps; metrics are read from each new step's manifest once."""
        with self._lock:
            known = dict(self._metrics)
        found: dict[int, dict[str, Any]] = {}
        for step in self.steps():
            cached = known.get(step)
            if cached is None:
                try:
                    manifest = read_manifest(self.fs, self.step_path(step), verify=False)
                    cached = dict(manifest.get("metrics") or {})
                except TorchkeepError as e:
                    warnings.warn(f"step {step} is unreadable: {e}", stacklevel=3)
                    cached = {}
            found[step] = cached
        with self._lock:
            self._metrics = found
        return found

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """Note a step just committed (saves re-reading its manifest)."""
        with self._lock:
            self._metrics[step] = dict(metrics)
            self._refs.pop(step, None)

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with ``step``."""
        found = self.refresh()
        if step not in found:
            raise CheckpointNotFoundError(f"no committed step {step}", source=self.name)
        return dict(found[step])

    def infos(self) -> list[StepInfo]:
        """Committed steps with their metrics, oldest first."""
        return [StepInfo(s, m) for s, m in sorted(self.refresh().items())]

    def best_step(self, metric: str, mode: Mode = "min") -> int | None:
        """The committed step with the best ``metric``."""
        return best_step(self.infos(), metric, mode)

    def plan(self, policy: Policy | None, *, best_metric: str | None = None,
             best_mode: Mode = "min") -> RetentionPlan:
        """What ``policy`` keeps (with reasons) and deletes among the committed steps."""
        return plan_retention(self.infos(), policy, best_metric=best_metric, best_mode=best_mode)

    def prepare_in_place(self, step: int) -> None:
        """Before a step is written in place (object stores): refuse a committed one, and
        remove what an interrupted save of the same step left (it has no marker)."""
        path = self.step_path(step)
        if self.fs.exists(self.fs.join(path, MARKER_NAME)):
            raise StorageError("renaming failed: destination exists (a committed step)",
                               source=self.fs.describe(path))
        if self.fs.exists(path):
            self.fs.rmtree(path)

    def delete(self, steps: list[int], *, durable: bool = True,
               background: bool = False) -> list[int]:
        """Delete committed steps safely (rename away, sync, remove); returns those deleted.

        A step that cannot be deleted produces a warning, not an error. With
        ``background`` the files are removed on the clean-up thread once renamed away (a
        removal interrupted there is finished by the next manager that opens the run).
        """
        deleted = []
        for step in steps:
            doomed = self.fs.join(self.root, deleting_name(step))
            try:
                if self.fs.atomic_rename:
                    self.fs.rename(self.step_path(step), doomed)
                else:  # no atomic rename: the marker goes first, so the step is never
                    # listed half-removed; the rest is a leftover until removed
                    doomed = self.step_path(step)
                    self.fs.remove(self.fs.join(doomed, MARKER_NAME))
                if durable:
                    self.fs.fsync_dir(self.root)
                with self._lock:
                    self._metrics.pop(step, None)
                    self._refs.pop(step, None)
                deleted.append(step)
                if background:
                    run_later(functools.partial(self.fs.rmtree, doomed))
                else:
                    self.fs.rmtree(doomed)
            except TorchkeepError as e:
                warnings.warn(f"could not delete step {step}: {e}", stacklevel=2)
        if deleted:  # the shared data files only the deleted steps named go next
            if background:
                run_later(self._collect_quietly)
            else:
                self.collect_chunks()
        return deleted

    def summary(self, step: int) -> StepSummary:
        """Size, metrics, time and tensor count of one committed step."""
        path = self.step_path(step)
        manifest = read_manifest(self.fs, path, verify=False)
        nbytes = self._folder_bytes(path)
        shared = 0
        for name, used in _references(manifest).items():
            if pool_file_step(name) == step:
                nbytes += self.fs.size(self.fs.join(self.pool, name))
            else:
                shared += used
        tensors = manifest.get("tensors")
        shown = self.fs.join(self.name, step_name(step))
        return StepSummary(step, shown, dict(manifest.get("metrics") or {}), nbytes,
                           manifest.get("created"),
                           len(tensors) if isinstance(tensors, dict) else 0, shared)


def _references(manifest: dict[str, Any]) -> dict[str, int]:
    """The shared data files (names in ``chunks/``) a manifest's chunks lie in, with the
    bytes read from each."""
    found: dict[str, int] = {}
    tensors = manifest.get("tensors")
    for entry in tensors.values() if isinstance(tensors, dict) else ():
        for chunk in (entry.get("chunks") or ()) if isinstance(entry, dict) else ():
            name = chunk.get("file") if isinstance(chunk, dict) else None
            if isinstance(name, str) and name.startswith(POOL_PREFIX):
                name = name[len(POOL_PREFIX):]
                nbytes = chunk.get("nbytes")
                found[name] = found.get(name, 0) + (nbytes if type(nbytes) is int else 0)
    return found
