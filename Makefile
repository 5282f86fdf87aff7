# shardline: `make serve` runs the server on the default model, `make test` runs the suite.
# Both install into .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m
INSTALLED := $(VENV)/.installed

.PHONY: install serve test pull bench clean

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

bench: pull
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) *.egg-info
