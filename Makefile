# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; the demo data comes from Debian's
# dataset-fashion-mnist package (see scripts/get_fashion_mnist.sh).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test data

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data:
	bash scripts/get_fashion_mnist.sh

demo: $(STAMP) data
	$(VENV)/bin/jest-curate demo

test: $(STAMP) data
	$(PY) -m pytest -q -n 2 --durations=15 tests
