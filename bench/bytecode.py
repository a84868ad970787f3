"""Compile torchkeep's modules to bytecode before anything is timed.

A wheel install compiles ``.pyc`` files when it installs; an editable install under
``PYTHONDONTWRITEBYTECODE=1`` (set on some machines) never writes them, and then every
fresh process compiles each module torchkeep imports on first use from source, about
70 ms for the sharded load path, inside the timed operation. The benches measure what an
installed torchkeep costs, so they write the bytecode first (``compileall`` writes even
when the variable is set).
"""

from __future__ import annotations

import compileall
from pathlib import Path

import torchkeep


def compile_torchkeep() -> None:
    """Write the ``.pyc`` of every torchkeep module (a no-op when they are current)."""
    compileall.compile_dir(str(Path(torchkeep.__file__).parent), quiet=1)
