"""A plain pickle stream (``pickle.dump`` of plain data), read by the restricted interpreter."""

from __future__ import annotations

from torchkeep.errors import CorruptCheckpointError
from torchkeep.formats.parsed import Parsed
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source
from torchkeep.unpickle import Allowlist, unpickle

__all__ = ["read_plain_pickle"]


def read_plain_pickle(
    source: Source, *, allowlist: Allowlist, limits: Limits = DEFAULT_LIMITS
) -> Parsed:
    """Parse a plain pickle (no torch storages) into its value; nothing is executed."""
    limits.check("max_pickle_bytes", source.size, "pickle size")
    result = unpickle(source.read(0, source.size), allowlist=allowlist, limits=limits,
                      what="pickle")
    trailing = source.size - result.end
    if trailing:
        raise CorruptCheckpointError(
            f"a pickle followed by {trailing} more bytes: not a plain pickle (a legacy torch "
            "file with a damaged magic number, or several pickles in one file)",
            source=source.name,
        )
    info = {"trailing_bytes": 0}
    return Parsed("pickle", result.value, source, {}, "little", info)
