"""Run one fuzz target under atheris (coverage-guided, libFuzzer):

    python fuzz/run.py TARGET [libFuzzer flags] [CORPUS_DIR ...]

``fuzz/targets.py`` names the targets. The harness counts as bugs what ``targets.check``
does (an exception outside torchkeep's error tree, a MemoryError behind one of ours), and
libFuzzer adds hangs (``-timeout=1``: one input running over a second) and crashes. The
process's address space is capped 1 GiB above what it holds once set up, so an input that
makes torchkeep allocate more than that fails as a MemoryError, which is reported.
``make fuzz`` runs every target for a set time; ``fuzz/campaign.py`` runs the long one.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

with atheris.instrument_imports(include=["torchkeep"]):
    import targets
    import torchkeep.api
    import torchkeep.arrays
    import torchkeep.formats.manifest
    import torchkeep.formats.safetensors
    import torchkeep.formats.torch_legacy
    import torchkeep.formats.torch_zip
    import torchkeep.scanning
    import torchkeep.unpickle  # noqa: F401

ALLOCATION_BUDGET = 1 << 30


def _cap_address_space() -> None:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    held = pages * os.sysconf("SC_PAGE_SIZE")
    limit = held + ALLOCATION_BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> None:
    # libFuzzer's -merge re-runs argv[0] through the shell: make that this interpreter and
    # this script, with the target passed on in the environment
    name = os.environ.get("TORCHKEEP_FUZZ_TARGET")
    if name is None and len(sys.argv) > 1:
        name = sys.argv.pop(1)
    if name not in targets.TARGETS:
        sys.exit(f"usage: run.py TARGET [libFuzzer flags] [corpus dirs]; TARGET is one of "
                 f"{', '.join(targets.TARGETS)}")
    os.environ["TORCHKEEP_FUZZ_TARGET"] = name
    sys.argv[0] = f"{sys.executable} {Path(__file__).resolve()}"

    def test_one_input(data: bytes) -> None:
        targets.check(name, data)

    atheris.Setup(sys.argv, test_one_input)
    _cap_address_space()
    atheris.Fuzz()


if __name__ == "__main__":
    main()
