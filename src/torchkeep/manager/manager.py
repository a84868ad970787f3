"""CheckpointManager: atomic step commits, retention, async save, verified restore."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

import torchkeep
from torchkeep.api import Describer
from torchkeep.errors import (
    AsyncSaveError,
    CheckpointNotFoundError,
    IntegrityError,
    TorchkeepError,
)
from torchkeep.formats.manifest import (
    POOL_NAME,
    POOL_PREFIX,
    TensorPayload,
    commit_manifest,
    plan_tensors,
    pool_file_name,
    read_step_dir,
    write_step,
)
from torchkeep.manager.check_hooks import CheckHooks
from torchkeep.manager.incremental import (
    CHUNK_BYTES,
    Base,
    Delta,
    ShardedDiff,
    diff,
    read_base,
    usable_files,
    write_chunks,
)
from torchkeep.manager.layout import temporary_name
from torchkeep.manager.policy_spec import RetentionSpec
from torchkeep.manager.retention import Mode, Policy, RetentionPlan
from torchkeep.manager.rundir import RunDirectory
from torchkeep.manager.sharded import (
    Collective,
    is_sharded_step,
    restore_sharded,
    save_sharded,
    sharded_world,
)
from torchkeep.manager.staging import StagingArena
from torchkeep.storage.background import drain
from torchkeep.storage.filesystem import FileSystem
from torchkeep.storage.gcpause import gc_paused
from torchkeep.tensors import TorchMaterializer

__all__ = ["CheckpointManager", "ManagerOptions", "StateMismatchError"]



class StateMismatchError(TorchkeepError, KeyError):
    """``restore`` was asked for an entry the checkpoint does not hold."""

    exit_code = 3

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, kw_only=True)
class ManagerOptions:
    """How a CheckpointManager keeps steps; the same names as its keyword arguments.

    Retention policies combine as a union; the newest committed step and the best step
    (when ``best_metric`` is set) are never deleted. With no policy every step is kept.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: Mode = "min"
    keep_every_steps: int | None = None
    async_save: bool = False
    #: verify every tensor's checksum when restoring
    verify: bool = True
    #: fsync data, manifest, marker and folders (a power loss cannot lose a commit)
    durable: bool = True
    #: write only the chunks that changed since the newest committed step
    #: (docs/manager.md, "Incremental steps")
    incremental: bool = False
    #: with ``incremental``: every N-th step is written whole (None: only when asked)
    full_every: int | None = None
    #: with ``incremental``: the most bytes in one chunk
    chunk_bytes: int = CHUNK_BYTES
    #: with ``incremental``: a tensor whose storage, view and in-place version counter
    #: are unchanged since the last save is not read. False hashes every tensor (for code
    #: that writes through ``.data``, numpy views or raw pointers, which keep the counter)
    trust_versions: bool = True

    def __post_init__(self) -> None:
        if self.best_mode not in ("min", "max"):
            raise ValueError("best_mode must be 'min' or 'max'")
        if self.full_every is not None and (type(self.full_every) is not int
                                            or self.full_every < 1):
            raise ValueError(f"full_every must be a positive int, got {self.full_every!r}")
        if type(self.chunk_bytes) is not int or self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {self.chunk_bytes!r}")
        self.policy()  # the policies check their own settings: fail here, not after a commit

    def retention_spec(self) -> RetentionSpec:
        """The retention settings as data (what each manifest records)."""
        return RetentionSpec(keep_last=self.keep_last, keep_best=self.keep_best,
                             best_metric=self.best_metric, best_mode=self.best_mode,
                             keep_every_steps=self.keep_every_steps)

    def policy(self) -> Policy | None:
        """The retention policy these options describe (None keeps everything)."""
        return self.retention_spec().policy()


_UNSET: Any = object()


