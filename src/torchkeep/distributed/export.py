"""Export any checkpoint torchkeep reads as a stock ``torch.distributed.checkpoint``
directory, for tools that only speak DCP (``torchkeep convert SRC --to dcp OUT``)."""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from typing import Any

from torchkeep.errors import StorageError, UnsupportedTypeError

__all__ = ["export_dcp"]


def export_dcp(src: Any, out: str | os.PathLike[str]) -> dict[str, int]:
    """Write ``src`` (a step directory, sharded or not, a .pt, a .safetensors...) as a DCP
    checkpoint directory ``out`` that stock ``dcp.load`` reads, on any world size.

    One process writes it, so every tensor is one chunk (``dcp.load`` reshards by chunk
    intersection, so any layout loads); values are ``torch.save``-d as DCP does. The
    directory appears complete or not at all (written under a temporary name, renamed).
    Returns the number of tensors and values written.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    import torchkeep

    out = os.fspath(out)
    if os.path.exists(out):
        raise StorageError("the output exists already; choose a new directory", source=out)
    tree = torchkeep.load(src, map_location="cpu")
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise UnsupportedTypeError("a DCP checkpoint is a dict with string keys; this "
                                   "checkpoint is not")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.torchkeep-tmp-{secrets.token_hex(4)}")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single
            warnings.simplefilter("ignore")  # process": it is
            metadata = dcp_save(tree, storage_writer=FileSystemWriter(tmp), no_dist=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kinds = metadata.state_dict_metadata.values()
    tensors = sum(1 for md in kinds if hasattr(md, "chunks"))
    return {"tensors": tensors, "values": len(metadata.state_dict_metadata) - tensors}
