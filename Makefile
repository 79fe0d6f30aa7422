# The two set-up commands of the README are `make run` and `make test`; both create
# .venv and install the project from pyproject.toml on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp

export BROKER_ENVIRONMENT ?= dev

.PHONY: run test lint format bench demo migrate clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Serve the API on http://127.0.0.1:8000 (SQLite in ./var, keys generated in ./var/keys)
run: $(STAMP)
	$(BIN)/broker migrate
	$(BIN)/broker serve --host 127.0.0.1 --port 8000

## Run the whole test suite (SQLite and PostgreSQL)
test: $(STAMP)
	$(BIN)/pytest

migrate: $(STAMP)
	$(BIN)/broker migrate

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench migrations
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format broker tests bench migrations

## The whole loop against a running broker (start `make run` first)
demo: $(STAMP)
	$(BIN)/broker demo

## Bounded load on loopback; prints a table and appends it to bench/RESULTS.md
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
