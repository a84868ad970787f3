"""The distributed demo: SIGKILL a 2-rank FSDP2 run, resume it, reshard it to 3 ranks.

Four launches of real gloo ranks (``torchkeep.distributed.launch.run_ranks``, forked
processes): an uninterrupted 2-rank reference run; a 2-rank run saving every step with
the CheckpointManager that the parent SIGKILLs (both rank processes) while they train;
two new rank processes that resume it from its latest commit and train to the end; and
three rank processes that load the resumed run's last step (DCP reshards 2 -> 3). The
resumed losses, the final weights and optimizer state, and what 3 ranks load must all be
bit-identical to the reference.

Rank functions are module-level (the forkserver imports them by name); what they report
travels through their return values and through small per-rank progress files the
parent polls (how it knows the pids, the steps committed, and when to kill).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

__all__ = ["DemoConfig", "compare_states", "run_distributed_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains: the same on every launch (the seed only picks the kill)."""

    steps: int = 24
    world: int = 2
    reshard_world: int = 3
    #: an MLP with odd widths, so FSDP2's row shards are uneven on 2 and on 3 ranks
    sizes: tuple[int, ...] = (97, 511, 467, 29)
    dropout: float = 0.1
    samples: int = 512
    batch: int = 16  # per rank
    lr: float = 3e-3
    keep_last: int = 3
    data_seed: int = 1234

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // (self.world * self.batch)

    def parameters(self) -> int:
        return sum(a * b + b for a, b in itertools.pairwise(self.sizes))


# -- what each rank runs -----------------------------------------------------------------


def _build(config: DemoConfig, world: int, init_seed: int) -> tuple[Any, Any]:
    """The MLP, every Linear (and the whole) wrapped with FSDP2 over ``world`` ranks."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(init_seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(config.sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(config.sizes) - 2:
            layers += [torch.nn.ReLU(), torch.nn.Dropout(config.dropout)]
    model = torch.nn.Sequential(*layers)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)


def _dataset(config: DemoConfig) -> tuple[Any, Any]:
    """Synthetic features and the labels a fixed random teacher gives them."""
    import torch

    g = torch.Generator().manual_seed(config.data_seed)
    x = torch.randn(config.samples, config.sizes[0], generator=g)
    teacher = torch.randn(config.sizes[0], config.sizes[-1], generator=g)
    return x, (x @ teacher).argmax(dim=1)


def _full_state(model: Any, opt: Any) -> dict[str, Any]:
    """Model and optimizer state as full tensors (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    return {"model": get_model_state_dict(model, options=full),
            "optimizer": get_optimizer_state_dict(model, opt, options=full)}


class _Progress:
    """One rank's progress file: a line per event, flushed, for the parent to poll."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.file = open(os.path.join(folder, f"rank{rank}.txt"), "a",  # noqa: SIM115
                         encoding="utf-8") if folder else None

    def write(self, *words: object) -> None:
        if self.file is not None:
            self.file.write(" ".join(map(str, words)) + f" {time.monotonic():.6f}\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _train_rank(rank: int, world: int, config: DemoConfig, mode: str, run_dir: str | None,
                progress_dir: str | None) -> dict[str, Any]:
    """One rank of a training run. ``mode``: "reference" (no checkpoints), "killed" (save
    every step until the parent SIGKILLs this process) or "resume" (restore the latest
    step first). Returns this rank's losses by step; rank 0 adds the final full state."""
    import numpy as np
    import torch

    import torchkeep

    progress = _Progress(progress_dir, rank)
    progress.write("pid", os.getpid())
    model, opt = _build(config, world, init_seed=0)
    x_all, y_all = _dataset(config)
    sampler = torchkeep.ResumableSampler(config.samples, seed=7, rank=rank, world_size=world)
    rng = torchkeep.RNGState()
    random.seed(10 + rank)  # every global stream differs per rank: restoring them matters
    np.random.seed(20 + rank)
    torch.manual_seed(30 + rank)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "sampler": sampler,
                             "rng": rng, "step": -1}
    result: dict[str, Any] = {"losses": {}, "pid": os.getpid()}
    manager = None
    start = 0
    if mode != "reference":
        assert run_dir is not None
        with warnings.catch_warnings():  # leftovers of the killed save: reported below
            warnings.simplefilter("ignore")
            manager = torchkeep.CheckpointManager(run_dir, keep_last=config.keep_last)
        result["cleaned"] = manager.cleaned
        if mode == "resume":
            start = manager.restore(state) + 1
    result["start"] = start
    try:
        for step in range(start, config.steps):
            progress.write("train", step)
            epoch = step // config.steps_per_epoch
            if sampler.epoch != epoch:
                sampler.set_epoch(epoch)
            index = torch.tensor(list(itertools.islice(iter(sampler), config.batch)))
            g = torch.Generator().manual_seed(1_000 * step + rank)  # depends on (step, rank)
            x = x_all[index] + 0.05 * torch.randn(len(index), config.sizes[0], generator=g)
            x = x + 0.02 * torch.randn_like(x)  # torch's global generator
            x = x * float(np.random.uniform(0.9, 1.1))  # numpy's
            if random.random() < 0.5:  # python's
                x = x.flip(1)
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y_all[index])  # dropout too
            opt.zero_grad()
            loss.backward()
            opt.step()
            result["losses"][step] = loss.item()
            state["step"] = step
            if manager is not None:
                progress.write("save", step)
                manager.save(step, state, metrics={"loss": loss.item()})
                progress.write("committed", step)
            else:
                progress.write("done", step)
        if manager is not None:
            result["steps"] = manager.all_steps()
        final = _full_state(model, opt)
        if rank == 0:
            result["state"] = final
    finally:
        if manager is not None:
            manager.close()
        progress.close()
    return result


