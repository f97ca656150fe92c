# crate-lit developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev
ARGS ?=
# test processes: most of the suite's time is single-threaded start-up of CLI subprocesses
# (about 15 s of imports each), so two processes on two cores take about half the time
TEST_JOBS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint format bench clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  (ARGS='key=value ...' passes Hydra overrides to make train)"

install: $(STAMP) ## create .venv and install crate-lit with its dev tools (idempotent)

# uv when it can be had (seconds), pip otherwise (minutes). Bytecode is compiled at install
# time because PYTHONDONTWRITEBYTECODE would otherwise make every start-up recompile.
# PIP_FIND_LINKS is cleared so pip takes PyPI's matching torch/torchvision pair.
$(STAMP): pyproject.toml
	@if command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --user uv >/dev/null 2>&1 \
	    || $(PYTHON) -m pip install --quiet uv >/dev/null 2>&1; then \
	  UV=$$(command -v uv || echo "$(PYTHON) -m uv"); \
	  echo "installing with uv into $(VENV)"; \
	  [ -x $(BIN)/python ] || $$UV venv --quiet --python $(PYTHON) $(VENV); \
	  $$UV pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[$(EXTRAS)]"; \
	else \
	  echo "uv not available: installing with pip into $(VENV) (several minutes)"; \
	  [ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
	  PIP_FIND_LINKS= $(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"; \
	fi
	@touch $(STAMP)

train: install ## train the demo (small CRATE on the built-in shapes dataset, a few minutes on a CPU)
	$(BIN)/crate-train $(ARGS)

test: install ## run the test suite
	$(BIN)/python -m pytest -q -n $(TEST_JOBS)

test-fast: install ## the test suite without the slow end-to-end runs
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not slow"

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
