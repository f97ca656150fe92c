# crate-lit developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev
ARGS ?=
# auto: uv when it can be had, pip otherwise; pip: pip even where uv is there (the path of a
# machine that cannot get uv); uv: fail rather than fall back to pip
INSTALLER ?= auto
# test-lowest: the venv with the lowest versions pyproject.toml allows, and its interpreter
# (the lowest Python it allows is the truest test; python3 by default)
VENV_LOWEST ?= build/venv-lowest
PYTHON_LOWEST ?= $(PYTHON)
# test processes: most of the suite's time is single-threaded start-up of CLI subprocesses
# (about 15 s of imports each), so two processes on two cores take about half the time
TEST_JOBS ?= 2
# torch threads per test process (and per command it runs): with one process per core, more
# threads only oversubscribe the cores (tests/test_training.py: 315 s with torch's default of
# one per core, 265 s with 1, -n 2 on the 2-core CI machine, one run each)
TEST_THREADS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast test-lowest lint format bench clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'
	@echo "  (ARGS='key=value ...' passes Hydra overrides to make train)"

install: $(STAMP) ## create .venv and install crate-lit with its dev tools (idempotent)

# uv when it can be had (seconds), pip otherwise (minutes). Bytecode is compiled at install
# time because PYTHONDONTWRITEBYTECODE would otherwise make every start-up recompile.
# PIP_FIND_LINKS is cleared so pip takes PyPI's matching torch/torchvision pair.
# FIND_UV prints the uv command: on PATH, or the uv module of $(PYTHON), which is where a
# `pip install --user uv` leaves it when its script folder is not on PATH (a fresh machine)
FIND_UV = command -v uv || { $(PYTHON) -m uv --version >/dev/null 2>&1 && echo "$(PYTHON) -m uv"; }
$(STAMP): pyproject.toml
	@UV=$$([ "$(INSTALLER)" = pip ] || $(FIND_UV) || { { $(PYTHON) -m pip install --quiet --user uv \
	    || $(PYTHON) -m pip install --quiet uv; } >/dev/null 2>&1 && $(FIND_UV); }); \
	if [ -n "$$UV" ]; then \
	  echo "installing with uv ($$UV) into $(VENV)"; \
	  [ -x $(BIN)/python ] || $$UV venv --quiet --python $(PYTHON) $(VENV); \
	  $$UV pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[$(EXTRAS)]"; \
	elif [ "$(INSTALLER)" = uv ]; then \
	  echo "INSTALLER=uv, but uv is neither on PATH nor installable with $(PYTHON) -m pip" >&2; exit 1; \
	else \
	  echo "installing with pip into $(VENV) (several minutes)"; \
	  [ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
	  PIP_FIND_LINKS= $(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"; \
	fi
	@touch $(STAMP)

train: install ## train the demo (small CRATE on the built-in shapes dataset, a few minutes on a CPU)
	$(BIN)/crate-train $(ARGS)

test: install ## run the test suite
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_JOBS)

test-fast: install ## the test suite without the slow end-to-end runs
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not slow"

# pip has no lowest-version resolution: uv's lowest-direct takes each direct dependency at its
# floor (torch's CUDA build from PyPI: several GB the first time)
test-lowest: ## the fast tests on the lowest versions pyproject.toml allows (checks its floors; uv)
	@UV=$$($(FIND_UV)) || { echo "make test-lowest needs uv (pip cannot resolve to the lowest versions)" >&2; exit 1; }; \
	set -e; [ -x $(VENV_LOWEST)/bin/python ] || $$UV venv --quiet --python $(PYTHON_LOWEST) $(VENV_LOWEST); \
	$$UV pip install --quiet --compile-bytecode --resolution lowest-direct --python $(VENV_LOWEST)/bin/python -e ".[dev]"
	$(VENV_LOWEST)/bin/python -m pytest -q -n $(TEST_JOBS) -m "not slow"

bench: install ## training-step throughput of CRATE vs the plain reference and timm's ViT
	$(BIN)/crate-bench $(ARGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean: ## remove build artefacts (keeps .venv and outputs/)
	rm -rf build dist .pytest_cache .ruff_cache src/*.egg-info
