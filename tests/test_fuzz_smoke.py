"""The fuzz targets under atheris for a few thousand runs from the saved corpus: what CI
runs of the campaign (``make fuzz`` runs each for a minute, ``fuzz/campaign.py --runs``
the long one). A failing input is printed in base64; add it to tests/fuzz_regressions/."""

from __future__ import annotations

import base64
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))

from targets import TARGETS  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (a wheel exists for Linux "
                                       "x86_64 only; the dev extra installs it there)")
RUNS = 3000


@pytest.mark.parametrize("target", list(TARGETS))
def test_smoke_fuzz(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    saved = ROOT / "fuzz" / "corpus" / target
    regressions = ROOT / "tests" / "fuzz_regressions" / target
    inputs = [str(d) for d in (saved, regressions) if d.is_dir() and any(d.iterdir())]
    done = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), target, f"-runs={RUNS}", "-seed=1",
         "-timeout=10", "-rss_limit_mb=3072", "-max_len=65536",
         f"-artifact_prefix={tmp_path}/", str(corpus), *inputs],
        capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, PYTHONWARNINGS="ignore"))
    found = [p for p in tmp_path.iterdir() if p.is_file()]
    detail = "\n".join(f"{p.name}: {base64.b64encode(p.read_bytes()[:4096]).decode()}"
                       for p in found)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{detail}"
    assert "Done" in done.stderr or "DONE" in done.stderr
