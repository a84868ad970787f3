"""scan is dangerous wherever CPython's own unpicklers would import a global outside the
allowlist, on every input the fuzzers kept (their saved corpora and the regression
inputs) and on every hostile file the tests generate. The oracle (``pickle_oracle.py``)
runs pickle.Unpickler and pickle._Unpickler with a recording find_class in a sandboxed
subprocess; the third-party corpus gets the same check in test_corpus.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import hostile as H
import torchkeep
from pickle_oracle import recorded_imports_of
from torchkeep.unpickle.scanner import verdict_of

ROOT = Path(__file__).resolve().parent.parent
FUZZ_OUTPUTS = sorted(p for folder in (ROOT / "fuzz" / "corpus", ROOT / "tests" /
                                       "fuzz_regressions")
                      for p in folder.glob("*/*") if p.is_file())


def _generated(folder: Path, marker: Path) -> list[Path]:
    """Every gadget of tests/hostile.py in every container, as files."""
    paths = []
    for i, gadget in enumerate([*H.GADGETS, *H.STRUCTURAL]):
        try:
            payload = gadget.make(marker)
        except Exception:
            continue
        for kind, data in (("pkl", payload), ("zip", H.in_torch_zip(payload)),
                           ("legacy", H.in_legacy(payload))):
            path = folder / f"{i}.{kind}"
            path.write_bytes(data)
            paths.append(path)
    return paths


def _violations(paths: list[Path]) -> tuple[list[str], int]:
    """Files where CPython would import outside the allowlist but scan is not dangerous,
    and how many files CPython would import outside the allowlist from."""
    oracle = recorded_imports_of(paths)
    out, importing = [], 0
    for path in paths:
        outside = [g for g in oracle[str(path)].get("imports", []) if verdict_of(g) != "safe"]
        if not outside:
            continue
        importing += 1
        try:
            verdict = torchkeep.scan(path).verdict
        except torchkeep.TorchkeepError as e:
            verdict = f"error {e}"
        if verdict != "dangerous":
            out.append(f"{path.relative_to(path.parents[1])}: CPython imports {outside}, scan "
                       f"says {verdict}")
    return out, importing


def test_on_the_fuzzers_outputs() -> None:
    if not FUZZ_OUTPUTS:
        pytest.skip("no saved fuzz corpus under fuzz/corpus/ (run make fuzz)")
    violations, _ = _violations(FUZZ_OUTPUTS)
    assert violations == []


def test_on_the_generated_hostile_files(tmp_path: Path, marker: Path) -> None:
    paths = _generated(tmp_path, marker)
    assert len(paths) > 100
    violations, importing = _violations(paths)
    assert violations == []
    assert importing > 100  # the oracle sees the gadgets' imports
    assert not marker.exists()
