"""Rank functions for test_dcp_format.py, run by torchkeep.distributed.launch.run_ranks.

They live in their own importable module (not the test file) because the forkserver's
children find a rank function by its module and name.
"""

from __future__ import annotations

from typing import Any


def full_tensors() -> dict[str, Any]:
    """The whole tensors every rank starts from (same values on every rank)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(7, 5, generator=gen),  # Shard(0) over 2 ranks: 4 + 3 rows
        "c": torch.arange(3 * 9, dtype=torch.int64).reshape(3, 9),  # Shard(1): 5 + 4 cols
        "r": torch.randn(4, 3, generator=gen).to(torch.bfloat16),  # Replicate: saved once
    }


def save_sharded(rank: int, world: int, directory: str) -> dict[str, Any]:
    """dcp.save a state dict of DTensors (Shard(0), Shard(1), Replicate) and plain values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = full_tensors()
    state = {
        "model": {
            "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
            "c": distribute_tensor(full["c"], mesh, [Shard(1)]),
            "r": distribute_tensor(full["r"], mesh, [Replicate()]),
        },
        "extra": {"step": 3, "note": "hello"},
    }
    dcp.save(state, checkpoint_id=directory)
    local = state["model"]["w"].to_local()
    return {"rank": rank, "local_rows": int(local.shape[0])}


class Note:
    """A user object saved as a DCP value: not in torchkeep's default allowlist."""

    def __init__(self, text: str) -> None:
        self.text = text
