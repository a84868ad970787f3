"""``torchkeep.distributed.save`` / ``load``: ``dcp.save`` / ``dcp.load`` with torchkeep's
storage layer, planners and errors.

The meaning is DCP's: every rank of the process group calls them with its own (sharded)
state dict. The step directory is committed only when every rank's writes succeeded; a
failure on any rank raises the same TorchkeepError subclass on every rank (DCP's own
``CheckpointException`` is a BaseException and slips past ``except Exception``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchkeep.distributed.planners import TorchkeepLoadPlanner, TorchkeepSavePlanner
from torchkeep.distributed.reader import StepReader
from torchkeep.distributed.writer import StepWriter
from torchkeep.errors import DistributedError, TorchkeepError

__all__ = ["PendingSave", "load", "save", "save_async", "translate"]


def translate(error: BaseException, what: str) -> TorchkeepError:
    """One TorchkeepError for a failed collective checkpoint operation: the error of the
    lowest failing rank when it is one of torchkeep's (the same class on every rank),
    else DistributedError naming the ranks."""
    if isinstance(error, CheckpointException):
        failures = sorted(error.failures.items())
        for rank, (exc, _trace) in failures:
            if isinstance(exc, TorchkeepError):
                result = type(exc).__new__(type(exc))
                TorchkeepError.__init__(result, f"rank {rank}: {exc.reason}",
                                        source=exc.source or None)
                return result
        ranks = [rank for rank, _ in failures]
        first = failures[0][1][0] if failures else error
        return DistributedError(f"{what} failed on ranks {ranks}: "
                                f"{type(first).__name__}: {first}")
    if isinstance(error, TorchkeepError):
        return error
    return DistributedError(f"{what} failed: {type(error).__name__}: {error}")


def save(state_dict: dict[str, Any], path: str | os.PathLike[str], *,
         process_group: Any = None, info: dict[str, Any] | None = None,
         fsync: bool = True, incremental: Any = None) -> None:
    """Save a (sharded) state dict as a committed torchkeep step directory at ``path``.

    Collective: every rank of ``process_group`` calls it. ``path`` must not exist.
    ``incremental``: the manager's ShardedDiff (an incremental step).
    """
    writer = StepWriter(path, fsync=fsync, info=info, incremental=incremental)
    try:
        dcp_save(state_dict, storage_writer=writer, planner=TorchkeepSavePlanner(),
                 process_group=process_group, no_dist=not _distributed())
    except (CheckpointException, RuntimeError, TorchkeepError) as e:
        if writer.is_coordinator and writer.tmp is not None and writer.fs is not None:
            with contextlib.suppress(Exception):  # what the failed save wrote
                writer.fs.rmtree(writer.tmp)
        if incremental is not None:
            incremental.discard()
        if _distributed():  # every rank returns after the removal (a dead peer fails fast)
            with contextlib.suppress(Exception):
                dist.barrier(group=process_group)
        raise translate(e, "save") from e


class PendingSave:
    """A save running in the background (``save_async``); ``result()`` waits for its
    commit and raises its failure as a TorchkeepError (the same class on every rank)."""

    def __init__(self, future: Any, writer: StepWriter, process_group: Any) -> None:
        self._future = future
        self._writer = writer
        self._group = process_group

    def done(self) -> bool:
        """True once the commit finished (or failed)."""
        return bool(self._future.done())

    def result(self) -> None:
        """Wait for the commit; raise its failure."""
        try:
            self._future.result()
        except (CheckpointException, RuntimeError, TorchkeepError) as e:
            writer = self._writer
            if writer.is_coordinator and writer.tmp is not None and writer.fs is not None:
                with contextlib.suppress(Exception):
                    writer.fs.rmtree(writer.tmp)
            if writer.incremental is not None:
                writer.incremental.discard()
            raise translate(e, "save") from e


def save_async(state_dict: dict[str, Any], path: str | os.PathLike[str], *,
               process_group: Any, stager: Any, info: dict[str, Any] | None = None,
               fsync: bool = True, incremental: Any = None) -> PendingSave:
    """Stage ``state_dict`` into CPU memory (``stager``: a DCP ``DefaultStager``, whose
    buffers are reused from one save to the next), then plan, write and commit it on a
    background thread. ``process_group`` must be used by nothing else meanwhile: the
    background collectives must never interleave with the caller's."""
    from torch.distributed.checkpoint.state_dict_saver import async_save

    writer = StepWriter(path, fsync=fsync, info=info, incremental=incremental)
    future = async_save(state_dict, storage_writer=writer, planner=TorchkeepSavePlanner(),
                        process_group=process_group, async_stager=stager,
                        no_dist=not _distributed())
    return PendingSave(future, writer, process_group)


def load(state_dict: dict[str, Any], path: str | os.PathLike[str], *,
         process_group: Any = None, verify: bool = True) -> None:
    """Load a step directory (saved on any number of ranks) into ``state_dict`` in place,
    resharded to the tensors' current layout. Every chunk read is checksum-verified."""
    reader = StepReader(path, verify=verify)
    try:
        dcp_load(state_dict, storage_reader=reader, planner=TorchkeepLoadPlanner(),
                 process_group=process_group, no_dist=not _distributed())
    except (CheckpointException, RuntimeError, TorchkeepError) as e:
        if reader.error is not None:  # every rank read the same manifest and files
            raise reader.error from e
        raise translate(e, "load") from e


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
