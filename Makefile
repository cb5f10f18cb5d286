# nora: every command a user needs. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lint demo demo-full demo-tune test test-slow demo-table tables table1 table2 ablations matched-budget \
	bench bench-kernels bench-train gpu-check clean help

help:
	@echo "make setup | demo | demo-full | demo-tune | lint | test | test-slow | demo-table | tables | table1 | table2"
	@echo "     ablations | matched-budget | bench | bench-kernels | bench-train | gpu-check | clean   (README.md explains each)"

# Virtual environment with the pinned requirements and the package (editable).
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job, offline: a ViT pretrained here on digits, fine-tuned with every method (results/demo.md); a small
# LLaMA pretrained here on a generated world, instruction-tuned with every LLM method through train.py and scored by
# eval.py (results/demo_llm.md); then every table and figure that the existing runs allow (results/).
demo: $(STAMP)
	$(PY) -m nora.demo
	$(PY) -m nora.demo.llm
	$(PY) -m nora.results tables

# The demo with more seeds on every task (configs/demo/demo.yaml `full_seeds`), reported in results/demo_full/;
# same runs directory, so the default demo's runs are reused (results/demo.md keeps the default's seeds only).
demo-full: $(STAMP)
	$(PY) -m nora.demo --full
	$(PY) -m nora.demo.llm --full
	$(PY) -m nora.results tables

# The demos' learning-rate sweeps (validation splits): rewrite configs/demo/learning_rates.yaml and
# results/demo_lr_sweep.md, configs/demo/learning_rates_llm.yaml and results/demo_llm_lr_sweep.md.
demo-tune: $(STAMP)
	$(PY) -m nora.demo --tune
	$(PY) -m nora.demo.llm --tune

# The formatter and the linter (pyproject.toml [tool.ruff]) and the layers contract (pyproject.toml
# [tool.importlinter]: docs/architecture.md), then the test suite (offline, CPU). `slow` tests are left out;
# `make test-slow` runs them. .pre-commit-config.yaml runs the same checks before each commit.
lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q --durations=25

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=10

# Benchmarks (JSON under results/, quoted in README.md): rational kernels vs GELU, and a training step per method.
bench: bench-kernels bench-train

bench-kernels: $(STAMP)
	$(PY) -m nora.bench kernels

bench-train: $(STAMP)
	$(PY) -m nora.bench train

# On a CUDA machine: Triton correctness, kernel + training benchmarks, copy bandwidth (results/); CPU part only elsewhere.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf runs outputs multirun .pytest_cache

# Paper results (sweeps/README.md). Each target runs its Hydra sweep(s) through train.py, then renders results/.
# Re-running skips complete jobs and resumes interrupted ones. Options (make variables):
#   SWEEP_ARGS="..."  extra Hydra overrides for every job, e.g. "hydra/launcher=slurm_1gpu hydra.launcher.partition=gpu"
#   DRY_RUN=1         list each sweep's jobs (complete / resumable / to run) and launch nothing
#   ALPACA_PATH=..., OPENORCA_PATH=...  local data for Table 2 (default: the Hugging Face hub)
#   EVAL_ARGS="..."   extra arguments for eval.py (Table 2's MMLU evaluations)
table1: $(STAMP)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name table1 $(SWEEP_ARGS)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name table1_low_budget \
		$(SWEEP_ARGS)
	$(PY) -m nora.results tables

# LLaMA-3-8B: train (one sweep invocation per dataset, so each gets its own data.path), then MMLU for every
# finished run without runs/table2/<run>/mmlu.json and for the base model (runs/eval/llama3_8b/mmlu.json).
table2: $(STAMP)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name table2 \
		experiment=llama3_alpaca data.path=$(or $(ALPACA_PATH),null) $(SWEEP_ARGS)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name table2 \
		experiment=llama3_openorca data.path=$(or $(OPENORCA_PATH),null) $(SWEEP_ARGS)
	$(MMLU_JOBS)
	$(PY) -m nora.results tables

# MMLU for every finished run under runs/table2 without an mmlu.json, and for the base model (each line is quoted
# for the shell and Hydra: eval runs it).
define MMLU_JOBS
@if [ -z "$(DRY_RUN)" ]; then \
	$(PY) -m nora.results mmlu-jobs --runs runs/table2 --base llama3_8b --eval-root runs/eval | \
	while read -r job; do echo "$(PY) eval.py $$job $(EVAL_ARGS)"; eval "$(PY) eval.py $$job $(EVAL_ARGS)" || exit 1; done; \
else $(PY) -m nora.results mmlu-jobs --runs runs/table2 --base llama3_8b --eval-root runs/eval | sed 's/^/would run: eval.py /'; fi
endef

ablations: $(STAMP)
	for s in variant rank groups form numerator init; do \
		NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name ablation_$$s \
			$(SWEEP_ARGS) || exit 1; \
	done
	$(PY) -m nora.results tables

# NoRA++ against LoRA/DoRA at the ranks whose trainable counts bracket it (sweeps/README.md), ViT-Tiny then LLaMA.
matched-budget: $(STAMP)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name matched_vit $(SWEEP_ARGS)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name matched_llama \
		experiment=llama3_alpaca data.path=$(or $(ALPACA_PATH),null) $(SWEEP_ARGS)
	NORA_SWEEP_DRY_RUN=$(if $(DRY_RUN),true,false) $(PY) train.py -m --config-dir sweeps --config-name matched_llama \
		experiment=llama3_openorca data.path=$(or $(OPENORCA_PATH),null) $(SWEEP_ARGS)
	$(MMLU_JOBS)
	$(PY) -m nora.results tables

# Render every table, figure and results/README.md from whatever runs exist (never trains).
tables: $(STAMP)
	$(PY) -m nora.results tables

# The offline digits table (and its figures); runs the demo first (CPU, no network) if no demo run exists.
demo-table: $(STAMP)
	@$(PY) -m nora.results demo-table --check || $(MAKE) demo
	$(PY) -m nora.results demo-table
