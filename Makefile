# `make sweep` and `make test` work on a fresh machine: each creates the virtual
# environment and installs the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to a pair that imports together.
TORCH := torch==2.14.1 torchvision==0.29.1
SWEEP_ARGS ?=
BENCH_ARGS ?=

.PHONY: install sweep test test-slow lint clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

sweep: install
	$(BIN)/glo-search sweep --space default --num-samples 16 --max-epochs 20 $(SWEEP_ARGS)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Every speed figure of BENCHMARKS.md, about 10 minutes on 2 cores;
# BENCH_ARGS=--with-search adds the search-efficiency figure (about 30 minutes more).
bench: install
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check glo_search search_spaces analysis tests benchmarks
	$(BIN)/ruff format --check glo_search search_spaces analysis tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
