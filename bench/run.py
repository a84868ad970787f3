"""torchkeep against torch.save / torch.load / safetensors and the machine's raw limits.

Interleaved, shuffled rounds of fresh processes (bench/worker.py) under two page-cache
conditions (dropped before each operation; full of other data), saves onto new paths and
over existing files; the median and the fastest run of every operation, its GiB/s,
memory, and the ratios the speed targets are stated in; ``torchkeep inspect`` of a big
file and ``ls``/``prune`` of a 1000-step run. ``make bench`` runs it; ``--quick`` for a
smaller run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bytecode import compile_torchkeep
from pagecache import FILLER_ENV, available_bytes, can_drop, make_filler, read_through, settle

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONWARNINGS="ignore")

SAVE_OPS = ["raw_write", "raw_write_fsync", "memcpy", "torch_save", "save", "save_nodurable",
            "safetensors_save", "manager_save", "manager_async"]
LOAD_OPS = ["mmap_touch", "torch_load", "torch_load_mmap", "safetensors_load", "load",
            "load_mmap", "load_numpy"]
#: save operations also run onto an existing file of the same size (``op@replace``)
REPLACE_OPS = ["raw_write", "raw_write_fsync", "torch_save", "save", "save_nodurable",
               "safetensors_save"]
#: the prepared file a replacing save overwrites (torchkeep's own file otherwise)
REPLACED_FILE = {"safetensors_save": "s.safetensors", "torch_save": "t.pt",
                 "raw_write": "t.pt", "raw_write_fsync": "t.pt"}
STATE_OPS = {
    "model": SAVE_OPS + [f"{op}@replace" for op in REPLACE_OPS] + LOAD_OPS,
    "huge": ["raw_write", "raw_write_fsync", "torch_save", "save", "save_nodurable",
             "safetensors_save", "mmap_touch", "torch_load_mmap", "safetensors_load",
             "load_mmap", "load"],
    "tiny": ["torch_save", "save", "save_nodurable", "torch_load", "load"],
    "tiny100k": ["torch_save", "save_nodurable", "safetensors_save", "torch_load", "load_mmap",
                 "safetensors_load"],
    "seed": ["torch_save", "save", "torch_load", "load"],
}
#: states run only with dropped caches (a full cache beside 8 GiB leaves no room)
DROPPED_ONLY = {"huge"}
LOAD_FILE = {"torch_load": "t.pt", "torch_load_mmap": "t.pt", "safetensors_load": "s.safetensors",
             "load": "k.pt", "load_mmap": "k.pt", "load_numpy": "k.pt", "mmap_touch": "k.pt"}
SAVE_SUFFIX = {"safetensors_save": ".safetensors", "manager_save": ".run",
               "manager_async": ".run"}


def prepare(workdir: Path, state: str) -> None:
    """Write the files the load operations read, then read them once (warm page cache)."""
    folder = workdir / state
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, sys.argv[1])\n"
        "import torch, torchkeep\nfrom states import make_state\n"
        "from worker import flat_tensors\n"
        "s = make_state(sys.argv[2]); d = sys.argv[3]\n"
        "torch.save(s, d + '/t.pt'); torchkeep.save(s, d + '/k.pt')\n"
        "from safetensors.torch import save_file\n"
        "flat = flat_tensors(s)\n"
        "save_file(flat, d + '/s.safetensors')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(HERE), state, str(folder)], check=True,
                   env=ENV)
    for name in ("t.pt", "k.pt", "s.safetensors"):
        read_through(folder / name)


def run_op(workdir: Path, state: str, op: str) -> dict[str, Any]:
    """One operation in a fresh process. ``op@replace``: the save's path already holds a
    file of the same kind and size (in the page cache, as a previous save leaves it).
    """
    folder = workdir / state
    base, _, variant = op.partition("@")
    if base in LOAD_FILE:
        path = folder / LOAD_FILE[base]
    else:
        path = folder / f"out-{base}{SAVE_SUFFIX.get(base, '.pt')}"
        _remove(path)
        if variant == "replace":
            shutil.copyfile(folder / REPLACED_FILE.get(base, "k.pt"), path)
    settle(path if base in LOAD_FILE or variant == "replace" else None)
    command = [sys.executable, str(HERE / "worker.py"), "--op", base, "--state", state,
               "--path", str(path)]
    if variant == "replace":
        command.append("--replace")
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{state}/{op} failed:\n{proc.stderr[-3000:]}")
    if base not in LOAD_FILE:
        _remove(path)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def inspect_time(workdir: Path, rounds: int, gib: float) -> dict[str, Any]:
    """Whole-process time of ``torchkeep inspect`` on a file of ``gib`` GiB."""
    path = workdir / "inspect.pt"
    code = (
        "import sys, torch, torchkeep\n"
        "n = int(float(sys.argv[2]) * 4)\n"
        "torchkeep.save({f'shard{i}': torch.empty(1 << 26).fill_(i) for i in range(n)}, "
        "sys.argv[1], options=torchkeep.SaveOptions(durable=False))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(gib)], check=True, env=ENV)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torchkeep", "inspect", str(path), "--json"],
                       check=True, capture_output=True, env=ENV)
        times.append(time.perf_counter() - start)
    size = path.stat().st_size
    path.unlink()
    return {"file_bytes": size, "seconds": statistics.median(times), "all": times}


def summarise(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for state, ops in results.items():
        rows = {}
        for op, runs in ops.items():
            row: dict[str, Any] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "min": min(r["seconds"] for r in runs),
                "max": max(r["seconds"] for r in runs),
                "peak_rss_growth": statistics.median(r["peak_rss_growth"] for r in runs),
                "anon_growth": statistics.median(r["anon_growth"] for r in runs),
                "runs": len(runs),
            }
            for key in ("blocked_s", "background_s", "state_bytes"):
                if key in runs[0]:
                    row[key] = statistics.median(r[key] for r in runs)
            for key in ("blocked_s", "background_s"):
                if key in runs[0]:
                    row[key.replace("_s", "_min")] = min(r[key] for r in runs)
            rows[op] = row
        summary[state] = rows
    return summary


def listing_time(workdir: Path, rounds: int, steps: int) -> dict[str, Any]:
    """Whole-process times of ``torchkeep ls`` and ``torchkeep prune`` on a run of
    ``steps`` committed steps (a small state each), against listing the same folder with
    ``os.scandir`` and a stat of every file in a fresh process (the limit: what any tool
    reading the run's metadata must touch)."""
    run = workdir / "run1000"
    code = (
        "import sys, torch, torchkeep\n"
        "options = torchkeep.ManagerOptions(durable=False)\n"
        "m = torchkeep.CheckpointManager(sys.argv[1], options=options)\n"
        "state = {'w': torch.zeros(16), 'b': torch.zeros(4)}\n"
        "for step in range(int(sys.argv[2])):\n"
        "    m.save(step, {'model': state}, metrics={'loss': 1.0 / (step + 1)})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(run), str(steps)], check=True, env=ENV)
    walk = ("import os, sys\n"
            "for e in os.scandir(sys.argv[1]):\n"
            "    if e.is_dir():\n"
            "        [f.stat() for f in os.scandir(e.path)]\n")
    out: dict[str, list[float]] = {"scandir_stat": [], "ls": [], "prune_dry_run": [], "prune": []}
    for _ in range(rounds):
        for key, command in (
            ("scandir_stat", [sys.executable, "-c", walk, str(run)]),
            ("ls", [sys.executable, "-m", "torchkeep", "ls", str(run), "--json"]),
            ("prune_dry_run", [sys.executable, "-m", "torchkeep", "prune", str(run),
                               "--keep-last", "10", "--dry-run", "--json"]),
        ):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=ENV)
            out[key].append(time.perf_counter() - start)
        copy = workdir / "run1000-prune"
        shutil.copytree(run, copy)
        os.sync()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torchkeep", "prune", str(copy), "--keep-last",
                        "10", "--json"], check=True, capture_output=True, env=ENV)
        out["prune"].append(time.perf_counter() - start)
        left = sum(1 for e in os.scandir(copy) if e.is_dir())
        if left != 10:
            raise RuntimeError(f"prune --keep-last 10 left {left} steps")
        shutil.rmtree(copy)
    shutil.rmtree(run)
    return {"steps": steps, **{k: {"median": statistics.median(v), "min": min(v), "all": v}
                               for k, v in out.items()}}


