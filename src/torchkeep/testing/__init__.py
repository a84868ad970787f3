"""Tools for a user's own test suite: prove that a training function resumes bit-exactly.

::

    from torchkeep.testing import check_resume

    def test_resume_is_exact():
        report = check_resume(my_project.train, steps=40, kill_at="random")
        report.assert_identical()   # AssertionError with the diagnosis otherwise

``torchkeep check-resume -- python train.py`` is the same check for a command line
(docs/check-resume.md).
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from torchkeep.testing.check import DEFAULT_TIMEOUT_S, check_command
from torchkeep.testing.report import Cause, KillPoint, ResumeReport, StepRow

__all__ = ["Cause", "KillPoint", "ResumeReport", "StepRow", "check_command", "check_resume"]


def check_resume(
    fn: Callable[[], Any],
    *,
    steps: int | None = None,
    kill_at: int | str = "random",
    during_save: bool = False,
    twice: bool = False,
    seed: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    keep: str | None = None,
    env: dict[str, str] | None = None,
) -> ResumeReport:
    """Run ``fn`` (a picklable function that trains with a CheckpointManager, taking no
    arguments: bind them with ``functools.partial``) uninterrupted, then SIGKILLed and
    resumed, each in a fresh Python process, and compare every step both runs committed
    bit for bit. The arguments are :func:`check_command`'s; the child processes get this
    process's ``sys.path``, so test modules are importable there.
    """
    try:
        payload = pickle.dumps(fn)
    except Exception as e:
        raise TypeError(f"fn must be picklable (a module-level function, or a "
                        f"functools.partial of one): {e}") from e
    with tempfile.TemporaryDirectory(prefix="torchkeep-check-fn-") as folder:
        path = os.path.join(folder, "fn.pickle")
        with open(path, "wb") as f:
            f.write(payload)
        paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        child_env = dict(env or {})
        # sys.path already holds this process's PYTHONPATH; a PYTHONPATH in ``env`` is kept
        given = [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        child_env["PYTHONPATH"] = os.pathsep.join(paths + given)
        return check_command([sys.executable, "-m", "torchkeep.testing.child", path],
                             steps=steps, kill_at=kill_at, during_save=during_save,
                             twice=twice, seed=seed, timeout=timeout, keep=keep,
                             env=child_env, cwd=os.getcwd())
