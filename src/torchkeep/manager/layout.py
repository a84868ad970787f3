"""How a run directory is laid out: step folder names, temporary names, leftovers."""

from __future__ import annotations

import re
import secrets

from torchkeep.storage.atomic import TMP_MARKER

__all__ = [
    "DELETE_MARKER",
    "deleting_name",
    "is_leftover",
    "parse_step_name",
    "step_name",
    "temporary_name",
]

STEP_DIGITS = 12
DELETE_MARKER = ".torchkeep-deleting-"
_STEP = re.compile(rf"^step-(\d{{{STEP_DIGITS},}})$")


def step_name(step: int) -> str:
    """``step-000000000120``: zero-padded so that names sort by step."""
    if step < 0:
        raise ValueError("steps are non-negative integers")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_name(name: str) -> int | None:
    """The step of a committed-step folder name, or None for anything else."""
    match = _STEP.match(name)
    return int(match.group(1)) if match else None


def temporary_name(step: int) -> str:
    """Where a save of ``step`` is written before its commit (hidden, recognisable)."""
    return f".{step_name(step)}{TMP_MARKER}{secrets.token_hex(4)}"


def deleting_name(step: int) -> str:
    """A committed step is renamed to this before it is removed, so a half-removed step
    can never look committed."""
    return f".{step_name(step)}{DELETE_MARKER}{secrets.token_hex(4)}"


def is_leftover(name: str) -> bool:
    """True for what an interrupted save or deletion leaves behind."""
    return name.startswith(".step-") and (TMP_MARKER in name or DELETE_MARKER in name)
