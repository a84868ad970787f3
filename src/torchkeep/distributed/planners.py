"""DCP's default planners with two changes: values are never pickled, nor unpickled.

Everything else (flattening, FQN-keyed optimizer state, DTensor/FSDP2/TP chunking,
deduplication of replicated items, resharding by chunk intersection) is DCP's own code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

from torchkeep.errors import UnsafeCheckpointError

__all__ = ["PlainValue", "TorchkeepLoadPlanner", "TorchkeepSavePlanner", "safe_torch_load"]


@dataclass(frozen=True, slots=True)
class PlainValue:
    """A non-tensor item as it is: the storage writer encodes it as JSON."""

    value: Any


class TorchkeepSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner that hands non-tensor values to the writer as they are, instead
    of ``torch.save``-ing each into a pickle."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return PlainValue(object)
        return super().transform_object(write_item, object)


def safe_torch_load(data: io.BytesIO) -> Any:
    """What DCP's ``torch.load(weights_only=False)`` of a value item returns, read by
    torchkeep's restricted interpreter instead: nothing in the bytes runs."""
    import torchkeep

    try:
        return torchkeep.load(data, map_location="cpu")
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise UnsafeCheckpointError(f"a value item cannot be read safely: {e}") from e


class TorchkeepLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose values come from JSON (``load_value``), or, for a stock
    DCP checkpoint, through torchkeep's restricted reader instead of
    ``torch.load(weights_only=False)``."""

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Put a value read from a torchkeep step where the state dict wants it."""
        from torch.distributed.checkpoint._traverse import set_element

        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.load_value(read_item, safe_torch_load(value))