#: (target, ours, theirs, bound) on the ``model`` state; ``theirs=None``: an absolute value
TARGETS = [
    ("save (not durable, call returns) / raw write", "save_nodurable", "raw_write", 1.1),
    ("save (not durable) / torch.save", "save_nodurable", "torch_save", 0.5),
    ("durable save / raw write + fsync", "save", "raw_write_fsync", 1.0),
    ("load(mmap=True) + touch / touch of already-mapped tensors", "load_mmap", "mmap_touch",
     1.2),
    ("load(mmap=True) + touch / torch.load + touch", "load_mmap", "torch_load", 0.1),
    ("load (default: copies) + touch / torch.load + touch", "load", "torch_load", 1.0),
    ("manager save / torchkeep.save", "manager_save", "save", 1.1),
    ("replacing: save (not durable) / torch.save replacing", "save_nodurable@replace",
     "torch_save@replace", 0.5),
    ("replacing: durable save / raw write + fsync replacing", "save@replace",
     "raw_write_fsync@replace", 1.0),
]


#: the one target that is a lower bound
BACKGROUND_SPEED = "async background speed / sync save speed"


def met(name: str, value: float, bound: float) -> bool:
    """Whether ``value`` meets the target ``name``'s ``bound``."""
    return value >= bound if name == BACKGROUND_SPEED else value <= bound


