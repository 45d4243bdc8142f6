# Every entry point a user types. `make test` and `make ablation` install what they need themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on machines without CUDA (it is on disk here); a CUDA machine takes the registry's default build.
# A torch already importable in the venv (say a CUDA build the user installed) is kept either way.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
STAMP := $(VENV)/.stamp-install
GRID ?= gates
SCALE ?= tiny
ARGS ?=
JOBS ?= 1
PYTEST_ARGS ?=
PORT ?= 5000

export TOKENIZERS_PARALLELISM := false
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1

.PHONY: install test test-all ablation report bench ui clean

install: $(STAMP)

# Re-installs when pyproject.toml changes; the stamp is written last, so a failed install is retried.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# One ablation grid end to end: prepare the corpus at this scale (data.* keys of ARGS included), train every
# cell of experiments/grids/$(GRID).yaml, JOBS at once, then print the table (lrexp grid ends with the report).
ablation: $(STAMP)
	$(PY) -m lrexp.cli data prepare scale=$(SCALE) $(filter data.%,$(ARGS))
	$(PY) -m lrexp.cli grid $(GRID) --jobs $(JOBS) scale=$(SCALE) $(ARGS)

# The table and plots of the grid's latest invocation, from MLflow alone, under reports/$(GRID)/.
report: $(STAMP)
	$(PY) -m lrexp.cli report $(GRID)

# Step time of every row relative to Slide:13L, the data loader's share of a step and the kNN memory's
# footprint, at SCALE, written under reports/bench/ (ARGS as for ablation); the attention kernels against
# SDPA and FlexAttention (without a GPU only its interpreter smoke check). On a GPU machine these are the
# numbers to quote.
bench: $(STAMP)
	$(PY) bench/model_step_time.py scale=$(SCALE) $(ARGS)
	$(PY) bench/data_throughput.py scale=$(SCALE) $(ARGS)
	$(PY) bench/memorizing.py scale=$(SCALE) $(ARGS)
	$(PY) bench/attention_kernels.py $(if $(shell command -v nvidia-smi 2>/dev/null),,--smoke)

# Prints the address of the latest grid's runs first; the store is $MLFLOW_TRACKING_URI or ./mlflow.db.
ui: $(STAMP)
	$(PY) -m lrexp.cli ui --port $(PORT)

clean:
	rm -rf runs reports checkpoints .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
