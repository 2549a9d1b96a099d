# One command sets up and runs; `make test` sets up and passes the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the exact versions the docs' numbers were made with; `make test CONSTRAINTS=` installs the newest allowed
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

# the extras the test suite needs (anomalib, for the optional AUPRO cross-check, is left out: it is heavy);
# [serve] for the server tests (the browser test also needs Debian's chromium, .ci/run installs it);
# [ray]: tests/test_parallel.py runs a local Ray cluster
$(BIN)/moleflow: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_C) -e ".[dev,demo,analysis,serve,onnx,ray]"
	touch $@

.PHONY: install test lint demo schema constraints
install: $(BIN)/moleflow

# two workers: the suite's subprocess- and I/O-bound tests overlap (5:36 in one process, 4:25 on two, 2 cores);
# TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check src tests benchmarks tools

demo: install
	$(BIN)/moleflow demo --out runs/demo

# docs/config.schema.json from the config models (tests/test_config.py fails while it is stale)
schema: install
	$(BIN)/python -m moleflow.config > docs/config.schema.json

constraints: install
	$(BIN)/python tools/constraints.py > constraints.txt
