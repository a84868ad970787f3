"""Incremental steps against full steps, torch.save, safetensors, DCP and a raw write.

Three states of 1 GiB and more:

* ``frozen``: a frozen 1 GiB backbone (64 tensors) and a 16 MiB trained head that
  changes completely every step;
* ``emb-hot``: a 1 GiB embedding table (2^21 rows of 128 float32) where 2% of the rows
  change per step, in 10 runs of neighbouring rows (tables sorted by id frequency, where
  hot rows sit together), plus a 1 MiB dense part;
* ``emb-random``: the same table where the 2% are uniformly random rows (ids hashed).

Each round is a fresh process per state and page-cache condition (dropped before every
timed operation; or a page cache full of other data). In it: torch.save, safetensors,
DCP (one process) and a raw write + fsync of the same bytes; a full manager step; then an
incremental run (``keep_last=2``, so retention runs as in a long run) of one full step
and ``--steps`` incremental ones, each after the state changed. Bytes written are the
process's write() bytes (/proc/self/io ``wchar``), not what the manager says. Restores
run in fresh processes: the newest incremental step against the full step, also warm
(the run's files in the page cache), which isolates their CPU cost.

``--chunks`` also sweeps the chunk size (1, 2, 4, 8 MiB): bytes per step, step time,
manifest size and restore time (the measurement CHUNK_BYTES comes from).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pagecache import FILLER_ENV, available_bytes, can_drop, make_filler, read_through, settle

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONWARNINGS="ignore")
STATES = ["frozen", "emb-hot", "emb-random"]
MiB = 1 << 20
ROWS, DIM = 1 << 21, 128  # 1 GiB of float32


def make_state(name: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "frozen":
        backbone = {f"layer{i}": torch.randn(4 * MiB, generator=g) for i in range(64)}
        head = {f"head{i}": torch.randn(MiB, generator=g) for i in range(4)}
        return {"backbone": backbone, "head": head, "step": 0}
    table = torch.randn(ROWS, DIM, generator=g)
    return {"table": table, "dense": torch.randn(MiB // 4, generator=g), "step": 0}


def train_step(name: str, state: dict[str, Any], step: int) -> None:
    """Change the state as a training step would (in place, as optimizers do)."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    state["step"] = step
    if name == "frozen":
        for t in state["head"].values():
            t.add_(torch.randn(t.shape, generator=g))
        return
    table = state["table"]
    changed = ROWS // 50  # 2% of the rows
    if name == "emb-hot":
        run = changed // 10
        for start in torch.randint(0, ROWS - run, (10,), generator=g).tolist():
            table[start : start + run] += 0.01
    else:
        rows = torch.randperm(ROWS, generator=g)[:changed]
        table.index_add_(0, rows, torch.full((changed, DIM), 0.01))
    state["dense"].add_(0.01)


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def timed(fn: Any, warm: Path | None = None) -> dict[str, float]:
    settle(warm)
    before = wchar()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": wchar() - before}