class CheckpointManager:
    """Saves the whole state of a training run as numbered, atomically committed steps.

    ::

        state = {"model": model, "optimizer": opt, "scheduler": sched,
                 "rng": torchkeep.RNGState(), "epoch": 0}
        with torchkeep.CheckpointManager("runs/a", keep_last=2, keep_best=1,
                                         best_metric="val_loss") as mgr:
            start = mgr.restore(state) + 1 if mgr.latest_step() is not None else 0
            for step in range(start, total):
                ...
                mgr.save(step, state, metrics={"val_loss": loss})

    ``state`` maps names to objects with ``state_dict()`` / ``load_state_dict()`` (modules,
    optimizers, schedulers, grad scalers, samplers, RNGState...) or to plain values
    (numbers, strings, tensors, containers). ``directory`` is a local path or an fsspec
    URL (``s3://bucket/runs/a``; ``storage_options`` go to fsspec; on object stores a
    step is written in place and committed by its marker, written last). Leftovers of
    interrupted saves are removed (and listed in ``cleaned``) when the manager opens the
    directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = _UNSET,
        keep_best: int | None = _UNSET,
        best_metric: str | None = _UNSET,
        best_mode: Mode = _UNSET,
        keep_every_steps: int | None = _UNSET,
        async_save: bool = _UNSET,
        incremental: bool = _UNSET,
        full_every: int | None = _UNSET,
        options: ManagerOptions | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        given: dict[str, Any] = {
            "keep_last": keep_last, "keep_best": keep_best, "best_metric": best_metric,
            "best_mode": best_mode, "keep_every_steps": keep_every_steps,
            "async_save": async_save, "incremental": incremental, "full_every": full_every,
        }
        base = options or ManagerOptions()
        overrides = {k: v for k, v in given.items() if v is not _UNSET}
        if overrides:
            base = dataclasses.replace(base, **overrides)
        self.options = base
        #: set while ``torchkeep check-resume`` drives the script (docs/check-resume.md)
        self._resume_check = CheckHooks.from_env(directory)
        if self._resume_check is not None:
            directory, storage_options = self._resume_check.directory, None
        self.run = RunDirectory(directory, storage_options=storage_options)
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[None] | Any = None  # a Future, or a sharded PendingSave
        self._inflight_step: int | None = None
        self._inflight_metrics: dict[str, Any] = {}
        self._arena = StagingArena()
        self._closed = False
        #: incremental saves: the step the next one compares with (None: read it from disk)
        self._base: Base | None = None
        #: the next incremental save writes every chunk (after restoring an older step)
        self._force_full = False
        self._pool_ready = False
        self._pending_diff: ShardedDiff | None = None
        #: the ranks of a sharded run (torch.distributed with more than one rank), or None
        self.collective: Collective | None = Collective() if sharded_world() else None
        #: what the manager removed when it opened the directory (rank 0 cleans)
        self.cleaned: list[str] = []
        if self.collective is None or self.collective.rank == 0:
            self.cleaned = self.run.clean_leftovers()
        if self.collective is not None:
            self.collective.barrier()
        if self.cleaned:
            warnings.warn(f"{self.run.name}: removed leftovers of interrupted saves: "
                          + ", ".join(self.cleaned), stacklevel=2)
        self.run.refresh()
        if self._resume_check is not None:
            self._resume_check.opened(1 if self.collective is None else self.collective.world)

    @property
    def fs(self) -> FileSystem:
        """The file system of the run directory."""
        return self.run.fs

    @fs.setter
    def fs(self, value: FileSystem) -> None:
        self.run.fs = value

    @property
    def root(self) -> str:
        """The run directory's path on its file system."""
        return self.run.root

    # -- the run directory ---------------------------------------------------------------

    def step_path(self, step: int) -> str:
        """The folder of committed step ``step``."""
        return self.run.step_path(step)

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first (collective in a sharded run: rank 0's
        listing, so every rank gets the same answer)."""
        if self.collective is not None:
            return list(self.collective.decide_call(lambda: sorted(self.run.refresh())))
        return sorted(self.run.refresh())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The committed step with the best ``best_metric`` (None without a metric)."""
        if self.options.best_metric is None:
            return None
        return self.run.best_step(self.options.best_metric, self.options.best_mode)

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with ``step``."""
        return self.run.metrics(step)

    def retention(self) -> RetentionPlan:
        """What the retention policy keeps (with reasons) and would delete, right now."""
        return self.run.plan(self.options.policy(), best_metric=self.options.best_metric,
                             best_mode=self.options.best_mode)

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], *,
             metrics: dict[str, Any] | None = None, full: bool = False) -> None:
        """Commit ``state`` as step ``step`` (a new, larger step number).

        Synchronous by default: when it returns the step is durable on disk. With
        ``async_save`` it returns once the state is copied to CPU staging memory; the
        write and commit happen in the background, and a failure surfaces on the next
        ``save``, ``wait`` or ``close`` as AsyncSaveError. With ``incremental``, ``full``
        writes every chunk of this step anew (no chunk shared with an earlier step).
        """
        self._check_open()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.wait()
        metrics = _plain_metrics(metrics)
        if self._resume_check is not None:
            self._resume_check.saving(step, state, self.options.async_save)
        self._save(step, state, metrics, full)
        if self._resume_check is not None:
            self._resume_check.after_save(step, self.wait)

    def _save(self, step: int, state: dict[str, Any], metrics: dict[str, Any],
              full: bool) -> None:
        if self.collective is not None:
            self._save_sharded(step, state, metrics, full)
            return
        if self.fs.exists(self.step_path(step)):
            raise ValueError(
                f"step {step} is already committed in {self.fs.describe(self.root)}; "
                "committed steps are never overwritten"
            )
        tree = _collect(state)
        describer = Describer()
        skeleton, payloads, originals = plan_tensors(tree, describer)
        if self.options.incremental:
            self._save_incremental(step, skeleton, payloads, originals, describer, metrics,
                                   full)
            return
        if self.options.async_save:
            payloads = self._arena.stage(payloads, originals, describer.storage_bytes)
        self._run_commit(step, self._commit, step, skeleton, payloads, describer.storage_bytes,
                         metrics)

    def _run_commit(self, step: int, commit: Callable[..., None], *args: Any) -> None:
        """``commit(*args)`` now, or with ``async_save`` on the writer thread (what it
        writes must be staged already)."""
        if not self.options.async_save:
            commit(*args)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="torchkeep-save")
        self._inflight_step = step
        self._inflight = self._executor.submit(commit, *args)

    def _save_sharded(self, step: int, state: dict[str, Any], metrics: dict[str, Any],
                      full: bool) -> None:
        collective = self.collective
        assert collective is not None
        extra: dict[str, Any] = {"retention": dataclasses.asdict(self.options.retention_spec())}
        incremental = None
        if self.options.incremental:
            incremental = self._sharded_diff(step, full)
            base = incremental.base
            extra["incremental"] = {
                "base": None if base is None else base.step, "full": base is None,
                "since_full": 0 if base is None else base.since_full + 1}
        self._pending_diff = incremental
        pending = save_sharded(self.step_path(step), state, step=step, metrics=metrics,
                               extra=extra, collective=collective, fsync=self.options.durable,
                               background=self.options.async_save, incremental=incremental)
        if pending is None:
            self._after_sharded_commit(step, metrics)
        else:
            self._inflight, self._inflight_step = pending, step
            self._inflight_metrics = metrics

    def _sharded_diff(self, step: int, full: bool) -> ShardedDiff:
        """This rank's comparison for an incremental sharded save: rank 0 decides the base
        (the newest committed step) and whether the step is full; each rank reads the
        base's manifest (every rank sees the run folder)."""
        collective = self.collective
        assert collective is not None
        options = self.options

        def decide() -> int | None:
            if full or self._force_full:
                return None
            base = self._incremental_base()
            if base is None or (options.full_every is not None
                                and base.since_full + 1 >= options.full_every):
                return None
            return base.step

        chosen = collective.decide_call(decide)
        base = None
        if chosen is not None:
            try:
                base = read_base(self.fs, self.step_path(chosen), chosen)
            except TorchkeepError as e:  # this rank writes its pieces whole (raising here
                # would leave the other ranks waiting in the save's collectives)
                warnings.warn(f"step {chosen} is unreadable on rank {collective.rank} ({e}): "
                              "its pieces of this save are written whole", stacklevel=4)
        return ShardedDiff(step=step, rank=collective.rank, base=base,
                           chunk_bytes=options.chunk_bytes, usable=self._usable_files(base))

    def _after_sharded_commit(self, step: int, metrics: dict[str, Any]) -> None:
        """Rank 0 runs retention on the committed steps; every rank waits for it."""
        collective = self.collective
        assert collective is not None
        if self._pending_diff is not None:
            self._pending_diff = None
            self._base = None  # read from disk by the next save: rank 0 has no manifest
            self._force_full = False
        self.run.record(step, metrics)
        if self._resume_check is not None:
            self._resume_check.committed(step)
        if collective.rank == 0 and self._retains():
            self.run.delete(self.retention().delete, durable=self.options.durable)
        collective.barrier()

    def _commit(
        self,
        step: int,
        skeleton: Any,
        payloads: list[TensorPayload],
        storage_bytes: Callable[[Any], Any],
        metrics: dict[str, Any],
    ) -> None:
        def write(tmp: str) -> None:
            write_step(self.fs, tmp, step=step, skeleton=skeleton, payloads=payloads,
                       storage_bytes=storage_bytes, metrics=metrics,
                       fsync=self.options.durable, extra=self._manifest_extra())

        self._commit_step(step, metrics, write)

    def _manifest_extra(self) -> dict[str, Any]:
        """What every manifest the manager writes records besides the state."""
        return {"torch_version": torch.__version__, "torchkeep_version": torchkeep.__version__,
                "retention": dataclasses.asdict(self.options.retention_spec())}

    def _commit_step(self, step: int, metrics: dict[str, Any], write: Callable[[str], None],
                     undo: Callable[[], None] | None = None) -> None:
        """The commit protocol: ``write(folder)`` writes the step; where renames are
        atomic the folder is a temporary name renamed once written, on object stores
        (no atomic rename) the step's own folder, its marker written last. A failure
        removes the folder and calls ``undo``; after the commit retention runs."""
        fs = self.fs
        final = self.step_path(step)
        tmp = fs.join(self.root, temporary_name(step)) if fs.atomic_rename else final
        if not fs.atomic_rename:
            self.run.prepare_in_place(step)
        try:
            write(tmp)
            if self._resume_check is not None:
                self._resume_check.before_commit(step)
            if tmp != final:
                fs.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                if fs.exists(tmp):
                    fs.rmtree(tmp)
            if undo is not None:
                with contextlib.suppress(Exception):
                    undo()
            raise
        if self.options.durable:
            fs.fsync_dir(self.root)
        self._committed(step, metrics)

    # -- incremental steps --------------------------------------------------------------------

    def _save_incremental(self, step: int, skeleton: Any, payloads: list[TensorPayload],
                          originals: dict[str, Any], describer: Describer,
                          metrics: dict[str, Any], full: bool) -> None:
        options = self.options
        base = None if full or self._force_full else self._incremental_base()
        if base is not None and options.full_every is not None \
                and base.since_full + 1 >= options.full_every:
            base = None
        usable = self._usable_files(base)
        delta = diff(payloads, originals, describer.storage_bytes, base,
                     chunk_bytes=options.chunk_bytes, usable=usable.__contains__,
                     trust_versions=options.trust_versions)
        if options.async_save:
            for item, staged in zip(delta.new,
                                    self._arena.stage_views([c.data for c in delta.new]),
                                    strict=True):
                item.data = staged
        self._run_commit(step, self._commit_delta, step, skeleton, delta, base, metrics)

    def _incremental_base(self) -> Base | None:
        """The newest committed step, as the next incremental save compares with it."""
        if self._base is not None:
            return self._base
        steps = self.run.steps()  # this process's listing (on rank 0 in a sharded run)
        newest = steps[-1] if steps else None
        if newest is None:
            return None
        try:
            return read_base(self.fs, self.step_path(newest), newest)
        except TorchkeepError as e:
            warnings.warn(f"step {newest} is unreadable ({e}); this save is written whole",
                          stacklevel=4)
            return None

    def _usable_files(self, base: Base | None) -> set[str]:
        return set() if base is None else usable_files(self.fs, self.step_path(base.step),
                                                       base)

    def _commit_delta(self, step: int, skeleton: Any, delta: Delta, base: Base | None,
                      metrics: dict[str, Any]) -> None:
        fs = self.fs
        durable = self.options.durable
        pool = fs.join(self.root, POOL_NAME)
        written: list[str] = []
        since_full = 0 if base is None else base.since_full + 1

        def write(tmp: str) -> None:
            if delta.new:
                if not self._pool_ready:
                    fs.makedirs(pool)
                    if durable:
                        fs.fsync_dir(self.root)
                    self._pool_ready = True
                name = pool_file_name(step)
                written.append(fs.join(pool, name))
                write_chunks(fs, written[0], POOL_PREFIX + name, delta.new, fsync=durable)
                if durable:
                    fs.fsync_dir(pool)
            fs.makedirs(tmp)
            commit_manifest(
                fs, tmp, step=step, skeleton=skeleton, entries=delta.entries, metrics=metrics,
                fsync=durable,
                extra={**self._manifest_extra(), "incremental": {
                    "base": None if base is None else base.step, "full": base is None,
                    "since_full": since_full, "written_bytes": delta.new_bytes,
                    "shared_bytes": delta.shared_bytes}})

        def undo() -> None:  # the shared file of a step that never committed
            for path in written:
                if fs.exists(path):
                    fs.remove(path)

        self._commit_step(step, metrics, write, undo)
        self._base = Base(step, delta.entries, since_full, delta.versions)
        self._force_full = False

    def _committed(self, step: int, metrics: dict[str, Any]) -> None:
        """After a step's commit: note it, report it, apply retention."""
        self.run.record(step, metrics)
        if self._resume_check is not None:
            self._resume_check.committed(step)
        if self._retains():  # no policy deletes nothing: skip the listing
            self.run.delete(self.retention().delete, durable=self.options.durable,
                            background=True)

    def _retains(self) -> bool:
        """Whether retention deletes anything (never while check-resume compares steps)."""
        return self.options.policy() is not None and self._resume_check is None

    def wait(self) -> None:
        """Block until the background save (if any) is committed; raise its failure."""
        future = self._inflight
        if future is None:
            return
        step = self._inflight_step
        self._inflight = None
        self._inflight_step = None
        try:
            future.result()
        except BaseException as e:
            raise AsyncSaveError(f"the background save of step {step} failed: {e}",
                                 source=self.fs.describe(self.root)) from e
        if self.collective is not None and step is not None:
            self._after_sharded_commit(step, self._inflight_metrics)

    # -- restoring ---------------------------------------------------------------------------

    def load(self, step: int | None = None, *, map_location: Any = None) -> dict[str, Any]:
        """The saved state of ``step`` (default: latest) as plain values, verified."""
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError("no committed step to load", source=self.run.name)
        if not self.fs.exists(self.step_path(step)):
            raise CheckpointNotFoundError(f"no committed step {step}",
                                          source=self.fs.describe(self.root))
        with gc_paused():  # a manifest of many chunks is many small objects (gcpause.py)
            parsed = read_step_dir(self.step_path(step), fs=self.fs,
                                   verify=self.options.verify)
            try:
                tree = TorchMaterializer(parsed, map_location=map_location).tree()
            finally:
                parsed.close()
        if not isinstance(tree, dict):
            raise IntegrityError(f"step {step} does not hold a state dict")
        self._restored(step)  # restore() loads through here too
        return tree

    def restore(self, state: dict[str, Any], *, step: int | None = None,
                fallback: bool = False, map_location: Any = None,
                from_path: str | os.PathLike[str] | None = None) -> int:
        """Load step ``step`` (default: latest) into ``state``; returns the step.

        Objects with ``load_state_dict`` are loaded in place; plain values are replaced in
        ``state``. Every tensor's checksum is verified; a mismatch raises IntegrityError
        naming the tensor and step, unless ``fallback`` lets it step back to the newest
        step that verifies (with a warning).

        ``from_path`` imports a checkpoint from outside the run instead: a stock
        ``torch.distributed.checkpoint`` directory (torchtitan's, say) or a torchkeep step
        directory, through DCP's planner (any world size; returns -1). DCP's
        ``.metadata`` and values are read by torchkeep's restricted readers.
        """
        self._check_open()
        self.wait()  # a save still in flight is the newest step: list steps after it commits
        if from_path is not None:
            restore_sharded(os.fspath(from_path), state, step=-1, manifest={},
                            collective=self.collective, verify=self.options.verify)
            return -1
        steps = self.all_steps()
        if step is None and not steps:
            raise CheckpointNotFoundError("no committed step to restore",
                                          source=self.fs.describe(self.root))
        target = steps[-1] if step is None else step
        candidates = [target]
        if fallback:
            candidates += [s for s in reversed(steps) if s < target]
        first_error: TorchkeepError | None = None
        for candidate in candidates:
            try:
                if self._restore_sharded(candidate, state):
                    if candidate != target:
                        warnings.warn(f"restored step {candidate} instead of step {target}",
                                      stacklevel=2)
                    self._restored(candidate)
                    return candidate
                saved = self.load(candidate, map_location=map_location)
            except TorchkeepError as e:
                if not fallback:
                    raise
                first_error = first_error or e
                warnings.warn(f"step {candidate} cannot be restored: {e}", stacklevel=2)
                continue
            if candidate != target:
                warnings.warn(f"restored step {candidate} instead of step {target}",
                              stacklevel=2)
            _apply(state, saved, candidate)
            return candidate
        assert first_error is not None
        raise first_error

    def _restore_sharded(self, step: int, state: dict[str, Any]) -> bool:
        """Restore a sharded step (or any step, in a sharded run) through DCP; False when
        the step is a single-process one and this is a single process."""
        path = self.step_path(step)
        if self.collective is None:
            if not self.fs.exists(path):
                return False
            sharded, manifest = is_sharded_step(self.fs, path)
            if not sharded:
                return False
        else:
            manifest = self.collective.decide_call(lambda: is_sharded_step(self.fs, path)[1])
        restore_sharded(path, state, step=step, manifest=manifest, collective=self.collective,
                        verify=self.options.verify)
        return True

    def _restored(self, step: int) -> None:
        if self.options.incremental and step != max(self.run.steps(), default=None):
            # an older step came back (a fallback past a bad chunk, or on purpose): the
            # next save shares nothing, so a bad chunk of a newer step is never named again
            self._force_full = True
        if self._resume_check is not None:
            self._resume_check.restored(step)

    # -- lifetime ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the CheckpointManager is closed")

    def close(self) -> None:
        """Wait for the background save, then release the writer thread."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self.collective is not None:
                self.collective.close()
            drain()  # pruned steps are gone from disk when close() returns

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.fs.describe(self.root)!r}, {self.options})"


def _collect(state: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise TypeError("state must be a dict mapping names to objects or values")
    tree = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state names must be strings, got {name!r}")
        has_state = callable(getattr(value, "state_dict", None)) and callable(
            getattr(value, "load_state_dict", None)
        )
        tree[name] = value.state_dict() if has_state else value
    return tree


def _apply(state: dict[str, Any], saved: dict[str, Any], step: int) -> None:
    missing = [name for name in state if name not in saved]
    if missing:
        raise StateMismatchError(
            f"step {step} holds no {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, saved))})"
        )
    for name, value in state.items():
        loader = getattr(value, "load_state_dict", None)
        if callable(loader) and callable(getattr(value, "state_dict", None)):
            loader(saved[name])
        else:
            state[name] = saved[name]


def _plain_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if callable(getattr(value, "item", None)):  # 0-d tensors, numpy scalars
            value = value.item()
        if not isinstance(key, str) or not (value is None or isinstance(value, (bool, int, float,
                                                                                 str))):
            raise TypeError(f"metrics must map names to numbers or strings, got {key!r}: "
                            f"{type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN or infinity; such a step is never "best"
        result[key] = value
    return result
