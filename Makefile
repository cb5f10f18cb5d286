# nora: every command a user needs. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow demo-table tables table1 table2 ablations bench bench-kernels bench-train gpu-check clean help

help:
	@echo "make setup | demo | test | test-slow | demo-table | tables | table1 | table2 | ablations | bench | gpu-check | clean"

# Virtual environment with the pinned requirements and the package (editable).
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job, offline: a ViT pretrained here on digits, fine-tuned with every method (results/demo.md).
demo: $(STAMP)
	$(PY) -m nora.demo

# The test suite (offline, CPU). `slow` tests are left out; `make test-slow` runs them.
test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs outputs multirun .pytest_cache
