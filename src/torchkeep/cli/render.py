"""Output for people and scripts: sizes, shapes, JSON, and progress bars on stderr."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

__all__ = ["echo_json", "human_bytes", "progress", "shape_text"]


def human_bytes(n: int) -> str:
    """``1.5 KiB``, ``240.3 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def shape_text(shape: Any) -> str:
    """``[6, 3, 5, 5]``."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def echo_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    click.echo(json.dumps(document, indent=2, ensure_ascii=False, default=str))


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr (only when stderr is a terminal); yields ``advance(n)``."""
    if not sys.stderr.isatty() or total <= 0:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
              leave=False, file=sys.stderr) as bar:
        yield bar.update