def flat(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif hasattr(value, "numel"):
            out[key] = value
    return out


# -- the worker: one fresh process ---------------------------------------------------------


def save_worker(name: str, workdir: Path, steps: int, chunk: int,
                baselines: bool) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    import torchkeep
    from torchkeep.storage.background import drain

    state = make_state(name)
    tensors = flat(state)
    out: dict[str, Any] = {}

    def raw_write(path: Path) -> None:
        with open(path, "wb") as f:
            for t in tensors.values():
                f.write(memoryview(t.numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())

    if baselines:
        out["raw_write_fsync"] = timed(lambda: raw_write(workdir / "raw.bin"))
        out["torch_save"] = timed(lambda: torch.save(state, workdir / "t.pt"))
        out["safetensors_save"] = timed(lambda: save_file(tensors, workdir / "s.safetensors"))
        out["dcp_save"] = timed(lambda: dcp.save(tensors, checkpoint_id=str(workdir / "dcp"),
                                                 no_dist=True))
        for path in ("raw.bin", "t.pt", "s.safetensors", "dcp"):
            _remove(workdir / path)
    full_run = workdir / "full.run"
    with torchkeep.CheckpointManager(full_run) as mgr:
        out["full_step"] = timed(lambda: mgr.save(0, state))
    options = torchkeep.ManagerOptions(incremental=True, keep_last=2, chunk_bytes=chunk)
    run = workdir / "inc.run"
    rows = []
    with torchkeep.CheckpointManager(run, options=options) as mgr:
        out["incremental_first"] = timed(lambda: mgr.save(0, state))
        for step in range(1, steps + 1):
            train_step(name, state, step)
            drain()  # the last step's clean-up is done before this one is timed
            row = timed(lambda step=step: mgr.save(step, state))
            with open(Path(mgr.step_path(step)) / "manifest.json", "rb") as f:
                raw = f.read()
            row["manifest_bytes"] = len(raw)
            row["reported_written"] = json.loads(raw)["incremental"]["written_bytes"]
            rows.append(row)
    out["incremental_steps"] = rows
    out["incremental_step"] = {
        "seconds": statistics.median(r["seconds"] for r in rows),
        "bytes": statistics.median(r["bytes"] for r in rows),
        "manifest_bytes": statistics.median(r["manifest_bytes"] for r in rows)}
    out["state_bytes"] = sum(t.nbytes for t in tensors.values())
    return out


def load_worker(workdir: Path, which: str, warm: bool) -> dict[str, Any]:
    """Restore the newest step of a run; ``warm``: with every file of the run in the page
    cache (what restoring costs beyond the disk)."""
    import torchkeep

    run = workdir / ("inc.run" if which == "incremental" else "full.run")
    steps = sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))
    manager = torchkeep.CheckpointManager(run)
    settle(None)
    if warm:
        for path in sorted(run.rglob("*")):
            if path.is_file():
                read_through(path)
    t0 = time.perf_counter()
    manager.load(int(steps[-1][5:]))
    return {"seconds": time.perf_counter() - t0, "path": steps[-1]}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# -- the parent -------------------------------------------------------------------------------


def worker(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], env=ENV,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} {min(values):8.3f}"


