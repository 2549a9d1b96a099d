# One command sets up and runs; `make test` sets up and passes the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/moleflow: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: install test lint demo
install: $(BIN)/moleflow

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

demo: install
	$(BIN)/moleflow demo --out runs/demo