def _reshard_rank(rank: int, world: int, config: DemoConfig, run_dir: str) -> dict[str, Any]:
    """Load the latest step on ``world`` ranks into a differently initialised model and a
    fresh optimizer; rank 0 returns the full state it now holds."""
    import torchkeep

    model, opt = _build(config, world, init_seed=99)
    sampler = torchkeep.ResumableSampler(config.samples, seed=7, rank=rank, world_size=world)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "sampler": sampler,
                             "rng": torchkeep.RNGState(), "step": -1}
    with warnings.catch_warnings(record=True) as caught, \
            torchkeep.CheckpointManager(run_dir) as manager:
        warnings.simplefilter("always")
        step = manager.restore(state)
    final = _full_state(model, opt)
    return {"step": step, "saved_step": state["step"], "sampler": sampler.state_dict(),
            "warnings": [str(w.message) for w in caught],
            "state": final if rank == 0 else None}


# -- comparing -------------------------------------------------------------------------


def compare_states(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two state trees differ (tensors: dtype, shape, ``torch.equal`` and their
    bytes, so -0.0 is not 0.0; other values: type and ``==``); an empty list when they are
    bit-identical."""
    import torch

    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            other = b if isinstance(a, torch.Tensor) else a
            return [f"{where}: a tensor and a {type(other).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        if not torch.equal(a, b):
            return [f"{where}: values differ"]
        bits = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
        return [] if torch.equal(*bits) else [f"{where}: equal values, different bits"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ ({sorted(map(str, a.keys() ^ b.keys()))})"]
        return [d for k in a for d in compare_states(a[k], b[k], f"{path}.{k}" if path else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in compare_states(x, y, f"{path}[{i}]")]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} vs {b!r}"]


def _count_tensors(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, dict):
        return sum(_count_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_count_tensors(v) for v in tree)
    return 0


# -- the parent ------------------------------------------------------------------------


def _values(results: list[Any], label: str) -> list[Any]:
    for r in results:
        if not r.ok:
            raise RuntimeError(f"{label}: rank {r.rank} failed (exit {r.exitcode}): {r.error}")
    return [r.value for r in results]


def _read_events(progress_dir: str, world: int) -> list[list[list[str]]]:
    events = []
    for rank in range(world):
        try:
            with open(os.path.join(progress_dir, f"rank{rank}.txt"), encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits
        events.append([line.split() for line in complete.splitlines() if line])
    return events


def _launch(config: DemoConfig, mode: str, run_dir: str | None, progress_dir: str,
            label: str, echo: Callable[[str], None], kill_at: int | None = None,
            mid_save: float | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Run one 2-rank training launch with a progress bar. With ``kill_at``, SIGKILL both
    rank processes in step ``kill_at + 1``: as soon as rank 0 reports step ``kill_at``
    committed (they are training), or with ``mid_save`` (a fraction) that far into rank
    0's save of step ``kill_at + 1``, measured against its earlier saves."""
    from torchkeep.distributed.launch import run_ranks

    os.makedirs(progress_dir)
    done_word = "done" if mode == "reference" else "committed"
    interactive = os.isatty(2)
    kill: dict[str, Any] = {}
    last = -1
    with ThreadPoolExecutor(1) as pool, \
            tqdm(total=config.steps, desc=label, unit="step", leave=True,
                 disable=not interactive,
                 bar_format="{desc:<36} {bar:20} {n_fmt:>2}/{total_fmt} steps") as bar:
        future = pool.submit(run_ranks, config.world, _train_rank, config, mode, run_dir,
                             progress_dir, timeout=300.0, group_timeout=60.0)
        while not future.done():
            events = _read_events(progress_dir, config.world)
            steps = [int(e[1]) for e in events[0] if e[0] == done_word]
            if steps and steps[-1] != last:
                last = steps[-1]
                bar.n = last + 1
                bar.refresh()
            if kill_at is not None and not kill and _due(events[0], kill_at, mid_save):
                pids = [int(e[1]) for rank_events in events for e in rank_events
                        if e[0] == "pid"]
                if len(pids) == config.world:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    kill = {"pids": pids, "at": time.monotonic()}
            threading.Event().wait(0.002)
        results = future.result()
    if not interactive:
        echo(f"{label:<36} {last + 1:>2}/{config.steps} steps")
    if kill_at is None:
        return _values(results, label), {}
    if not kill:
        raise RuntimeError(f"{label}: the run ended before step {kill_at} "
                           f"({[r.error for r in results]})")
    rank0 = _read_events(progress_dir, config.world)[0]
    kill["doing"] = _doing(rank0, kill["at"])
    kill["save_s"] = _save_seconds(rank0)
    kill["exits"] = [r.exitcode for r in results]
    return [], kill


def _save_seconds(events: list[list[str]]) -> float | None:
    """The median time rank 0's completed saves took."""
    began = {e[1]: float(e[2]) for e in events if e[0] == "save"}
    took = sorted(float(e[2]) - began[e[1]] for e in events
                  if e[0] == "committed" and e[1] in began)
    return took[len(took) // 2] if took else None


def _due(events: list[list[str]], kill_at: int, mid_save: float | None) -> bool:
    """Whether the kill is due, from rank 0's events."""
    if mid_save is None:
        return ["committed", str(kill_at)] in [e[:2] for e in events]
    began = [float(e[2]) for e in events if e[:2] == ["save", str(kill_at + 1)]]
    typical = _save_seconds(events)
    return bool(began) and typical is not None and \
        time.monotonic() >= began[0] + mid_save * typical


def _doing(events: list[list[str]], at: float) -> str:
    """What rank 0 had last reported when the kill was sent."""
    if not events:
        return "starting"
    word, step, when = events[-1][0], events[-1][1], float(events[-1][2])
    if word == "save":
        return f"saving step {step} ({1000 * (at - when):.0f} ms into it)"
    return {"train": f"training step {step}",
            "committed": f"between steps (step {step} just committed)"}.get(word, word)


def run_distributed_demo(echo: Callable[[str], None] = print, *, seed: int | None = None,
                         steps: int = 24) -> bool:
    """Run the four launches and print the comparisons; True when everything is
    bit-identical."""
    from torchkeep.distributed.launch import run_ranks
    from torchkeep.manager.rundir import RunDirectory

    config = DemoConfig(steps=steps)
    rng = random.Random(seed)
    kill_at = rng.randrange(max(1, config.steps // 3), max(2, 2 * config.steps // 3))
    # the kill lands in step kill_at + 1: in its training, or part way into its save
    mid_save = rng.choice([None, round(rng.uniform(0.1, 0.9), 2)])
    started = time.perf_counter()
    timings: list[tuple[str, float]] = []
    sizes = " -> ".join(map(str, config.sizes))
    echo(f"MLP {sizes} with dropout ({config.parameters():,} parameters), FSDP2 "
         f"(fully_shard on a {config.world}-rank CPU mesh, gloo), AdamW, "
         f"{config.steps} steps x {config.world} ranks x {config.batch} samples")
    echo("each step's batch depends on (step, rank): ResumableSampler(rank=, world_size=) "
         "slices, a (step, rank) generator, plus torch/numpy/python global randomness "
         "and dropout, per rank")
    echo(f"CheckpointManager(keep_last={config.keep_last}) on every rank, sharded DCP "
         "commit every step, RNGState and sampler in the state\n")
    with tempfile.TemporaryDirectory(prefix="torchkeep-ddemo-") as tmp:
        run_dir = os.path.join(tmp, "run")
        t = time.perf_counter()
        reference, _ = _launch(config, "reference", None, os.path.join(tmp, "p1"),
                               "1. uninterrupted run, 2 ranks", echo)
        timings.append(("uninterrupted run", time.perf_counter() - t))
        t = time.perf_counter()
        _, kill = _launch(config, "killed", run_dir, os.path.join(tmp, "p2"),
                          "2. run, SIGKILL mid-training", echo, kill_at=kill_at,
                          mid_save=mid_save)
        timings.append(("killed run", time.perf_counter() - t))
        committed = RunDirectory(run_dir, create=False).steps()
        leftovers = sorted(n for n in os.listdir(run_dir) if n.startswith("."))
        t = time.perf_counter()
        resumed, _ = _launch(config, "resume", run_dir, os.path.join(tmp, "p3"),
                             "3. new processes resume, 2 ranks", echo)
        timings.append(("resumed run", time.perf_counter() - t))
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = _values(run_ranks(config.reshard_world, _reshard_rank, config, run_dir,
                                       timeout=300.0, group_timeout=60.0),
                             f"load on {config.reshard_world} ranks")
        timings.append((f"load on {config.reshard_world} ranks", time.perf_counter() - t))
        final_steps = RunDirectory(run_dir, create=False).steps()

    echo(f"\nkilled: the parent sent SIGKILL to both rank processes (pids "
         f"{', '.join(map(str, kill['pids']))}) "
         + (f"once step {kill_at} was committed" if mid_save is None else
            f"{mid_save:.0%} of a typical save ({1000 * (kill['save_s'] or 0):.0f} ms) into "
            f"the save of step {kill_at + 1}")
         + f"; rank 0 was {kill['doing']}; exit codes {kill['exits']}")
    echo(f"committed steps on disk: {', '.join(map(str, committed))} (keep_last="
         f"{config.keep_last})" + (f"; uncommitted leftovers: {', '.join(leftovers)}"
                                   if leftovers else ""))
    start = resumed[0]["start"]
    cleaned = resumed[0].get("cleaned") or []
    echo(f"resumed from step {start - 1}: steps {start}..{config.steps - 1} ran again in new "
         "processes" + (f"; the manager removed {len(cleaned)} leftover(s) when it opened"
                        if cleaned else "") + "\n")

    ok = True
    echo(f"{'step':>5}  {'loss, uninterrupted':>21}  {'loss, resumed':>21}  "
         f"bit-identical (rank 0 shown, all {config.world} ranks compared)")
    shown = list(range(start, config.steps))
    for i, step in enumerate(shown):
        same = all(r["losses"][step] == n["losses"][step]
                   for r, n in zip(reference, resumed, strict=True))
        ok = ok and same
        if len(shown) > 8 and 4 <= i < len(shown) - 3:
            if i == 4:
                echo(f"{'...':>5}")
            continue
        a, b = reference[0]["losses"][step], resumed[0]["losses"][step]
        echo(f"{step:>5}  {a:>21.17f}  {b:>21.17f}  {'yes' if same else 'NO'}")
    echo(f"\nall {config.world} x {len(shown)} resumed losses bit-identical: "
         f"{'yes' if ok else 'NO'}")

    ref_state = reference[0]["state"]
    differences = compare_states(ref_state, resumed[0]["state"])
    tensors = _count_tensors(ref_state)
    echo(f"final model + optimizer state ({tensors} full tensors, torch.equal each), "
         f"uninterrupted vs resumed: bit-identical: {'yes' if not differences else 'NO'}")
    for d in differences[:5]:
        echo(f"  differs: {d}")
    ok = ok and not differences

    last = final_steps[-1]
    r0 = loaded[0]
    re_diff = compare_states(resumed[0]["state"], r0["state"])
    wrong_step = [v["step"] for v in loaded if v["step"] != last or v["saved_step"] != last]
    echo(f"step {last} saved on {config.world} ranks, loaded on {config.reshard_world} "
         f"(DCP resharding, fresh model and optimizer): full state bit-identical: "
         f"{'yes' if not re_diff and not wrong_step else 'NO'}")
    for d in re_diff[:5]:
        echo(f"  differs: {d}")
    position = (last + 1 - (last // config.steps_per_epoch) * config.steps_per_epoch) \
        * config.world * config.batch
    sampler_ok = all(v["sampler"].get("start") == position and v["sampler"]["position"] == 0
                     for v in loaded)
    echo(f"samplers resharded {config.world} -> {config.reshard_world}: the "
         f"{config.reshard_world} ranks continue "
         f"at global position {loaded[0]['sampler'].get('start')} of epoch "
         f"{loaded[0]['sampler']['epoch']} (expected {position}): {'yes' if sampler_ok else 'NO'}")
    ok = ok and not re_diff and not wrong_step and sampler_ok

    echo("\ntimings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings))
    echo(f"demo took {time.perf_counter() - started:.1f} s")
    return ok
