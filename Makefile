# hsml: two commands matter —  `make train` (the main job) and `make test` (every check).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV := $(PYTHON) -m uv
VENV := .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 1
export UV_PYTHON_DOWNLOADS := never
export WANDB_MODE ?= offline

.PHONY: env train data readme test test-nbs test-py lint format export-check docs-check clean docs help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/hsml: pyproject.toml uv.lock
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q --disable-pip-version-check uv \
	  || $(PYTHON) -m pip install -q --disable-pip-version-check --user uv  # an externally managed Python
	$(UV) sync --frozen --compile-bytecode --extra dev --extra mlflow --extra ray --python $(PYTHON)  # bytecode: every kernel and CLI call imports the stack
	@touch $@

env: $(BIN)/hsml  ## create .venv from the lock file (uv sync --frozen)

train: env  ## the main job: the default training experiment on built-in sample data
	$(BIN)/hsml train

data: env  ## generate the sample data and print its validation report
	$(BIN)/hsml data generate --out data/sample
	$(BIN)/hsml data check data/sample

export-check: env  ## nbdev_export must leave hsml/ unchanged
	@$(BIN)/nbdev_export
	@if [ -n "$$(git status --porcelain -- hsml)" ]; then \
	  echo "nbdev_export changed hsml/: the package is out of step with nbs/"; git status --porcelain -- hsml; git --no-pager diff --stat -- hsml; exit 1; fi
	@$(BIN)/nbdev_clean && $(BIN)/nbdev_clean --fname experiments
	@if [ -n "$$(git status --porcelain -- nbs experiments)" ]; then \
	  echo "nbdev_clean changed notebooks: commit them clean"; git status --porcelain -- nbs experiments; exit 1; fi
	@echo "export-check: hsml/ matches nbs/, notebooks are clean"
	@$(BIN)/python tools/readme.py --check

test-nbs: env  ## run every notebook in nbs/ as tests (nbdev_test)
	$(BIN)/nbdev_test --n_workers 2 --timing --flags postgres

test-py: env  ## pytest: end-to-end and system tests
	$(BIN)/pytest -q

lint: env  ## ruff lint and format check (notebooks too)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs-check: env  ## process the notebooks for the docs site as nbdev_docs does (Quarto renders the rest)
	$(BIN)/nbdev_proc_nbs

test: export-check lint test-nbs docs-check test-py  ## every check: export, ruff, nbdev_test, docs processing, pytest

readme: env  ## regenerate README.md from nbs/index.ipynb
	$(BIN)/python tools/readme.py

format: env  ## ruff fix + format, nbdev_clean
	$(BIN)/ruff check --fix . || true
	$(BIN)/ruff format .
	$(BIN)/nbdev_clean

docs: env  ## build the Quarto site (needs Quarto)
	$(BIN)/nbdev_docs

clean:
	rm -rf _proc _docs .pytest_cache .ruff_cache
