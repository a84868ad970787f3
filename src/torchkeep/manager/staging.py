"""Async save's foreground half: copy every tensor of a save into one reusable buffer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torchkeep.formats.manifest import ALIGNMENT, TensorPayload

__all__ = ["StagingArena"]


class StagingArena:
    """Holds exactly one copy of a save's tensors, so training can go on while it is written.

    The buffer is kept between saves (only one save is in flight), so from the second save
    on staging is a plain copy into memory that is already mapped; it is pinned when CUDA
    is available, so device-to-host copies run at full speed.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def _ensure(self, total: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < total:
            self._buffer = None  # free the old one before allocating the new one
            pin = torch.cuda.is_available()
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
        return self._buffer

    def stage(
        self,
        payloads: list[TensorPayload],
        originals: dict[str, Any],
        storage_bytes: Any,
    ) -> list[TensorPayload]:
        """Copies of ``payloads`` whose bytes live in the arena (the originals may change)."""
        offsets = []
        total = 0
        for payload in payloads:
            total += -total % ALIGNMENT
            offsets.append(total)
            total += payload.ref.nbytes
        buffer = self._ensure(total)
        staged: list[TensorPayload] = []
        cuda_copies = False
        for payload, offset in zip(payloads, offsets, strict=True):
            n = payload.ref.nbytes
            target = buffer[offset : offset + n]
            source = originals.get(payload.name)
            if isinstance(source, torch.Tensor) and n and _viewable(source):
                view = target.view(source.dtype).view(source.shape)
                view.copy_(source.detach(), non_blocking=source.device.type == "cuda")
                cuda_copies |= source.device.type == "cuda"
            elif n:
                data = payload.bytes(storage_bytes)
                target.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
            staged.append(TensorPayload(payload.name, payload.ref, target.numpy().data))
        if cuda_copies:
            torch.cuda.synchronize()
        return staged


    def stage_views(self, views: list[memoryview]) -> list[memoryview]:
        """Copies of ``views`` (CPU bytes) in the arena: an incremental save stages only
        the chunks it writes."""
        offsets = []
        total = 0
        for view in views:
            total += -total % ALIGNMENT
            offsets.append(total)
            total += view.nbytes
        flat = self._ensure(total).numpy()
        staged = []
        for view, offset in zip(views, offsets, strict=True):
            target = flat[offset : offset + view.nbytes]
            if view.nbytes:
                target[:] = np.frombuffer(view, dtype=np.uint8)
            staged.append(target.data)
        return staged


def _viewable(t: torch.Tensor) -> bool:
    # uint8 -> dtype views need an element size torch can view into
    return t.dtype not in (torch.bits1x8, torch.bits2x4, torch.bits4x2) and t.numel() > 0

