# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint format typecheck bench bench-quick chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

BENCH_STAMP = $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/kaya run --config config.toml

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The whole suite, one benchmark after another; JSON, PNG charts and a table of targets
# under bench/results/ (bench/README.md says what each figure means).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.suite

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.suite --quick

# A 3-server `kaya dev-cluster` beside one local node: throughput and CPU per command for
# 1-3 nodes, kill -9 failover, shard handoff (bench/cluster.py); about 2 min.
.PHONY: bench-cluster
bench-cluster: $(BENCH_STAMP)
	$(BIN)/python -m bench.cluster

# The bank under faults on one node (kill -9, SIGSTOP, a full disk), judged by an
# independent checker (bench/chaos.py); bounded, about 6 min; not part of `make test`.
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

# The bank on a 3-server, 3-node `kaya dev-cluster` under faults (kill -9 of a node,
# SIGSTOP of a shard owner, kill -9 of the KAYA_EVENTS leader, a rolling restart), checked
# after each run (bench/chaos_cluster.py); about 4 min; not part of `make test`.
.PHONY: chaos-cluster
chaos-cluster: $(STAMP)
	$(BIN)/python -m bench.chaos_cluster

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
