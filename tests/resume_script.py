"""A small training script for the check-resume tests, good or broken on purpose.

``python tests/resume_script.py RUN_DIR --variant V [--workers N] [--async]``. It trains
as users do: dropout, a shuffled loader, random augmentation, StepLR, AdamW, a grad scaler
(bfloat16 autocast on the CPU); it commits every step through CheckpointManager and
resumes from the latest commit. The variants break one thing each:

good          everything in the state; with workers, augmentation from (seed, epoch, index)
no-rng        no torchkeep.RNGState() in the state
loader        a RandomSampler (not resumable) instead of ResumableSampler
scheduler     the LR scheduler is created after the restore and is not in the state
outside       a step counter outside the state scales the loss
clock         the loss depends on the clock (not deterministic)
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

import torchkeep

SEED = 7
COUNTER = {"calls": 0}  # the "outside" variant's counter: not in the state


class Data(Dataset[tuple[torch.Tensor, int]]):
    """64 samples; augmentation from the global generators (no workers) or from
    (seed, epoch, index) (workers, whose streams restart on resume)."""

    def __init__(self, per_index: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = torch.randint(0, 4, (64,), generator=g)
        self.per_index = per_index
        self.epoch = 0

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        if self.per_index:
            g = torch.Generator().manual_seed(SEED * 1_000_003 + self.epoch * 1009 + i)
            noise = 0.1 * torch.randn(8, generator=g)
        else:
            noise = 0.1 * torch.randn(8) + float(np.random.normal(0, 0.05))
            if random.random() < 0.5:
                x = -x
        return x + noise, int(self.y[i])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--variant", default="good")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    train(**vars(parser.parse_args()))


def train(run_dir: str = "runs/fn", variant: str = "good", workers: int = 0,
          async_save: bool = False, epochs: int = 3) -> None:
    """The training loop (a function too, for torchkeep.testing.check_resume)."""
    args = argparse.Namespace(run_dir=run_dir, variant=variant, workers=workers,
                              async_save=async_save, epochs=epochs)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    data = Data(per_index=args.workers > 0)
    sampler: torch.utils.data.Sampler[int]
    if args.variant == "loader":
        sampler = RandomSampler(data)
    else:
        sampler = torchkeep.ResumableSampler(data, seed=SEED)
    loader = DataLoader(data, batch_size=8, sampler=sampler, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(SEED))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    state: dict = {"model": model, "optimizer": optimizer, "scaler": scaler, "step": -1}
    scheduler = None
    if args.variant != "scheduler":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        state["scheduler"] = scheduler
    if args.variant != "loader":
        state["sampler"] = sampler
    if args.variant != "no-rng":
        state["rng"] = torchkeep.RNGState()
    with torchkeep.CheckpointManager(args.run_dir, keep_last=2,
                                     async_save=args.async_save) as mgr:
        if mgr.latest_step() is not None:
            mgr.restore(state)
        if scheduler is None:  # created after the restore: its schedule starts over
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda e: min(1.0, (e + 1) / 10))
        step = int(state["step"])
        steps_per_epoch = len(data) // 8
        while step + 1 < args.epochs * steps_per_epoch:
            epoch = (step + 1) // steps_per_epoch
            data.epoch = epoch
            if isinstance(sampler, torchkeep.ResumableSampler):
                sampler.set_epoch(epoch)
            consumed = (step + 1 - epoch * steps_per_epoch) * 8
            for x, y in loader:
                step += 1
                consumed += len(y)
                COUNTER["calls"] += 1
                optimizer.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                if args.variant == "outside":
                    loss = loss * (1.0 + 0.01 * COUNTER["calls"])
                if args.variant == "clock":
                    loss = loss * (1.0 + (time.perf_counter_ns() % 1000) * 1e-7)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if isinstance(sampler, torchkeep.ResumableSampler) and args.workers:
                    sampler.set_consumed(consumed)
                state["step"] = step
                mgr.save(step, state, metrics={"loss": loss.item()})
                if (step + 1) % steps_per_epoch == 0:
                    break


if __name__ == "__main__":
    main()
