# All targets set themselves up: a fresh clone needs nothing but Python 3.11 and `make`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mtc-installed
PYTEST_ARGS ?=
DEMO_OUT ?= demo-out

.PHONY: venv test test-slow demo bench lint backbones clean

venv: $(STAMP)

# torch goes in first and pinned: the CPU wheel on disk satisfies it, so the `torch>=2.3` range in
# setup.cfg installs nothing more (an unpinned torch would pull GBs of CUDA wheels).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# One worker per core (at most 4), one intra-op thread each (tests/conftest.py); idle workers take
# queued tests from busy ones (the durations are uneven: a few tests take minutes).
XDIST ?= -n auto --maxprocesses 4 --dist worksteal

test: venv
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -q -m slow $(XDIST) $(PYTEST_ARGS)

demo: venv
	DEMO_OUT=$(DEMO_OUT) bash scripts/demo.sh

bench: venv
	$(BIN)/python bench/run_all.py

lint: venv
	$(BIN)/ruff check mtc tests bench backbones
	$(BIN)/mypy mtc
	$(BIN)/lint-imports --no-cache

backbones: venv
	$(BIN)/python backbones/make_backbones.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis *.egg-info
