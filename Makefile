# Quickstart: `make train` (the main job) and `make test` (the whole suite). Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch build the project is tested with; installed before the project so that pip does not
# resolve `torch>=2.4` to a multi-GB CUDA wheel.
TORCH  ?= torch==2.13.0

.PHONY: setup test test-fast train lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,cli]'
	touch $(STAMP)

# op_db (torch's OpInfo samples) changes global backend flags on import, so it runs on its own.
test: $(STAMP)
	$(PY) -m ruff check torchderiv tests experiments
	$(PY) -m pytest -q --ignore=tests/opdb
	$(PY) -m pytest -q tests/opdb

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --ignore=tests/opdb

train: $(STAMP)
	$(PY) -m torchderiv.train

lint: $(STAMP)
	$(PY) -m ruff check torchderiv tests experiments

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
