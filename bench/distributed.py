"""Sharded save/load: torchkeep.distributed against stock dcp.save / dcp.load with
FileSystemWriter / FileSystemReader, on 2 and 4 forked gloo ranks, in the same run.

Every operation runs in fresh rank processes (forked from a forkserver that imported
torch once); the page cache is synced (and dropped, as root) before each; saves write a
new directory, and also replace: DCP overwrites an existing checkpoint directory in
place (its default), torchkeep commits a new step beside the old one and deletes the
old one (what a manager with keep_last=1 does). Loads read a checkpoint written just
before (full cache) and after a drop (cold, when allowed). It prints fastest-of-N and
medians, the ratios the targets are stated in, and bytes on disk.

    python bench/distributed.py [--rounds N] [--worlds 2,4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bytecode import compile_torchkeep  # noqa: E402
from pagecache import settle  # noqa: E402
from torchkeep.distributed.launch import run_ranks  # noqa: E402

TARGETS = {"save": 1.1, "load": 1.0, "small_bytes": 0.5}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run(world: int, op: str, kind: str, path: Path) -> float:
    import dist_worker

    results = run_ranks(world, dist_worker.timed, op, kind, str(path), timeout=600,
                        group_timeout=300)
    for r in results:
        if not r.ok:
            raise RuntimeError(f"{op} on rank {r.rank}: {r.error}")
    return float(results[0].value["seconds"])


def bench(world: int, kind: str, rounds: int, work: Path) -> dict[str, Any]:
    """Interleaved rounds of every operation; the times and the bytes on disk."""
    times: dict[str, list[float]] = {op: [] for op in (
        "dcp_save", "save", "dcp_save_replace", "save_replace", "dcp_load", "load",
        "dcp_load_cold", "load_cold")}
    sizes = {}
    for i in range(rounds):
        for tool, save_op in (("dcp", "dcp_save"), ("torchkeep", "save")):
            fresh = work / f"{tool}-{kind}-{world}-{i}"
            settle(None)
            times[save_op].append(_run(world, save_op, kind, fresh))
            sizes[tool] = _size(fresh)
            # replaced: DCP writes over the same directory; torchkeep commits a new step
            # and removes the old one
            settle(None)
            if tool == "dcp":
                times["dcp_save_replace"].append(_run(world, "dcp_save", kind, fresh))
            else:
                newer = work / f"{tool}-{kind}-{world}-{i}-b"
                seconds = _run(world, "save", kind, newer)
                shutil.rmtree(fresh)
                newer.rename(fresh)
                times["save_replace"].append(seconds)
            load_op = "dcp_load" if tool == "dcp" else "load"
            os.sync()
            times[load_op].append(_run(world, load_op, kind, fresh))
            cold = os.access("/proc/sys/vm/drop_caches", os.W_OK)
            if cold:
                settle(None)
                times[f"{load_op}_cold"].append(_run(world, load_op, kind, fresh))
        for tool in ("dcp", "torchkeep"):
            shutil.rmtree(work / f"{tool}-{kind}-{world}-{i}", ignore_errors=True)
    summary = {op: {"min": min(v), "median": statistics.median(v)}
               for op, v in times.items() if v}
    return {"world": world, "kind": kind, "times": summary, "bytes": sizes}


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'world':>5} {'state':<6} {'operation':<18} {'fastest':>9} {'median':>9} "
             f"{'vs DCP (median)':>16}"]
    for row in rows:
        t = row["times"]
        for ours, theirs in (("save", "dcp_save"), ("save_replace", "dcp_save_replace"),
                             ("load", "dcp_load"), ("load_cold", "dcp_load_cold")):
            for op in (theirs, ours):
                if op not in t:
                    continue
                ratio = ""
                if op == ours and theirs in t:
                    r = t[ours]["median"] / t[theirs]["median"]
                    bound = TARGETS["save" if "save" in ours else "load"]
                    ratio = f"{r:.2f}x {'ok' if r <= bound else 'MISSED'} (<= {bound})"
                lines.append(f"{row['world']:>5} {row['kind']:<6} {op:<18} "
                             f"{t[op]['min']:>8.3f}s {t[op]['median']:>8.3f}s {ratio:>16}")
        b = row["bytes"]
        r = b["torchkeep"] / b["dcp"]
        target = f" (target <= {TARGETS['small_bytes']}: {'ok' if r <= 0.5 else 'MISSED'})" \
            if row["kind"] == "small" else ""
        lines.append(f"{row['world']:>5} {row['kind']:<6} bytes on disk: torchkeep "
                     f"{b['torchkeep']:,} / DCP {b['dcp']:,} = {r:.2f}x{target}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--kinds", default="model,small")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    compile_torchkeep()  # what an installed torchkeep has (bench/bytecode.py)
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchkeep-bench-dist-",
                                     dir=os.environ.get("TORCHKEEP_BENCH_DIR")) as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            for kind in args.kinds.split(","):
                rows.append(bench(world, kind, args.rounds, Path(tmp)))
                print(render(rows[-1:]), flush=True)
    print("\n" + render(rows))
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("(cold loads skipped: dropping the page cache needs root)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
