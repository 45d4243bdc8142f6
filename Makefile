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
# A grid sized for one scale runs at it unless SCALE is given (experiments/grids/memory.yaml says why).
GRID_SCALE_memory := smoke
SCALE ?= $(or $(GRID_SCALE_$(GRID)),tiny)
ARGS ?=
JOBS ?= auto
PYTEST_ARGS ?=
# Test files spread over this many processes (pytest-xdist; a file's tests stay in one, with its fixtures).
TEST_WORKERS ?= 2
BENCH_ARGS ?=
PORT ?= 5000

export TOKENIZERS_PARALLELISM := false
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1

.PHONY: install test test-slow test-all ablation report bench gpu-check ui ui-screenshots clean

install: $(STAMP)

# Re-installs when pyproject.toml changes; the stamp is written last, so a failed install is retried.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# Two tiers: the default one (unit, equivalence, kernels, a few smoke runs end to end) in minutes; the slow one
# (tests over about 10 s: learning, grids end to end, interrupted runs, inductor) and the gpu tests (skipped
# without CUDA). The two together are test-all; CI (.ci/run) runs both, one after the other.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# pytest's exit status 5 (no test collected, say under a PYTEST_ARGS filter) is not a failure of the tier.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or gpu" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The corpus keys of a grid that does not train on the default corpus (its base's data.*), for the prepare step.
GRID_DATA_memory := data.corpus=cast data.tokenizer=bytes data.cast.num_docs=200 data.cast.cast_size=8 data.cast.sentences=short
# One ablation grid end to end: prepare the corpus at this scale (data.* keys of ARGS included), train every
# cell of experiments/grids/$(GRID).yaml, JOBS at once, then print the table (lrexp grid ends with the report).
ablation: $(STAMP)
	$(PY) -m lrexp.cli data prepare scale=$(SCALE) $(GRID_DATA_$(GRID)) $(filter data.%,$(ARGS))
	$(PY) -m lrexp.cli grid $(GRID) --jobs $(JOBS) scale=$(SCALE) $(ARGS)

# The table and plots of the grid's latest invocation, from MLflow alone, under reports/$(GRID)/.
report: $(STAMP)
	$(PY) -m lrexp.cli report $(GRID)

# What lrexp costs on this machine, measured in one run (bench/bench.py): step time of every row against
# Slide:13L and the paper, scaling in the segment length, MFU, Lightning's overhead over a bare loop, data
# preparation MB/s, torch.compile per row, the attention kernels where CUDA is present; written to
# reports/bench/bench.md and bench.json. SCALE and ARGS as for ablation; BENCH_ARGS are the script's own options
# (--repeats N, --compile-backend none, --quick).
bench: $(STAMP)
	$(PY) bench/bench.py scale=$(SCALE) $(BENCH_ARGS) $(ARGS)

# One prepared check on a CUDA machine (scripts/gpu_check.py, docs/benchmark.md#gpu-check), within 8 minutes:
# the gpu tests, the kernel bench, every row's step and MFU, three minutes of training, a TOVA evaluation; written
# to docs/results/gpu/<device>/. DRY=1 runs every part at tiny size on the CPU; without CUDA it refuses.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py $(if $(DRY),--dry)

# Prints the address of the latest grid's runs first; the store is $MLFLOW_TRACKING_URI or ./mlflow.db.
ui: $(STAMP)
	$(PY) -m lrexp.cli ui --port $(PORT)

# Screenshots of the MLflow UI as `make ui` opens it, under docs/ui/ (docs/ui.md): headless Chromium over the
# store STORE (an MLflow URI), else over a smoke grid it trains first.
ui-screenshots: $(STAMP)
	$(PY) scripts/ui_screenshots.py $(if $(STORE),--store $(STORE))

clean:
	rm -rf runs reports checkpoints .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