def render(condition: str, rounds: dict[str, list[dict[str, Any]]],
           loads: dict[str, dict[str, list[dict[str, Any]]]]) -> tuple[str, dict[str, Any]]:
    lines = [f"\n### caches {condition}  (seconds: median, fastest; bytes: median)",
             f"{'state':<11} {'operation':<22} {'median s':>8} {'min s':>8} {'MiB written':>12}"]
    ratios: dict[str, Any] = {}
    for name, runs in rounds.items():
        ops = ["raw_write_fsync", "torch_save", "safetensors_save", "dcp_save", "full_step",
               "incremental_first", "incremental_step"]
        for op in ops:
            rows = [r[op] for r in runs if op in r]
            if not rows:
                continue
            mib = statistics.median(r["bytes"] for r in rows) / MiB
            lines.append(f"{name:<11} {op:<22} {stats([r['seconds'] for r in rows])} "
                         f"{mib:12.1f}")
        for which in ("full", "incremental", "full warm", "incremental warm"):
            rows = loads.get(name, {}).get(which, [])
            if rows:
                lines.append(f"{name:<11} {'restore ' + which:<22} "
                             f"{stats([r['seconds'] for r in rows])} {'':>12}")
        full_t = statistics.median(r["full_step"]["seconds"] for r in runs)
        inc_t = statistics.median(r["incremental_step"]["seconds"] for r in runs)
        full_b = statistics.median(r["full_step"]["bytes"] for r in runs)
        inc_b = statistics.median(r["incremental_step"]["bytes"] for r in runs)
        fastest_t = min(r["incremental_step"]["seconds"] for r in runs) / min(
            r["full_step"]["seconds"] for r in runs)
        got = {"bytes / full step": inc_b / full_b, "time / full step (median)": inc_t / full_t,
               "time / full step (fastest)": fastest_t}
        if "torch_save" in runs[0]:
            got["time / torch.save"] = inc_t / statistics.median(
                r["torch_save"]["seconds"] for r in runs)
        restore = loads.get(name, {})
        for suffix in ("", " warm"):
            full_rows, inc_rows = restore.get("full" + suffix), restore.get(
                "incremental" + suffix)
            if full_rows and inc_rows:
                got[f"restore{suffix} / full restore (median)"] = statistics.median(
                    r["seconds"] for r in inc_rows) / statistics.median(
                    r["seconds"] for r in full_rows)
        ratios[name] = got
        for label, value in got.items():
            lines.append(f"{name:<11} ratio {label:<34} {value:7.3f}")
    return "\n".join(lines), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="incremental steps a round")
    parser.add_argument("--states", default=",".join(STATES))
    parser.add_argument("--caches", default="dropped,full")
    parser.add_argument("--chunks", action="store_true", help="also sweep the chunk size")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "incremental.json"))
    args = parser.parse_args()
    if args.worker:
        kind, name, workdir = args.worker[0], args.worker[1], Path(args.worker[2])
        if kind == "save":
            got = save_worker(name, workdir, int(args.worker[3]), int(args.worker[4]),
                              args.worker[5] == "1")
        else:
            got = load_worker(workdir, args.worker[3], args.worker[4] == "1")
        print(json.dumps(got))
        return 0
    from torchkeep.manager.incremental import CHUNK_BYTES

    root = Path(args.dir or tempfile.mkdtemp(prefix="torchkeep-incremental-"))
    root.mkdir(parents=True, exist_ok=True)
    if not can_drop():
        print("caches cannot be dropped here (not root): 'dropped' only syncs", flush=True)
    tables, summary = [], {}
    for condition in args.caches.split(","):
        filler = root / "filler"
        if condition == "full":
            nbytes = max(0, available_bytes() - (8 << 30))
            print(f"writing a {nbytes / 2**30:.1f} GiB filler ...", flush=True)
            make_filler(filler, nbytes)
            ENV[FILLER_ENV] = os.environ[FILLER_ENV] = str(filler)
        rounds: dict[str, list[dict[str, Any]]] = {}
        loads: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for round_ in range(args.rounds):
            for name in args.states.split(","):
                print(f"{condition} round {round_ + 1}/{args.rounds} {name}", flush=True)
                workdir = root / name
                _remove(workdir)
                workdir.mkdir()
                rounds.setdefault(name, []).append(
                    worker(["save", name, str(workdir), str(args.steps), str(CHUNK_BYTES), "1"]))
                for _ in range(2):  # restores are short: two of each, interleaved
                    for which in ("full", "incremental"):
                        for warm in ("0", "1"):
                            label = which + (" warm" if warm == "1" else "")
                            loads.setdefault(name, {}).setdefault(label, []).append(
                                worker(["load", name, str(workdir), which, warm]))
                _remove(workdir)
        text, ratios = render(condition, rounds, loads)
        tables.append(text)
        summary[condition] = {"ratios": ratios, "rounds": rounds, "loads": loads}
        ENV.pop(FILLER_ENV, None)
        os.environ.pop(FILLER_ENV, None)
        filler.unlink(missing_ok=True)
    if args.chunks:
        lines = ["\n### chunk size (caches dropped, one round)",
                 f"{'state':<11} {'chunk':>6} {'step s':>8} {'MiB written':>12} "
                 f"{'manifest KiB':>13} {'restore s':>10}"]
        sweep = []
        for name in ("frozen", "emb-hot"):
            for chunk in (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB):
                workdir = root / name
                _remove(workdir)
                workdir.mkdir()
                got = worker(["save", name, str(workdir), str(args.steps), str(chunk), "0"])
                load = worker(["load", name, str(workdir), "incremental", "0"])
                step = got["incremental_step"]
                sweep.append({"state": name, "chunk": chunk, **step,
                              "restore": load["seconds"]})
                lines.append(f"{name:<11} {chunk // MiB:>4}Mi {step['seconds']:8.3f} "
                             f"{step['bytes'] / MiB:12.1f} {step['manifest_bytes'] / 1024:13.1f} "
                             f"{load['seconds']:10.3f}")
                _remove(workdir)
        tables.append("\n".join(lines))
        summary["chunk_sweep"] = sweep
    table = "\n".join(tables)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "table": table, "rounds": args.rounds,
                   "steps": args.steps, "chunk_bytes": CHUNK_BYTES}, f, indent=1)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
