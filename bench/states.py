"""The benchmark's states, built the same way in every process."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def transformer(gib: float = 0.5, layers: int = 55) -> dict[str, torch.Tensor]:
    """A transformer-like state dict of float32 and bfloat16 tensors.

    ``layers`` blocks of 8 tensors (attention and MLP weights, biases, norms; every third
    block's MLP weights in bfloat16) plus a bfloat16 embedding: 441 tensors, about ``gib``
    GiB (the width is scaled to it). Tensors are filled with a per-tensor constant: values
    do not change any timing, and filling is much faster than random init.
    """
    width = max(64, int((gib * 2**30 / (48 * layers + 16)) ** 0.5) // 64 * 64)
    state: dict[str, torch.Tensor] = {}
    shapes = [("attn.qkv.weight", (3 * width, width)), ("attn.out.weight", (width, width)),
              ("mlp.fc1.weight", (4 * width, width)), ("mlp.fc2.weight", (width, 4 * width)),
              ("ln1.weight", (width,)), ("ln1.bias", (width,)), ("mlp.fc1.bias", (4 * width,)),
              ("mlp.fc2.bias", (width,))]
    for layer in range(layers):
        for name, shape in shapes:
            half = layer % 3 == 2 and name.startswith("mlp.") and name.endswith("weight")
            dtype = torch.bfloat16 if half else torch.float32
            state[f"layers.{layer}.{name}"] = torch.empty(shape, dtype=dtype).fill_(
                layer * 0.01 + 0.5)
    state["embed.weight"] = torch.empty(8 * width - 192, width, dtype=torch.bfloat16).fill_(0.25)
    return state


def tiny(count: int = 5000) -> dict[str, torch.Tensor]:
    """``count`` tiny tensors (16 floats each)."""
    return {f"block{i // 10}.p{i % 10}": torch.full((16,), float(i)) for i in range(count)}


def seed() -> dict[str, Any]:
    """The seed model's tutorial checkpoint dict, after a few SGD steps."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from torchkeep.demo.model import SeedNet, make_optimizer

    torch.manual_seed(0)
    model = SeedNet()
    optimizer = make_optimizer(model)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
    return {"epoch": 2, "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(), "loss": 0.125}


def make_state(name: str) -> Any:
    """``model`` (441 tensors, $TORCHKEEP_BENCH_GIB GiB, default 0.5), ``huge`` (the same
    shape at $TORCHKEEP_BENCH_HUGE_GIB, default 8), ``tiny`` (5000 tensors), ``tiny100k``
    (100,000 tensors) or ``seed``."""
    if name == "model":
        return transformer(float(os.environ.get("TORCHKEEP_BENCH_GIB", "0.5")))
    if name == "huge":
        return transformer(float(os.environ.get("TORCHKEEP_BENCH_HUGE_GIB", "8")))
    if name == "tiny":
        return tiny()
    if name == "tiny100k":
        return tiny(100_000)
    if name == "seed":
        return seed()
    raise SystemExit(f"unknown state {name}")
