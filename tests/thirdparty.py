"""Running real third-party packages that need torchvision, in a subprocess.

`make install` puts torchvision 0.28.0, lpips 0.1.4 and facenet-pytorch 2.6.0, without
their dependencies, in ``.venv/nodeps-test-packages``: facenet-pytorch pins torch<2.3,
and the package index's torchvision is a CUDA build. Its Python code (the model
definitions these packages use) runs on the CPU torch, but its C extension cannot load
(it links CUDA libraries this machine lacks), and ``torchvision/_meta_registrations.py``
then fails at import registering fake kernels for C ops that were never defined
(``operator torchvision::nms does not exist``). Those fake kernels serve torch.compile's
tracing of the C ops only; :data:`PRELUDE` skips that one module so the rest of
torchvision imports. Nothing calls a torchvision C op in these tests.

The folder is only ever on ``sys.path`` of the subprocesses started here, so an
``import torchvision`` anywhere else in the suite cannot find the broken extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NODEPS_DIR = Path(sys.prefix) / "nodeps-test-packages"

PRELUDE = (
    "import sys, types, warnings\n"
    "warnings.filterwarnings('ignore')\n"
    "sys.modules['torchvision._meta_registrations'] = "
    "types.ModuleType('torchvision._meta_registrations')\n"
)


def require_thirdparty() -> None:
    """Skip (with the reason) where `make install` did not put the packages in place."""
    if not (NODEPS_DIR / "lpips").is_dir() or not (NODEPS_DIR / "facenet_pytorch").is_dir():
        pytest.skip(f"{NODEPS_DIR.name} is missing: run `make install` (it installs "
                    "torchvision, lpips and facenet-pytorch there)")


def run_thirdparty(code: str, *, extra_path: Path | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (after :data:`PRELUDE`) in a fresh interpreter that sees the
    third-party folder; ``extra_path`` goes first on ``sys.path`` (a patched copy of a
    package)."""
    require_thirdparty()
    paths = [str(NODEPS_DIR)]
    if extra_path is not None:
        paths.insert(0, str(extra_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
