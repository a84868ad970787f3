"""Shared fixtures: the seed model's checkpoint dict, paths, torch-free subprocess runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
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


class Hang(AssertionError):
    """Raised inside the code under test when it runs past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (raise Hang inside the running code) after ``seconds`` of wall time: a guard
    against hangs, not a timing test."""

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file a hostile payload would create if it ever ran."""
    return tmp_path / "PWNED"


def quiet_env() -> dict[str, str]:
    """The current environment, with Python warnings off (for subprocesses)."""
    return dict(os.environ, PYTHONWARNINGS="ignore")


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    prelude = "import sys\nsys.modules['torch'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=quiet_env(), timeout=120, check=False,
    )


def flip_byte(path: str | os.PathLike[str], at: int | None = None, mask: int = 0xFF) -> None:
    """XOR the byte at ``at`` (default: the middle one) of the file ``path`` with ``mask``."""
    raw = bytearray(Path(path).read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= mask
    Path(path).write_bytes(bytes(raw))


def tmp_debris(folder: str | os.PathLike[str]) -> list[str]:
    """Names in ``folder`` holding ``TMP_MARKER`` (a save's temporaries left behind).

    The marker is matched without its ``.``/``-`` delimiters: a superset of both checks
    this replaced (``TMP_MARKER in n``; ``n.startswith(".") and "torchkeep-tmp" in n``).
    """
    from torchkeep.storage.atomic import TMP_MARKER

    return [n for n in os.listdir(folder) if TMP_MARKER.strip(".-") in n]