def ratios(
    summary: dict[str, Any], stat: str = "seconds"
) -> list[tuple[str, float, float]]:
    """(target, measured ratio, bound) for each stated target that this run measured, on
    medians (``stat="seconds"``) or on the fastest runs (``stat="min"``)."""
    out: list[tuple[str, float, float]] = []
    model = summary.get("model", {})

    def t(op: str, key: str = stat) -> float | None:
        row = model.get(op)
        return None if row is None or key not in row else float(row[key])

    for name, ours, theirs, bound in TARGETS:
        num, den = t(ours), t(theirs)
        if num is not None and den:
            out.append((name, num / den, bound))
    blocked = "blocked_s" if stat == "seconds" else "blocked_min"
    num, den = t("manager_async", blocked), t("memcpy")
    if num is not None and den:
        out.append(("async save blocking / memcpy", num / den, 1.5))
    background = t("manager_async", "background_s" if stat == "seconds" else "background_min")
    sync = t("manager_save")
    if background and sync:
        out.append((BACKGROUND_SPEED, sync / background, 0.9))
    if "save" in model:
        growth = model["save"]["peak_rss_growth"]
        out.append(("save peak RSS growth (MiB)", growth / 2**20, 64.0))
    many = summary.get("tiny100k", {})
    for op, label in (("save_nodurable", "100k tiny tensors: write, us a tensor"),
                      ("load_mmap", "100k tiny tensors: parse + load, us a tensor")):
        if op in many:
            out.append((label, many[op][stat] / 100_000 * 1e6, 10.0))
    return out


