"""Shared fixtures: the seed model's checkpoint dict, paths, torch-free subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest

warnings.filterwarnings("ignore", message=".*ComplexHalf support is experimental.*")
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")


@pytest.fixture
def seed_checkpoint() -> dict[str, Any]:
    """The tutorial's checkpoint dict for the seed model after a few SGD steps."""
    import torch

    from torchkeep.demo.model import SeedNet, make_optimizer

    torch.manual_seed(0)
    model = SeedNet()
    optimizer = make_optimizer(model)
    inputs = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs).sum().backward()
        optimizer.step()
    return {
        "epoch": 2,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": 0.125,
    }


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    prelude = "import sys\nsys.modules['torch'] = None\n"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
