# Every target installs what it needs first: on a fresh machine `make test` is enough.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Which JAX `make install` puts in: auto (the machine's accelerator, else CPU), cpu, cuda12,
# cuda13, tpu, or system (keep a compatible JAX already installed); see scripts/install.sh.
JAX ?= auto
JAX_VERSION ?=
EXTRAS ?=
STAMP := $(VENV)/.installed-$(JAX)$(JAX_VERSION)

# XLA's large per-step temporaries make glibc malloc map and unmap pages every step; jemalloc
# keeps them (see docs/performance-notes.md). Used where installed: apt-get install libjemalloc2.
JEMALLOC := $(wildcard /lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /lib/aarch64-linux-gnu/libjemalloc.so.2)
ifneq ($(JEMALLOC),)
export LD_PRELOAD := $(firstword $(JEMALLOC))
export MALLOC_CONF := oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1
endif

.PHONY: install gpu-wheels eval test test-fast lint docs format tokenize pretrain finetune dpo grpo distill bench generate serve sweep runs

# Extra overrides for the run targets, e.g. make pretrain ARGS="train.steps=50".
ARGS ?=
# The run generate (and serve) use: the newest fine-tuned run (an adapter or a full model),
# else the newest run of any stage.
LATEST_FINETUNED = $(shell ls -td runs/*/adapter_config.json $$(grep -l '"stage": "finetune' runs/*/state.json 2>/dev/null) 2>/dev/null | head -1 | xargs -r dirname)
LATEST_RUN = $(shell ls -td runs/*/config.yaml 2>/dev/null | head -1 | xargs -r dirname)
RUN ?= $(or $(LATEST_FINETUNED),$(LATEST_RUN))
PROMPT ?= def main(

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) JAX=$(JAX) JAX_VERSION=$(JAX_VERSION) EXTRAS=$(EXTRAS) \
	  bash scripts/install.sh
	rm -f $(VENV)/.installed*
	touch $(STAMP)

# Wheels for scripts/gpu_check.sh on an offline GPU machine whose Python (3.12, x86-64) has JAX
# but not all of this package's dependencies: what pip resolves for this package with that JAX,
# less the JAX stack and the large binaries such an image has anyway (jax, jaxlib, numpy, scipy).
GPU_PYTHON ?= 3.12
GPU_JAX ?= 0.11.2
GPU_WHEELS := scripts/wheels
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q -d $(GPU_WHEELS) --only-binary=:all: --implementation cp \
	  --python-version $(GPU_PYTHON) $(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) \
	  --platform manylinux2014_x86_64 . 'setuptools>=68' jax==$(GPU_JAX)
	cd $(GPU_WHEELS) && rm -f jax-* jaxlib-* jax_cuda* numpy-* scipy-* ml_dtypes-* tensorstore-* \
	  pipeline-*
	du -sh $(GPU_WHEELS)

# The whole suite (what CI runs), in two runs: the serving tests (many engines, each compiling
# its programs) apart from the rest, so neither inherits the other's compiled state. Each run
# spreads its files over TEST_WORKERS processes (pytest-xdist, a whole file per worker, so a
# module's fixtures are built once): the tests are mostly single-threaded compilation.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile
SERVING_TESTS := tests/test_adapters.py tests/test_eval.py tests/test_paged.py \
  tests/test_engine_process.py tests/test_serve.py tests/test_serve_api.py tests/test_serve_process.py \
  tests/test_speculative.py
test: install
	$(PYTEST) --durations=15 $(addprefix --ignore=,$(SERVING_TESTS))
	$(PYTEST) --durations=15 $(SERVING_TESTS)

# The in-process unit tests, for the inner loop (whole stages, loaded engines, subprocesses
# and servers are marked e2e or slow and left to make test).
test-fast: install
	$(PYTEST) -m "not slow and not e2e" --durations=10

lint: install
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests
	$(BIN)/lint-imports

# The documentation site (MkDocs with the Material theme), built strictly: a broken link, a page
# missing from the navigation or a bad anchor fails. make docs-serve previews it on :8001.
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

format: install
	$(BIN)/ruff check --fix pipeline tests
	$(BIN)/ruff format pipeline tests

tokenize: install
	$(BIN)/python -m pipeline tokenize --config configs/pretrain.yaml $(ARGS)

pretrain: install
	$(BIN)/python -m pipeline pretrain --config configs/pretrain.yaml $(ARGS)

finetune: install
	$(BIN)/python -m pipeline finetune --config configs/finetune.yaml $(ARGS)

dpo: install
	$(BIN)/python -m pipeline dpo --config configs/dpo.yaml $(ARGS)

# GRPO needs a model that already answers in the task's format: a small byte-level base and
# its supervised start are made first (each skipped once finished), then reinforced.
grpo: install
	@grep -qs '"status": "finished"' runs/grpo-base/state.json || \
	  $(BIN)/python -m pipeline pretrain --config configs/grpo_base.yaml run.progress=false
	@grep -qs '"status": "finished"' runs/sft-reversal/state.json || \
	  $(BIN)/python -m pipeline finetune --config configs/sft_reversal.yaml run.progress=false
	$(BIN)/python -m pipeline grpo --config configs/grpo.yaml $(ARGS)

distill: install
	$(BIN)/python -m pipeline distill --config configs/distill.yaml $(ARGS)

bench: install
	$(BIN)/python -m pipeline bench train $(ARGS)

generate: install
	@test -n "$(RUN)" || { echo "error: no run in runs/: make pretrain first"; exit 2; }
	$(BIN)/python -m pipeline generate --run $(RUN) --prompt "$(PROMPT)" $(if $(wildcard $(RUN)/adapter_config.json),--chat,) $(ARGS)

# lm-evaluation-harness through the real server on the offline stdlib tasks: make eval [RUN=...]
LIMIT ?=
eval: install
	@test -n "$(RUN)" || { echo "error: no run in runs/: make pretrain first"; exit 2; }
	$(BIN)/python -m pipeline eval --run $(RUN) $(if $(LIMIT),--limit $(LIMIT),) $(if $(CHAT),--chat,) $(ARGS)

# The server is a long-lived process: jemalloc returns pages idle for 5 s (compilation's
# leftovers; a 1B model's engine peaked at 6.8 GB against 7.8 never returning them, and served
# no slower: docs/models.md), where training keeps every page for its per-step temporaries.
serve: export MALLOC_CONF := oversize_threshold:0,dirty_decay_ms:5000,muzzy_decay_ms:5000
serve: install
	@test -n "$(RUN)" || { echo "error: no run in runs/: make pretrain first"; exit 2; }
	$(BIN)/python -m pipeline serve --run $(RUN) --config configs/serve.yaml $(ARGS)

# make sweep CONFIG=configs/pretrain_tiny.yaml GRID="optimizer.lr=1e-3,3e-3 model.num_layers=1,2"
CONFIG ?= configs/pretrain_tiny.yaml
sweep: install
	@test -n "$(GRID)" || { echo 'error: GRID="key=v1,v2 ..." is required'; exit 2; }
	$(BIN)/python -m pipeline sweep --config $(CONFIG) $(ARGS) --grid $(GRID)

runs: install
	$(BIN)/python -m pipeline runs $(ARGS)
