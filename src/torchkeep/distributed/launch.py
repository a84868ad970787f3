"""Run a function on N local ranks of a gloo process group: tests, the demo, the bench.

Ranks are forked from a forkserver that imported torch and DCP once, so a launch costs
about a second or two instead of the 10 to 35 s a spawned interpreter (or torchrun) costs
on a small CPU machine, and no rank inherits a parent's OpenMP threads (fork after
OpenMP hangs). ``fn`` must be importable by name (a module-level function).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RankResult", "free_port", "run_ranks"]

@functools.cache
def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed.checkpoint"])
    return ctx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class RankResult:
    """What one rank did: its exit code, and its return value or its error."""

    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None  # "ExceptionType: message" then the traceback
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        """True when the rank returned normally."""
        return self.exitcode == 0 and self.error is None


def _main(fn: Callable[..., Any], rank: int, world: int, port: int, args: Sequence[Any],
          conn: Any, timeout: float) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # a peer died: the group is broken, nothing to tidy
                pass
        # plain pickle, by value: the Pipe's own reducers would pass tensors as shared
        # memory handles, which die with this process (the parent trusts its own ranks)
        conn.send_bytes(pickle.dumps(("ok", value, None)))
    except BaseException as e:  # reported to the parent, then exit 1
        conn.send_bytes(pickle.dumps(
            ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", type(e).__name__)))
        conn.close()
        os._exit(1)
    conn.close()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0,
              group_timeout: float = 20.0) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` forked ranks (gloo, 127.0.0.1).

    Returns one RankResult per rank, in rank order. A rank that dies (``os._exit``, a
    signal) has its exit code and no value. Ranks still running after ``timeout`` seconds
    are killed. ``group_timeout`` bounds every collective, so survivors of a dead peer
    fail instead of waiting.
    """
    ctx = _context()
    port = free_port()
    procs = []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_main, args=(fn, rank, world, port, args, child,
                                               group_timeout), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    deadline = time.monotonic() + timeout
    results = []
    for rank, (proc, conn) in enumerate(procs):
        message = None
        while message is None:
            left = deadline - time.monotonic()
            if conn.poll(max(0.0, min(left, 0.2))):
                try:
                    message = pickle.loads(conn.recv_bytes())
                except EOFError:
                    break
            elif not proc.is_alive() or left <= 0:
                if conn.poll(0):
                    continue
                break
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
        if message is not None and message[0] == "ok":
            results.append(RankResult(rank, proc.exitcode, value=message[1]))
        elif message is not None:
            results.append(RankResult(rank, proc.exitcode, error=message[1],
                                      error_type=message[2]))
        else:
            results.append(RankResult(rank, proc.exitcode, error=f"died (exit {proc.exitcode})"))
    return results