def render(summary: dict[str, Any]) -> str:
    lines = []
    for state, rows in summary.items():
        size = next((r.get("state_bytes") for r in rows.values() if r.get("state_bytes")), None)
        gib = (size or 0) / 2**30
        lines.append(f"\n#### state `{state}`" + (f" ({gib:.2f} GiB)" if size else ""))
        lines.append("")
        lines.append("| operation | median s | fastest s | slowest s | GiB/s (median) | "
                     "peak RSS growth | anon held |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for op, r in rows.items():
            speed = f"{gib / r['seconds']:.2f}" if size and r["seconds"] else ""
            extra = ""
            if "blocked_s" in r:
                extra = f" (blocked {r['blocked_s']:.3f}, background {r['background_s']:.3f})"
            lines.append(f"| {op}{extra} | {r['seconds']:.3f} | {r['min']:.3f} | "
                         f"{r['max']:.3f} | {speed} | {r['peak_rss_growth'] / 2**20:.0f} MiB | "
                         f"{r['anon_growth'] / 2**20:.0f} MiB |")
    lines.append("\n#### targets (met: judged on medians)\n")
    lines.append("| target | median ratio | fastest-run ratio | bound | met |")
    lines.append("|---|---:|---:|---:|---|")
    fastest = {name: value for name, value, _ in ratios(summary, "min")}
    for name, value, bound in ratios(summary):
        best = fastest.get(name)
        lines.append(f"| {name} | {value:.2f} | {'' if best is None else f'{best:.2f}'} | "
                     f"{bound:g} | {'yes' if met(name, value, bound) else 'NO'} |")
    return "\n".join(lines)


#: seconds for ``torchkeep inspect`` of the big file, whole process
INSPECT_BOUND = 0.3


def render_extras(inspect: dict[str, Any] | None, listing: dict[str, Any] | None) -> str:
    lines = []
    if inspect:
        verdict = "met" if inspect["seconds"] <= INSPECT_BOUND else "NOT met"
        lines.append(f"\n`torchkeep inspect` of a {inspect['file_bytes'] / 2**30:.1f} GiB file, "
                     f"whole process: median {inspect['seconds']:.3f} s, fastest "
                     f"{min(inspect['all']):.3f} s (target {INSPECT_BOUND:g} s: {verdict})")
    if listing:
        lines.append(f"\nA run of {listing['steps']} steps, whole process (median / fastest):\n")
        lines.append("| command | median s | fastest s |")
        lines.append("|---|---:|---:|")
        for key, label in (("scandir_stat", "scandir + stat of every file (the limit)"),
                           ("ls", "torchkeep ls --json"),
                           ("prune_dry_run", "torchkeep prune --keep-last 10 --dry-run"),
                           ("prune", "torchkeep prune --keep-last 10 (deletes 990 steps)")):
            lines.append(f"| {label} | {listing[key]['median']:.3f} | {listing[key]['min']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gib", type=float, default=0.5, help="size of the model state")
    parser.add_argument("--huge-gib", type=float, default=8.0, help="size of the huge state")
    parser.add_argument("--huge-rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--states", default="model,tiny,tiny100k,seed,huge")
    parser.add_argument("--caches", default="dropped,full",
                        help="conditions: dropped (caches dropped before each operation), "
                             "full (the page cache filled with other data)")
    parser.add_argument("--ops", default=None, help="comma-separated subset of operations")
    parser.add_argument("--inspect-gib", type=float, default=4.0, help="0 skips it")
    parser.add_argument("--steps", type=int, default=1000, help="ls/prune run size; 0 skips")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, 0.25 GiB, no huge state, 1 GiB inspect, 200 steps")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    compile_torchkeep()  # what an installed torchkeep has (bench/bytecode.py)
    states = args.states.split(",")
    if args.quick:
        args.rounds, args.gib, args.inspect_gib, args.steps = 3, 0.25, 1.0, 200
        states = [s for s in states if s != "huge"]
    ENV["TORCHKEEP_BENCH_GIB"] = str(args.gib)
    ENV["TORCHKEEP_BENCH_HUGE_GIB"] = str(args.huge_gib)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="torchkeep-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    only = set(args.ops.split(",")) if args.ops else None
    for state in states:
        print(f"preparing {state} ...", flush=True)
        prepare(workdir, state)
    results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    shuffler = random.Random(20261129)
    tables = []
    for condition in args.caches.split(","):
        if condition == "dropped" and not can_drop():
            print("caches cannot be dropped here (not root): 'dropped' only syncs", flush=True)
        filler = workdir / "filler"
        if condition == "full":
            # clean pages of other data, up to what the operations leave free
            nbytes = max(0, available_bytes() - int(6 * args.gib * 2**30) - (3 << 30))
            print(f"writing a {nbytes / 2**30:.1f} GiB filler ...", flush=True)
            make_filler(filler, nbytes)
            ENV[FILLER_ENV] = os.environ[FILLER_ENV] = str(filler)
        plan = [(s, op) for s in states for op in STATE_OPS[s]
                if (only is None or op in only) and not (condition == "full"
                                                          and s in DROPPED_ONLY)]
        got = results.setdefault(condition, {})
        for round_ in range(args.rounds):
            # a different order each round: on a virtual disk an fsync right after another
            # operation's large write is slower, so a fixed order would bias fixed positions
            order = [(s, op) for s, op in plan if s != "huge" or round_ < args.huge_rounds]
            shuffler.shuffle(order)
            for state, op in order:
                print(f"{condition} round {round_ + 1}/{args.rounds}  {state:<8} {op}",
                      flush=True)
                got.setdefault(state, {}).setdefault(op, []).append(run_op(workdir, state, op))
        ENV.pop(FILLER_ENV, None)
        os.environ.pop(FILLER_ENV, None)
        filler.unlink(missing_ok=True)
        tables.append(f"\n### caches {condition}\n" + render(summarise(got)))
    inspect = inspect_time(workdir, args.rounds, args.inspect_gib) if args.inspect_gib else None
    listing = listing_time(workdir, args.rounds, args.steps) if args.steps else None
    table = "\n".join(tables) + "\n" + render_extras(inspect, listing)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": {c: summarise(r) for c, r in results.items()}, "inspect": inspect,
                   "listing": listing, "raw": results, "rounds": args.rounds, "gib": args.gib,
                   "huge_gib": args.huge_gib, "table": table}, f, indent=1)
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
