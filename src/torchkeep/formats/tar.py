"""The member list of a tar archive, to classify it and to scan its pickles (never to load
it: torch's pre-0.1.10 tar layout is read by nothing in torchkeep but ``scan``).

A walk over the 512-byte headers, bounded by the input's size and ``max_zip_members``.
``tarfile`` is not used: it follows links, decodes PAX records into arbitrary strings and
reads the whole member table before a limit could apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchkeep.errors import CorruptCheckpointError
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source

__all__ = ["TarMember", "tar_members"]

_BLOCK = 512


@dataclass(frozen=True, slots=True)
class TarMember:
    """One regular file of a tar archive: its name and where its bytes lie."""

    name: str
    offset: int
    size: int


def _octal(field: bytes, what: str) -> int:
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptCheckpointError(f"tar header: {what} {text[:20]!r} is not octal") from None


def tar_members(source: Source, *, limits: Limits = DEFAULT_LIMITS) -> list[TarMember]:
    """The regular files of the tar archive ``source``, in order (links and metadata
    records skipped); CorruptCheckpointError for a broken header."""
    members: list[TarMember] = []
    pos = 0
    long_name: str | None = None
    while pos + _BLOCK <= source.size:
        header = source.read(pos, _BLOCK)
        if header == b"\0" * _BLOCK:
            break
        size = _octal(header[124:136], "size")
        if pos + _BLOCK + size > source.size:
            raise CorruptCheckpointError(
                f"tar member at offset {pos} claims {size} bytes past the end of the file")
        kind = header[156:157]
        name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        long_name = None
        if kind == b"L":  # GNU long name: the next member's name is this one's data
            long_name = source.read(pos + _BLOCK, min(size, 4096)).split(b"\0", 1)[0].decode(
                "utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            members.append(TarMember(name, pos + _BLOCK, size))
            limits.check("max_zip_members", len(members), "tar members")
        pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
    return members
