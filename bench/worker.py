"""One timed operation in a fresh process; prints one JSON line (bench/run.py runs it).

Only the operation itself is timed. Memory: peak RSS growth during the operation (VmHWM,
reset just before) and anonymous memory still held after it (RssAnon), from /proc.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import torchkeep  # noqa: E402
from pagecache import settle  # noqa: E402
from states import make_state  # noqa: E402


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tensors_of(tree: Any, kind: type = torch.Tensor) -> list[Any]:
    """Every ``kind`` leaf of ``tree`` (dicts, lists and tuples are walked)."""
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, kind):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return found


def touch(tree: Any) -> float:
    """Read every element of every tensor (the same work for every contender)."""
    total = 0.0
    for t in tensors_of(tree):
        if t.numel():
            total += float(t.sum())
    return total


def flat_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The state's tensors by path (what safetensors and the raw writes handle)."""
    flat: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            flat[path] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))

    walk(state, "")
    return flat


def raw_write(state: Any, path: str, fsync: bool, replace: bool = False) -> None:
    """Each tensor's bytes written to ``path`` with os.write; replacing truncates the
    existing file in place (what ``open(path, "wb")`` and torch.save do)."""
    mode = os.O_TRUNC if replace else os.O_EXCL
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
    try:
        for t in flat_tensors(state).values():
            view = memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())
            while view.nbytes:
                view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def memcpy(state: Any, _: str) -> Callable[[], None]:
    """Copy every tensor into buffers allocated and touched beforehand."""
    sources = list(flat_tensors(state).values())
    targets = [torch.empty_like(t) for t in sources]
    for t in targets:
        t.zero_()

    def run() -> None:
        for dst, src in zip(targets, sources, strict=True):
            dst.copy_(src)

    return run


def mmap_touch(path: str) -> Callable[[], float]:
    """The hardware limit of a load: the file's tensors mapped before the clock starts
    (tensors over a private mapping, no page touched yet); timed: summing every tensor."""
    with torchkeep.open(path) as handle:  # only to find each record's byte range
        parsed = handle._parsed
        spans = [(parsed.record(info.ref.storage).offset, info.ref.dtype.name, info.ref.numel)
                 for info in handle.tensors.values()]
    fd = os.open(path, os.O_RDONLY)
    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    os.close(fd)
    tensors = [torch.frombuffer(mapped, dtype=getattr(torch, dtype), count=numel, offset=offset)
               for offset, dtype, numel in spans]

    def run() -> float:
        return sum(float(t.sum()) for t in tensors if t.numel())

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--replace", action="store_true", help="the save's path exists")
    args = parser.parse_args()
    op, path = args.op, args.path
    result: dict[str, Any] = {"op": op, "state": args.state}

    is_load = op.startswith(("load", "torch_load", "safetensors_load", "mmap_touch"))
    state = None if is_load else make_state(args.state)
    fn: Callable[[], Any]
    if op == "raw_write":
        fn = lambda: raw_write(state, path, fsync=False, replace=args.replace)  # noqa: E731
    elif op == "raw_write_fsync":
        fn = lambda: raw_write(state, path, fsync=True, replace=args.replace)  # noqa: E731
    elif op == "memcpy":
        fn = memcpy(state, path)
    elif op == "torch_save":
        fn = lambda: torch.save(state, path)  # noqa: E731
    elif op == "save":
        fn = lambda: torchkeep.save(state, path)  # noqa: E731
    elif op == "save_nodurable":
        options = torchkeep.SaveOptions(durable=False)
        fn = lambda: torchkeep.save(state, path, options=options)  # noqa: E731
    elif op == "safetensors_save":
        from safetensors.torch import save_file

        flat = flat_tensors(state)
        fn = lambda: save_file(flat, path)  # noqa: E731
    elif op == "manager_save":
        manager = torchkeep.CheckpointManager(path)
        fn = lambda: manager.save(1, {"state": state})  # noqa: E731
    elif op == "manager_async":
        manager = torchkeep.CheckpointManager(path, async_save=True)
        manager.save(0, {"state": state})  # warm the staging buffer (steady state)
        manager.wait()
        import shutil

        shutil.rmtree(manager.step_path(0))
        settle(None)  # then the same page-cache state as the other operations
        timings = {}

        def run() -> None:
            t0 = time.perf_counter()
            manager.save(1, {"state": state})
            timings["blocked_s"] = time.perf_counter() - t0
            manager.wait()
            timings["background_s"] = time.perf_counter() - t0 - timings["blocked_s"]

        fn = run
        result["extra"] = timings
    elif op == "torch_load":
        fn = lambda: touch(torch.load(path, weights_only=True))  # noqa: E731
    elif op == "torch_load_mmap":
        fn = lambda: touch(torch.load(path, weights_only=True, mmap=True))  # noqa: E731
    elif op == "load":
        fn = lambda: touch(torchkeep.load(path))  # noqa: E731
    elif op == "load_mmap":
        fn = lambda: touch(torchkeep.load(path, mmap=True))  # noqa: E731
    elif op == "load_numpy":
        import numpy as np

        def run_numpy() -> None:
            for array in tensors_of(torchkeep.load(path, backend="numpy"), np.ndarray):
                array.view(np.uint8).sum()

        fn = run_numpy
    elif op == "safetensors_load":
        from safetensors.torch import load_file

        fn = lambda: touch(load_file(path))  # noqa: E731
    elif op == "mmap_touch":
        fn = mmap_touch(path)
    else:
        raise SystemExit(f"unknown op {op}")

    before = proc_status()
    reset_peak()
    start = time.perf_counter()
    keep = fn()
    elapsed = time.perf_counter() - start
    after = proc_status()
    result.update(
        seconds=elapsed,
        peak_rss_growth=after["VmHWM"] - before["VmRSS"],
        anon_growth=after["RssAnon"] - before["RssAnon"],
    )
    if state is not None:
        result["state_bytes"] = sum(t.nbytes for t in tensors_of(state))
    if "extra" in result:
        result.update(result.pop("extra"))
    del keep
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
