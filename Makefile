# Two entry points for a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DIST_STAMP := $(VENV)/.installed-distributed

.PHONY: install install-distributed quickstart test test-all lint check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# CPU build of torch unless an NVIDIA GPU is present (a bare `torch` may pull a multi-GB CUDA build).
$(STAMP): $(BIN)/python pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet torch; \
	else \
		$(BIN)/pip install --quiet torch==2.13.0 || $(BIN)/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	bash examples/quickstart.sh $(BIN)/uclr

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff: format and lint rules in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The one command that checks a change: lint, then the default test suite.
check: lint test

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# The `bench` extra (implicit, the `quality` section's peer) on top of the CPU/GPU torch chosen above.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH_STAMP)

# The `distributed` extra (torchrec: `uclr pretrain --sharding`, docs/distributed.md). torchrec 1.8.0 and fbgemm's
# CPU build 1.8.0 are the versions that load with torch 2.13; both go in with --no-deps, since torchrec declares
# fbgemm-gpu (the CUDA build) and pip would replace torch to satisfy it.
$(DIST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[distributed]'
	$(BIN)/pip install --quiet --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
	@touch $(DIST_STAMP)

install-distributed: $(DIST_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) data/synthetic runs/synthetic
