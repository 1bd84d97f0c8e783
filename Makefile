# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project with the exact versions in constraints.txt,
# the lock the test suite last passed with (`make lock` regenerates it); the demo data
# comes from Debian's dataset-fashion-mnist package (see scripts/get_fashion_mnist.sh).
# `make test-latest` runs the suite on the newest releases instead, to find drift first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := constraints.txt
LATEST := .venv-latest
LOCKING := .venv-lock
PYTEST := -m pytest -q -n 2 --durations=15 tests
# test-latest ignores pip's site config (e.g. a machine-wide version cap) to see the newest
# releases a user's pip would resolve.
UNCAPPED := PIP_CONFIG_FILE=/dev/null

.PHONY: demo test data lock test-latest

$(STAMP): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

data:
	bash scripts/get_fashion_mnist.sh

demo: $(STAMP) data
	$(VENV)/bin/jest-curate demo

test: $(STAMP) data
	$(PY) $(PYTEST)

# A fresh venv from setup.py's ranges (as this machine's pip resolves them); the lock is
# rewritten only if the whole suite passes on it.
lock: data
	rm -rf $(LOCKING)
	$(PYTHON) -m venv $(LOCKING)
	$(LOCKING)/bin/python -m pip install --quiet --upgrade pip wheel setuptools
	$(LOCKING)/bin/python -m pip install --quiet -e '.[dev]'
	$(LOCKING)/bin/python $(PYTEST)
	{ echo "# The exact versions the test suite passed with: \`make lock\` wrote this file on"; \
	  echo "# $$(uname -sm), Python $$($(LOCKING)/bin/python -c 'import platform; print(platform.python_version())'). \`make test\` and \`make demo\` install with it."; \
	  $(LOCKING)/bin/python -m pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCKING)

test-latest: data
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(UNCAPPED) $(LATEST)/bin/python -m pip install --quiet --upgrade pip wheel setuptools
	$(UNCAPPED) $(LATEST)/bin/python -m pip install --quiet --upgrade -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | LC_ALL=C sort -f > $(LATEST)/versions.txt
	@echo "Versions that differ from $(LOCK) (< lock, > latest):"
	@diff <(grep -v '^#' $(LOCK)) $(LATEST)/versions.txt | grep '^[<>]' || echo "  none"
	JEST_CURATE_UNLOCKED=1 $(LATEST)/bin/python $(PYTEST)
