"""Named limits on what a file may claim; every parser checks them, callers may raise them."""

from __future__ import annotations

from dataclasses import dataclass

from torchkeep.errors import LimitExceededError

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on the claims a checkpoint may make before torchkeep refuses it.

    Every allocation torchkeep makes while parsing is sized by the real size of the
    input, not by a number written in it; these limits bound what the real size
    does not (work per byte, nesting, counts). Pass ``limits=Limits(...)`` to raise
    one for a trusted file.
    """

    #: JSON header of a .safetensors file (the safetensors library's own cap).
    max_header_bytes: int = 100_000_000
    #: One pickle stream (data.pkl, or a pickle of the legacy format).
    max_pickle_bytes: int = 1 << 31
    #: Records in a zip archive (members of a tar archive).
    max_zip_members: int = 1_000_000
    #: Bytes one deflated zip record may inflate to (it cannot be mapped: it is inflated
    #: into memory). torch.save stores records; deflated ones come from re-zipped files.
    max_inflated_bytes: int = 1 << 30
    #: Bytes of one storage or tensor record.
    max_tensor_bytes: int = 1 << 46
    #: Elements of one tensor view (stride-0 views can claim more than their bytes).
    max_tensor_elements: int = 1 << 46
    #: Dimensions of one tensor.
    max_tensor_dims: int = 64
    #: Cells of the grid a sharded tensor's chunk edges cut it into (checking that the
    #: chunks tile the tensor paints that grid).
    max_chunk_cells: int = 1 << 26
    #: Nesting of containers in the object tree.
    max_depth: int = 256
    #: Bytes of one integer literal in a pickle (LONG1/LONG4/LONG).
    max_int_bytes: int = 1024

    def check(self, name: str, value: int, what: str) -> None:
        """Raise LimitExceededError when ``value`` exceeds the limit called ``name``."""
        bound = getattr(self, name)
        if value > bound:
            raise LimitExceededError(
                f"{what} is {value:,}, above the limit {name}={bound:,}; "
                f"pass limits=Limits({name}=...) to raise it for a trusted file"
            )


DEFAULT_LIMITS = Limits()
