"""check-resume under torchrun: 2 gloo ranks, sharded steps, gradients all-reduced.

``torchrun --standalone --nproc-per-node 2 tests/resume_dist_script.py [good|no-rng]``.
"""

import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import torchkeep


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(100 + rank)
    random.seed(rank)
    np.random.seed(rank)
    variant = sys.argv[1] if len(sys.argv) > 1 else "good"
    state = {"model": model, "optimizer": opt, "step": -1}
    if variant == "good":
        state["rng"] = torchkeep.RNGState()
    with torchkeep.CheckpointManager("runs/dist", keep_last=2) as mgr:
        if mgr.latest_step() is not None:
            mgr.restore(state)
        for step in range(int(state["step"]) + 1, 12):
            x = torch.randn(4, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
            opt.step()
            state["step"] = step
            mgr.save(step, state, metrics={"loss": loss.item()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
