# Two entry points: `make demo` and `make test`. Both create .venv and install pinned deps.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install clean bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/tiny  # the demo starts fresh each time; your own runs resume instead
	$(BIN)/steadytrain train examples/tiny.yaml --nproc 2 --run-dir runs/tiny
	$(BIN)/steadytrain audit runs/tiny

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/checkpoint_io.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
