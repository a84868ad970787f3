"""``python -m torchkeep.testing.child FILE``: call the training function pickled in FILE.

The file is written by :func:`torchkeep.testing.check_resume` in the same user's test
process, into a private temporary folder, just before this process starts: it is the
user's own function, not a checkpoint, so the standard pickle module reads it.
"""

from __future__ import annotations

import pickle
import sys


def main(argv: list[str]) -> int:
    """Unpickle the function and call it; its return value is ignored."""
    with open(argv[0], "rb") as f:
        fn = pickle.load(f)
    fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
