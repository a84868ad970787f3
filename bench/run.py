"""torchkeep against torch.save / torch.load / safetensors and the machine's raw limits.

Interleaved rounds of fresh processes (bench/worker.py), the page cache flushed with
sync() before each, the median of every operation, its GiB/s, memory, and the ratios the
speed targets are stated in. ``make bench`` runs it; ``--quick`` for a smaller run.
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
from pagecache import read_through, settle

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONWARNINGS="ignore")

SAVE_OPS = ["raw_write", "raw_write_fsync", "memcpy", "torch_save", "save", "save_nodurable",
            "safetensors_save", "manager_save", "manager_async"]
LOAD_OPS = ["mmap_touch", "torch_load", "torch_load_mmap", "safetensors_load", "load",
            "load_mmap", "load_numpy"]
STATE_OPS = {
    "big": SAVE_OPS + LOAD_OPS,
    "tiny": ["torch_save", "save", "save_nodurable", "torch_load", "load"],
    "seed": ["torch_save", "save", "torch_load", "load"],
}
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
    folder = workdir / state
    if op in LOAD_FILE:
        path = folder / LOAD_FILE[op]
    else:
        path = folder / f"out-{op}{SAVE_SUFFIX.get(op, '.pt')}"
        _remove(path)
    settle(path if op in LOAD_FILE else None)
    proc = subprocess.run([sys.executable, str(HERE / "worker.py"), "--op", op, "--state", state,
                           "--path", str(path)], capture_output=True, text=True, env=ENV,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{state}/{op} failed:\n{proc.stderr[-3000:]}")
    if op not in LOAD_FILE:
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


def ratios(
    summary: dict[str, Any], inspect: dict[str, Any] | None, stat: str = "seconds"
) -> list[tuple[str, float, float]]:
    """(target, measured ratio, bound) for each stated target that this run measured, on
    medians (``stat="seconds"``) or on the fastest runs (``stat="min"``)."""
    out: list[tuple[str, float, float]] = []
    big = summary.get("big", {})

    def t(op: str, key: str = stat) -> float | None:
        row = big.get(op)
        return None if row is None or key not in row else float(row[key])

    def add(name: str, num: float | None, den: float | None, bound: float) -> None:
        if num is not None and den:
            out.append((name, num / den, bound))

    add("save .pt (not durable) / raw write", t("save_nodurable"), t("raw_write"), 1.1)
    add("save .pt (not durable) / torch.save", t("save_nodurable"), t("torch_save"), 0.5)
    add("save .pt durable / raw write + fsync", t("save"), t("raw_write_fsync"), 1.1)
    add("load(mmap=True) + touch / mmap + touch", t("load_mmap"), t("mmap_touch"), 1.2)
    add("load(mmap=True) + touch / torch.load + touch", t("load_mmap"), t("torch_load"), 0.2)
    add("load (default: copies) + touch / torch.load + touch", t("load"), t("torch_load"), 1.0)
    add("manager save / torchkeep.save", t("manager_save"), t("save"), 1.2)
    blocked = "blocked_s" if stat == "seconds" else "blocked_min"
    add("async save blocking / memcpy", t("manager_async", blocked), t("memcpy"), 1.5)
    bg = t("manager_async", "background_s" if stat == "seconds" else "background_min")
    if bg and t("manager_save"):
        out.append(("async background speed / sync save speed", t("manager_save") / bg, 0.9))
    tiny = summary.get("tiny", {})
    for ours, theirs, label in (("save", "torch_save", "5000 tiny: save / torch.save"),
                                ("load", "torch_load", "5000 tiny: load / torch.load")):
        if ours in tiny and theirs in tiny:
            out.append((label, tiny[ours][stat] / tiny[theirs][stat], 0.5))
    if big.get("save"):
        growth = big["save"]["peak_rss_growth"]
        out.append(("save peak RSS growth (MiB; bound 64)", growth / 2**20, 64.0))
    if inspect:
        out.append(("inspect 4 GiB file, whole process (s)", inspect["seconds"], 0.3))
    return out


def render(summary: dict[str, Any], inspect: dict[str, Any] | None) -> str:
    lines = []
    for state, rows in summary.items():
        size = next((r.get("state_bytes") for r in rows.values() if r.get("state_bytes")), None)
        gib = (size or 0) / 2**30
        lines.append(f"\n### state `{state}`" + (f" ({gib:.2f} GiB)" if size else ""))
        lines.append("")
        lines.append("| operation | median s | min-max s | GiB/s | peak RSS growth | anon held |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for op, r in rows.items():
            speed = f"{gib / r['seconds']:.2f}" if size and r["seconds"] else ""
            extra = ""
            if "blocked_s" in r:
                extra = f" (blocked {r['blocked_s']:.3f}, background {r['background_s']:.3f})"
            lines.append(f"| {op}{extra} | {r['seconds']:.3f} | {r['min']:.3f}-{r['max']:.3f} | "
                         f"{speed} | {r['peak_rss_growth'] / 2**20:.0f} MiB | "
                         f"{r['anon_growth'] / 2**20:.0f} MiB |")
    if inspect:
        lines.append(f"\n`torchkeep inspect` of a {inspect['file_bytes'] / 2**30:.1f} GiB file, "
                     f"whole process: median {inspect['seconds']:.3f} s")
    lines.append("\n### targets (met: judged on medians)\n")
    lines.append("| target | median ratio | fastest-run ratio | bound | met |")
    lines.append("|---|---:|---:|---:|---|")
    fastest = {name: value for name, value, _ in ratios(summary, inspect, "min")}
    for name, value, bound in ratios(summary, inspect):
        met = value >= bound if "background speed" in name else value <= bound
        best = fastest.get(name)
        lines.append(f"| {name} | {value:.2f} | {'' if best is None else f'{best:.2f}'} | "
                     f"{bound:g} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the big state")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--states", default="big,tiny,seed")
    parser.add_argument("--ops", default=None, help="comma-separated subset of operations")
    parser.add_argument("--inspect-gib", type=float, default=4.0, help="0 skips it")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 0.25 GiB, 1 GiB inspect")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    compile_torchkeep()  # what an installed torchkeep has (bench/bytecode.py)
    if args.quick:
        args.rounds, args.gib, args.inspect_gib = 3, 0.25, 1.0
    ENV["TORCHKEEP_BENCH_GIB"] = str(args.gib)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="torchkeep-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    states = args.states.split(",")
    only = set(args.ops.split(",")) if args.ops else None
    plan = [(s, op) for s in states for op in STATE_OPS[s] if only is None or op in only]
    for state in states:
        print(f"preparing {state} ...", flush=True)
        prepare(workdir, state)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    shuffler = random.Random(20261129)
    for round_ in range(args.rounds):
        # a different order each round: on a virtual disk an fsync right after another
        # operation's large write is slower, so a fixed order would bias fixed positions
        order = list(plan)
        shuffler.shuffle(order)
        for state, op in order:
            print(f"round {round_ + 1}/{args.rounds}  {state:<5} {op}", flush=True)
            results.setdefault(state, {}).setdefault(op, []).append(run_op(workdir, state, op))
    inspect = inspect_time(workdir, args.rounds, args.inspect_gib) if args.inspect_gib else None
    summary = summarise(results)
    table = render(summary, inspect)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "inspect": inspect, "raw": results, "rounds": args.rounds,
                   "gib": args.gib, "table": table}, f, indent=1)
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
