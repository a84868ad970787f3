"""Which format an input is, from its first bytes (never from its name)."""

from __future__ import annotations

from torchkeep.errors import FormatError, UnsupportedFormatError
from torchkeep.formats.torch_legacy import is_legacy
from torchkeep.storage.source import Source

__all__ = [
    "FORMATS",
    "detect",
    "format_for_suffix",
    "is_pickle_head",
    "is_zip_head",
    "looks_like_safetensors",
]

#: Formats torchkeep reads; the first four it also writes.
FORMATS = ("torch", "torch-legacy", "safetensors", "pickle", "torchkeep")

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


def is_pickle_head(head: bytes) -> bool:
    """True when ``head`` opens a protocol 2-5 pickle."""
    return len(head) > 1 and head[0] == 0x80 and head[1] <= 5


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when ``head`` opens a safetensors file of ``size`` bytes: a little-endian
    header length that fits the file, then the header's JSON."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] in (b"{", b" ")


def detect(source: Source) -> str:
    """``torch``, ``torch-legacy``, ``safetensors`` or ``pickle``; FormatError otherwise."""
    head = source.read(0, min(source.size, 512))
    if not head:
        raise FormatError("the file is empty", source=source.name)
    if is_zip_head(head):
        return "torch"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise UnsupportedFormatError(
            "this is a tar archive: torch's pre-0.1.10 tar layout (or a plain tarball). "
            "Its loader unpickles with full Python semantics (CVE-2025-32434); torchkeep "
            "does not read it",
            source=source.name,
        )
    if is_legacy(head):
        return "torch-legacy"
    if looks_like_safetensors(head, source.size):
        return "safetensors"
    if is_pickle_head(head):
        return "pickle"
    hint = ""
    if head.startswith(b"\x89HDF"):
        hint = " (it is an HDF5 file)"
    elif head[:1] in (b"(", b"]", b"}", b"c"):
        hint = " (it may be a protocol-0/1 pickle, which torchkeep does not read)"
    raise FormatError(
        f"not a checkpoint torchkeep recognises{hint}: starts with {head[:8].hex(' ')}",
        source=source.name,
    )
