"""Every random stream a training run draws from, captured and restored as one object."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    """Captures Python's ``random``, numpy's global generator, torch's CPU generator and
    every CUDA device's generator; put it in the manager's state to resume bit-exactly.

    ``state_dict()`` reads the generators at that moment; ``load_state_dict()`` sets them.
    """

    def state_dict(self) -> dict[str, Any]:
        """The current state of every generator."""
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=True),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set every generator to ``state`` (as ``state_dict`` returned it)."""
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_byte_tensor(state["torch"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])

    def __repr__(self) -> str:
        return "RNGState(python, numpy, torch" + (
            ", cuda)" if torch.cuda.is_available() else ")"
        )


def _byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.uint8).contiguous().clone()
    return torch.from_numpy(np.array(value, dtype=np.uint8, copy=True))
