"""Lightning: a ``CheckpointIO`` plugin that writes ``.ckpt`` files atomically and reads
them without running code, and a callback that puts the RNG streams in the checkpoint.

::

    trainer = Trainer(plugins=[TorchkeepCheckpointIO()], callbacks=[RNGStateCallback(), ...])

The files are torch zip files with Lightning's usual tree: stock Lightning (and
``torch.load(weights_only=True)``) reads them without the plugin, and the plugin reads
what stock Lightning wrote.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import Callback

from torchkeep.api import SaveOptions, load, save
from torchkeep.errors import AsyncSaveError
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.atomic import TMP_MARKER
from torchkeep.storage.filesystem import open_filesystem
from torchkeep.storage.remote import is_url
from torchkeep.unpickle import AllowSpec

__all__ = ["LIGHTNING_ALLOW", "RNGStateCallback", "TorchkeepCheckpointIO"]

#: Lightning's own types that appear in its checkpoints, admitted by the plugin's loader:
#: ``AttributeDict`` (hyper-parameters), under the module names of Lightning 2.x
#: (``lightning``), the standalone ``lightning_fabric`` and the 1.x ``pytorch_lightning``.
#: Anything else a checkpoint names raises UnsafeCheckpointError; add it with ``allow=``.
LIGHTNING_ALLOW: tuple[AllowSpec, ...] = (
    (AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (AttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
    (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
)


def _plain(tree: Any, clone: bool) -> Any:
    """The checkpoint with AttributeDicts as dicts (what stock torch.load reads with
    weights_only=True), containers copied, and tensors cloned when ``clone``."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone() if clone else tree
    if type(tree) is dict or isinstance(tree, AttributeDict):
        return {k: _plain(v, clone) for k, v in tree.items()}
    if isinstance(tree, dict):  # OrderedDict (state dicts keep their _metadata)
        copied = type(tree)((k, _plain(v, clone)) for k, v in tree.items())
        if hasattr(tree, "_metadata"):
            copied._metadata = tree._metadata  # type: ignore[attr-defined]
        return copied
    if type(tree) is list:
        return [_plain(v, clone) for v in tree]
    if type(tree) is tuple:
        return tuple(_plain(v, clone) for v in tree)
    return tree


class TorchkeepCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through torchkeep.

    * ``save_checkpoint`` writes a torch zip file atomically: the old file (``last.ckpt``)
      is replaced only by a complete new one, fsynced when ``durable`` (the default), so a
      SIGKILL at any moment leaves either the old checkpoint or the new one.
    * ``load_checkpoint`` reads with the restricted interpreter: Lightning's own types
      (:data:`LIGHTNING_ALLOW`) and ``allow`` are admitted; any other global raises
      UnsafeCheckpointError naming it, whatever ``weights_only`` Lightning passes.
    * ``async_save=True`` snapshots the tensors on the caller's thread and writes in one
      background thread; removals queue behind the saves, so ``ModelCheckpoint`` never
      deletes a file before it was written. A failure is raised (AsyncSaveError) by the
      next call or by ``teardown``. Lightning's own ``AsyncCheckpointIO`` wrapper also
      works around this plugin.
    """

    def __init__(self, *, durable: bool = True, async_save: bool = False,
                 allow: Iterable[AllowSpec] = (), limits: Limits = DEFAULT_LIMITS) -> None:
        self.durable = durable
        self.async_save = async_save
        self.allow = LIGHTNING_ALLOW + tuple(allow)
        self.limits = limits
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()

    # -- the CheckpointIO interface -------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` (a local path or an fsspec URL; ``storage_options``
        go to fsspec)."""
        self._raise_failures()
        tree = _plain(checkpoint, clone=self.async_save)
        if self.async_save:
            self._submit(self._write, tree, path, storage_options)
        else:
            self._write(tree, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read ``path`` with the restricted loader (``weights_only`` changes nothing:
        the file's code never runs). Pending background saves finish first."""
        self.wait()
        if not is_url(os.fspath(path)) and not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        result: dict[str, Any] = load(os.fspath(path), map_location, allow=self.allow,
                                      limits=self.limits)
        return result

    def remove_checkpoint(self, path: Any) -> None:
        """Delete ``path`` (after any save of it still in flight)."""
        self._raise_failures()
        if self.async_save:
            self._submit(self._remove, path)
        else:
            self._remove(path)

    def teardown(self) -> None:
        """Finish background work and raise its first failure."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def wait(self) -> None:
        """Block until every queued save and removal is done; raise the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            raise AsyncSaveError(f"a background checkpoint write failed: {failure}") \
                from failure

    # -- work --------------------------------------------------------------------------

    def _write(self, tree: Any, path: Any, storage_options: Any | None) -> None:
        target = os.fspath(path)
        if not is_url(target):
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            _remove_leftovers(target)
        save(tree, target, format="torch", options=SaveOptions(durable=self.durable),
             storage_options=storage_options)

    def _remove(self, path: Any) -> None:
        fs, target = open_filesystem(os.fspath(path))  # local, or any fsspec URL
        if not fs.exists(target):
            return  # removing what is gone is not an error
        fs.remove(target)
        if self.durable:
            fs.fsync_dir(os.path.dirname(target) or ".")

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="torchkeep-lightning")
        with self._lock:
            self._pending = [f for f in self._pending if not f.done() or f.exception()]
            self._pending.append(self._executor.submit(fn, *args))

    def _raise_failures(self) -> None:
        with self._lock:
            failed = [f for f in self._pending if f.done() and f.exception() is not None]
        if failed:
            self.wait()


def _remove_leftovers(target: str) -> None:
    """Delete what a killed save of ``target`` left: its hidden temporary files (the
    checkpoint itself was never touched by them)."""
    folder, base = os.path.split(os.path.abspath(target))
    prefix = f".{base}{TMP_MARKER}"
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


class RNGStateCallback(Callback):
    """Saves Python's, numpy's, torch's and CUDA's RNG states in the checkpoint and
    restores them on resume: Lightning's ``.ckpt`` leaves them out, so dropout, shuffling
    and augmentation draw differently after a resume without it.

    The states are those at the moment the checkpoint is written, stored as plain values
    and tensors (numpy's key array as a uint8 tensor), so the file still loads with stock
    ``torch.load(weights_only=True)``. On resume they are set where the uninterrupted run
    would next draw. For a checkpoint taken at the end of an epoch that is before the
    training loader's iterator is created (Lightning creates it when fitting starts, after
    the sanity check, which draws too): they are set at ``on_fit_start`` and again at
    ``on_sanity_check_end``. For one taken inside an epoch it is the next batch: they are
    set at the first ``on_train_batch_start`` (exact only when the loader resumes
    mid-epoch too, as a ``StatefulDataLoader`` does). Checked against Lightning 2.6.
    """

    def __init__(self) -> None:
        self._restore: dict[str, Any] | None = None
        self._trainer: Any = None
        self._in_epoch = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._in_epoch = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._in_epoch = False

    def _mid_epoch(self) -> bool:
        trainer = self._trainer
        if trainer is None or not self._in_epoch:
            return False
        return not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def state_dict(self) -> dict[str, Any]:
        from torchkeep.manager.rng import RNGState

        state = RNGState().state_dict()
        kind, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (kind, torch.from_numpy(keys.astype("<u4").view("u1").copy()), pos,
                          has_gauss, cached)
        state["resume_at"] = "batch" if self._mid_epoch() else "fit"
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = dict(state_dict)

    def _at_epoch_boundary(self) -> bool:
        return self._restore is not None and self._restore.get("resume_at") != "batch"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._at_epoch_boundary():
            self._apply(keep=True)

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        if self._at_epoch_boundary():
            self._apply(keep=True)  # the sanity check drew from the generators

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._at_epoch_boundary():
            self._restore = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if self._restore is not None:
            self._apply(keep=False)

    def _apply(self, *, keep: bool) -> None:
        import numpy as np

        from torchkeep.manager.rng import RNGState

        state = dict(self._restore or {})
        if not keep:
            self._restore = None
        state.pop("resume_at", None)
        kind, keys, pos, has_gauss, cached = state["numpy"]
        if isinstance(keys, torch.Tensor):
            keys = np.frombuffer(keys.numpy().tobytes(), dtype="<u4")
        state["numpy"] = (kind, keys, pos, has_gauss, cached)
        RNGState().load_state_dict(state)
