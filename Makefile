# Quickstart: `make train` (the main job) and `make test` (the whole suite). Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch build the project is tested with; installed before the project so that pip does not
# resolve `torch>=2.4` to a multi-GB CUDA wheel.
TORCH  ?= torch==2.13.0

# The newest torch installable here, in a venv of its own (a CUDA build of ~5.5 GB that also runs on CPU).
NEXT_VENV  ?= .venv-next
NEXT_PY    := $(NEXT_VENV)/bin/python
NEXT_STAMP := $(NEXT_VENV)/.installed
NEXT_TORCH ?= torch==2.14.1

.PHONY: setup test test-fast test-next test-torch-only docs train lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

# op_db (torch's OpInfo samples) changes global backend flags on import, so it runs on its own.
test: $(STAMP)
	$(PY) -m ruff check torchderiv tests experiments
	$(PY) -m pytest -q --ignore=tests/opdb
	$(PY) -m pytest -q tests/opdb

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --ignore=tests/opdb

$(NEXT_STAMP): pyproject.toml
	test -x $(NEXT_PY) || $(PYTHON) -m venv $(NEXT_VENV)
	$(NEXT_PY) -m pip install --quiet $(NEXT_TORCH)
	$(NEXT_PY) -m pip install --quiet -e '.[all,test]'
	touch $(NEXT_STAMP)

# The suite (not slow) on the newest torch, and the slow comparisons with Opacus (private runs on one and two
# processes, the DP config's targets); .ci/run runs it after `make test`.
test-next: $(NEXT_STAMP)
	$(NEXT_PY) -c "import torch; print('torch', torch.__version__)"
	$(NEXT_PY) -m pytest -q -m "not slow" --ignore=tests/opdb
	$(NEXT_PY) -m pytest -q -m slow tests/test_privacy.py
	$(NEXT_PY) -m pytest -q -m "not slow" tests/opdb

# torchderiv with torch alone (no extras): the smoke suite in a venv of its own; .ci/run runs it.
TORCH_ONLY_VENV ?= .venv-torch
test-torch-only:
	test -x $(TORCH_ONLY_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_ONLY_VENV)
	$(TORCH_ONLY_VENV)/bin/python -m pip install --quiet $(TORCH) pytest
	$(TORCH_ONLY_VENV)/bin/python -m pip install --quiet -e .
	TORCHDERIV_TORCH_ONLY=1 $(TORCH_ONLY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/torch_only

# The docs site (MkDocs, API reference from the docstrings) into site/, strict: a broken link or reference fails it.
docs: $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

train: $(STAMP)
	$(PY) -m torchderiv.train

lint: $(STAMP)
	$(PY) -m ruff check torchderiv tests experiments

clean:
	rm -rf $(VENV) $(NEXT_VENV) $(TORCH_ONLY_VENV) site lightning_logs runs .pytest_cache
