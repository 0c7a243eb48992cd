# Two entry points: `make demo` and `make test`. Both create .venv and install pinned deps.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install clean bench browser

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

# Chromium for the report's browser test: installed with apt-get where this runs as root,
# otherwise that one test is skipped (pytest prints why).
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing chromium with apt-get (for the report's browser test)"; \
		{ DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null 2>&1 || \
		  { timeout 300 apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null 2>&1; }; } || \
		echo "make: could not install chromium; the report's browser test will be skipped"; \
	else \
		echo "make: no chromium, and apt-get needs root; the report's browser test will be skipped"; \
	fi

test: lint typecheck browser
	$(BIN)/python -m pytest

# Every benchmark written up in docs/benchmarks.md and docs/planning.md, with its defaults
# (about an hour on 2 idle cores); tests/unit/test_gates.py checks that none is left out.
bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/overhead_paired.py
	$(BIN)/python benchmarks/checkpoint_io.py
	$(BIN)/python benchmarks/fsdp_vs_ddp.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/comm_tuning.py
	$(BIN)/python benchmarks/compile_speed.py
	$(BIN)/python benchmarks/memory_plan.py
	$(BIN)/python benchmarks/data_stream.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
