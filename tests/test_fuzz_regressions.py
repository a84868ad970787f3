"""Every input the fuzzers found a bug with, replayed through its target (no atheris
needed): each must now end cleanly or in one of torchkeep's own errors, quickly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import deadline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))

import targets  # noqa: E402

REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
CASES = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())


def test_every_regression_names_a_target() -> None:
    assert CASES
    assert {p.parent.name for p in CASES} <= set(targets.TARGETS)


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_fuzz_regression(path: Path) -> None:
    with deadline(10):
        targets.check(path.parent.name, path.read_bytes())
