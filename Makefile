# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned to the CPU wheel this machine carries, so pip
# never resolves an unpinned torch to a multi-GB CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.torchkeep-installed
# Real packages the tests of torchkeep.patch_torch_load drive (they torch.load bundled
# weights), installed without their dependencies into a folder of their own that only
# those tests put on sys.path: facenet-pytorch pins torch<2.3, and the index's torchvision
# is a CUDA build whose C ops cannot load beside the CPU torch, so an `import torchvision`
# anywhere else (lightning, transformers) must not find it (tests/thirdparty.py).
NODEPS_TEST_PACKAGES ?= torchvision==0.28.0 lpips==0.1.4 facenet-pytorch==2.6.0
NODEPS_DIR := $(VENV)/nodeps-test-packages

.PHONY: demo test lint bench fuzz install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,torch]"
	rm -rf $(NODEPS_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(NODEPS_DIR) $(NODEPS_TEST_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m torchkeep demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory lint

lint: $(STAMP)
	$(PY) -m ruff check src tests fuzz $(wildcard bench)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/distributed.py
	$(PY) bench/remote.py
	$(PY) bench/incremental.py --chunks

# every fuzz target for FUZZ_SECONDS; the long campaign: fuzz/campaign.py --runs 1000000
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(PY) fuzz/campaign.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
