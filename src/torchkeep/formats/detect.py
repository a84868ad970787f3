"""Which format an input is, from its first bytes (never from its name): one answer for
``load``, ``open``, ``inspect``, ``scan``, ``verify`` and ``convert``.

``sniff`` names what the bytes are, whether torchkeep reads it or not; ``detect`` is
``sniff`` for readers, raising the error that fits for the formats torchkeep does not
load. A zip archive is further told apart by its record names (``archive_format``): a
torch checkpoint, a TorchScript archive, a numpy ``.npz``, or some other zip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torchkeep.errors import FormatError, UnsupportedFormatError
from torchkeep.formats.tar import tar_members
from torchkeep.formats.torch_legacy import is_legacy
from torchkeep.storage.source import Source
from torchkeep.unpickle.scanner import HEAD_BYTES, is_pickle_head

if TYPE_CHECKING:
    from torchkeep.storage.filesystem import FileSystem

__all__ = [
    "FORMATS",
    "HEAD_BYTES",
    "archive_format",
    "detect",
    "directory_format",
    "format_for_suffix",
    "is_pickle_head",
    "is_zip_head",
    "listing_format",
    "looks_like_safetensors",
    "sniff",
    "tar_format",
    "tar_format_of",
    "unsupported",
]

#: Formats torchkeep reads; the first four it also writes.
FORMATS = ("torch", "torch-legacy", "safetensors", "pickle", "torchkeep", "dcp")

_SUFFIXES = {
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".tar": "torch",
    ".safetensors": "safetensors",
}

def format_for_suffix(name: str) -> str | None:
    """The format a file name's suffix implies, or None."""
    lowered = name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if lowered.endswith(suffix):
            return fmt
    return None


def is_zip_head(head: bytes) -> bool:
    """True when ``head`` opens a zip archive (a record, or the end record of an empty one)."""
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06"))


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when ``head`` opens a safetensors file of ``size`` bytes: a little-endian
    header length that fits the file, then the header's JSON."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] in (b"{", b" ")


def _is_tar_head(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def sniff(source: Source) -> str:
    """What ``source`` holds, from its first bytes: ``torch`` (a zip archive; see
    ``archive_format``), ``torch-legacy``, ``tar``, ``safetensors``, ``pickle`` (any
    protocol), ``numpy`` (an ``.npy`` array), ``empty`` or ``unrecognised``. Never raises
    for content."""
    head = source.read(0, min(source.size, HEAD_BYTES))
    if not head:
        return "empty"
    if is_zip_head(head):
        return "torch"
    if _is_tar_head(head):
        return "tar"
    if is_legacy(head):
        return "torch-legacy"
    if looks_like_safetensors(head, source.size):
        return "safetensors"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if is_pickle_head(head):
        return "pickle"
    return "unrecognised"


def archive_format(names: Sequence[str]) -> str:
    """What a zip archive with these record names is: ``torch`` (a checkpoint),
    ``torchscript`` (``torch.jit.save``: code), ``numpy`` (an ``.npz`` of arrays) or
    ``zip`` (no checkpoint layout)."""
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "numpy"
    return "zip"


def tar_format(names: Sequence[str]) -> str:
    """``torch-tar`` for a tar archive with these member names in torch's pre-0.1.10
    layout, else ``tar``."""
    return "torch-tar" if {"pickle", "storages"} <= set(names) else "tar"


def tar_format_of(source: Source) -> str:
    """``tar_format`` of the archive ``source`` (``tar`` when its headers are broken)."""
    try:
        return tar_format([member.name for member in tar_members(source)])
    except FormatError:
        return "tar"


_UNSUPPORTED = {
    "torchscript": "this is a TorchScript archive (torch.jit.save): it holds code, not just "
                   "data. Loading it means running that code (torch.jit.load); torchkeep does "
                   "not. `torchkeep scan` lists what it references",
    "torch-tar": "this is torch's pre-0.1.10 tar layout. Its loader unpickles with full "
                 "Python semantics (CVE-2025-32434); torchkeep does not read it. `torchkeep "
                 "scan` lists what its pickles reference",
    "tar": "this is a tar archive, not a checkpoint; torchkeep does not read tar archives. "
           "`torchkeep scan` lists what pickles in it reference",
    "numpy": "this is a numpy array file (.npy / .npz), not a checkpoint: read it with "
             "numpy.load(allow_pickle=False). `torchkeep scan` lists what a pickled object "
             "array in it references",
    "zip": "a zip archive without a <folder>/data.pkl record: not a torch checkpoint",
}


def unsupported(fmt: str, source: object = None) -> UnsupportedFormatError:
    """The error for a recognised format torchkeep does not load."""
    return UnsupportedFormatError(_UNSUPPORTED[fmt], source=source, format=fmt)


def detect(source: Source) -> str:
    """``torch``, ``torch-legacy``, ``safetensors`` or ``pickle``: the formats ``load``
    reads. UnsupportedFormatError for the others ``sniff`` knows, FormatError otherwise."""
    fmt = sniff(source)
    if fmt in ("torch", "torch-legacy", "safetensors", "pickle"):
        return fmt
    if fmt == "empty":
        raise FormatError("the file is empty", source=source.name)
    if fmt == "tar":
        raise unsupported(tar_format_of(source), source.name)
    if fmt == "numpy":
        raise unsupported("numpy", source.name)
    head = source.read(0, min(source.size, 8))
    hint = " (it is an HDF5 file)" if head.startswith(b"\x89HDF") else ""
    raise FormatError(
        f"not a checkpoint torchkeep recognises{hint}: starts with {head.hex(' ')}",
        source=source.name,
    )


def directory_format(fs: FileSystem, directory: str) -> str:
    """What a directory holds: ``dcp`` (a torch.distributed.checkpoint directory: a
    ``.metadata`` file), ``hf-training`` (a transformers Trainer checkpoint or an
    Accelerate state folder), ``hf`` (a Hugging Face model folder: a weights index, or one
    ``model.safetensors`` / ``pytorch_model.bin``; neither with torchkeep step files) or
    ``torchkeep`` (anything else is read as a step directory)."""
    return listing_format(fs.listdir(directory))


def listing_format(names: list[str]) -> str:
    """:func:`directory_format` for a directory's listing (one listing serves both the
    classification and the reader)."""
    from torchkeep.formats.dcp import STEP_FILES, is_dcp_listing
    from torchkeep.formats.hf_folder import weights_name
    from torchkeep.formats.hf_training import is_training_folder

    if is_dcp_listing(names):
        return "dcp"
    if not set(names).intersection(STEP_FILES):
        if is_training_folder(names):
            return "hf-training"
        if weights_name(names) is not None:
            return "hf"
    return "torchkeep"
