# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test test-fast lint install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# The quick loop: everything but the slow, end-to-end and multi-process tests (markers in setup.cfg).
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow and not e2e and not ddp"

# pyflakes, import order and bugbear (rules in pyproject.toml); CI runs it before the tests.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

demo: $(VENV)/.installed
	$(BIN)/cxr-search demo --out demo-out

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_encoders.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
