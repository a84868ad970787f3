"""A small but honest training run of the seed model, checkpointed with CheckpointManager.

Everything that makes a resumed run drift is in it: a shuffled DataLoader, dropout, random
augmentation drawn from Python's ``random`` and numpy's global generator, an LR
scheduler, momentum. Run as ``python -m torchkeep.demo.train RUN_DIR`` it prints one
line per step and resumes from the latest commit in RUN_DIR when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import torchkeep
from torchkeep.demo.model import SeedNet, make_optimizer

__all__ = ["SyntheticCIFAR", "TrainConfig", "TrainResult", "parameter_digest", "train"]


class SyntheticCIFAR(Dataset[tuple[torch.Tensor, int]]):
    """CIFAR-shaped images with learnable class patterns, generated from a seed.

    Items are augmented with a random horizontal flip (Python ``random``) and Gaussian
    noise (numpy's global generator), so resuming needs both generators restored.
    """

    def __init__(self, size: int = 512, seed: int = 1234) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (size,), generator=generator)
        patterns = torch.randn(10, 3, 32, 32, generator=generator)
        noise = torch.randn(size, 3, 32, 32, generator=generator)
        self.images = patterns[self.labels] + 0.8 * noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if random.random() < 0.5:
            image = image.flip(-1)
        jitter = np.random.normal(0.0, 0.05, size=(3, 1, 1)).astype(np.float32)
        return image + torch.from_numpy(jitter), int(self.labels[index])


@dataclass(frozen=True)
class TrainConfig:
    """The run: data size, epochs, batch size, how often to commit, seeds."""

    samples: int = 512
    epochs: int = 3
    batch_size: int = 32
    save_every: int = 5
    seed: int = 0
    keep_last: int = 2

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the last partial batch is kept)."""
        return -(-self.samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run."""
        return self.epochs * self.steps_per_epoch


@dataclass
class TrainResult:
    """What a run did: the loss at each step it ran, where it started, its final weights."""

    losses: dict[int, float]
    resumed_from: int | None
    digest: str
    model: SeedNet


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(
    config: TrainConfig,
    run_dir: str,
    *,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    guard: torchkeep.PreemptionGuard | None = None,
) -> TrainResult:
    """Train, committing every ``config.save_every`` steps; resume from RUN_DIR if it has a
    committed step. ``stop_after`` ends the run after that step (as a kill would, but
    cleanly); a preemption ``guard`` that fires makes it save and stop at the next step.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(config, run_dir, stop_after, on_step, guard)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(
    config: TrainConfig,
    run_dir: str,
    stop_after: int | None,
    on_step: Callable[[int, float], None] | None,
    guard: torchkeep.PreemptionGuard | None,
) -> TrainResult:
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    dataset = SyntheticCIFAR(config.samples, seed=1234)
    sampler = torchkeep.ResumableSampler(dataset, seed=config.seed)
    # The loader draws a seed from its generator every time an iterator starts; with its own
    # generator those draws do not shift the global stream that dropout uses.
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=0,
                        generator=torch.Generator().manual_seed(config.seed))
    model = SeedNet()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.steps_per_epoch,
                                                gamma=0.5)
    state: dict[str, Any] = {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler,
        "rng": torchkeep.RNGState(), "step": -1,
    }
    losses: dict[int, float] = {}
    with torchkeep.CheckpointManager(run_dir, keep_last=config.keep_last, keep_best=1,
                                     best_metric="loss") as manager:
        resumed_from = manager.restore(state) if manager.latest_step() is not None else None
        step = int(state["step"])
        window: list[float] = []
        while step + 1 < config.total_steps:
            epoch = (step + 1) // config.steps_per_epoch
            sampler.set_epoch(epoch)
            for images, labels in loader:
                step += 1
                optimizer.zero_grad()
                inputs = F.dropout(images, p=0.1, training=True)
                loss = F.cross_entropy(model(inputs), labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = loss.item()
                losses[step] = value
                window.append(value)
                if on_step is not None:
                    on_step(step, value)
                preempted = guard is not None and guard.requested
                last = step + 1 == config.total_steps
                if (step + 1) % config.save_every == 0 or preempted or last:
                    state["step"] = step
                    manager.save(step, state, metrics={"loss": sum(window) / len(window)})
                    window = []
                if preempted or step == stop_after or last:
                    break
            if (guard is not None and guard.requested) or step == stop_after:
                break
    return TrainResult(losses, resumed_from, parameter_digest(model), model)


def main(argv: list[str] | None = None) -> int:
    """``python -m torchkeep.demo.train RUN_DIR [--json OUT]``: train with progress lines."""
    parser = argparse.ArgumentParser(prog="python -m torchkeep.demo.train")
    parser.add_argument("run_dir")
    parser.add_argument("--json", help="write losses and the parameter digest here")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    args = parser.parse_args(argv)
    config = TrainConfig(**json.loads(args.config))

    def report(step: int, loss: float) -> None:
        print(f"step {step} loss {loss:.6f}", flush=True)

    with torchkeep.PreemptionGuard() as guard:
        result = train(config, args.run_dir, stop_after=args.stop_after, on_step=report,
                       guard=guard)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"losses": result.losses, "resumed_from": result.resumed_from,
                       "digest": result.digest, "config": asdict(config),
                       "preempted": guard.received}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
