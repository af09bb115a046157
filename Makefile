# kvpareto: `make search` runs the main job, `make test` runs the tests. Both set up everything
# they need first (a .venv, the dependencies, the default model), and both are idempotent.
#
# torch: TORCH picks the build pip installs when the venv has none. The default, torch==2.13.0,
# is a CPU wheel on the machines this project targets; elsewhere pass the build you want, e.g.
# `make test TORCH="torch==2.13.0 --index-url <your CUDA index>"`, or install torch into .venv first.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
MODEL  ?= smollm2-135m
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpareto-installed
RESULTS ?= results

.PHONY: setup model search smoke test report bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

model: setup
	$(BIN)/kvpareto models pull $(MODEL)

# Until `kvpareto search` lands (issue #6), the main job evaluates a fixed set of configurations
# on the default model: the 16-bit baseline, then 8-, 4- and 2-bit caches and a chunked prefill.
SEARCH_CONFIGS := \
	"--k-bits 16 --v-bits 16" \
	"--k-bits 8 --v-bits 8" \
	"--k-bits 4 --v-bits 4" \
	"--k-bits 4 --v-bits 2 --residual-length 32 --chunk-size 256" \
	"--k-bits 2 --v-bits 2 --k-granularity per-channel --residual-length 32"

search: model
	mkdir -p $(RESULTS)/$(MODEL)/eval
	@for flags in $(SEARCH_CONFIGS); do \
		$(BIN)/kvpareto eval --model $(MODEL) --tasks niah --context-lengths 1024 --samples 10 $$flags || exit $$?; \
	done

smoke: setup
	@for m in tiny-llama tiny-gemma3; do \
		$(BIN)/kvpareto eval --model $$m --context-lengths 512 --samples 2 --k-bits 4 --v-bits 2 --chunk-size 64 || exit $$?; \
	done

test: model
	$(BIN)/python -m pytest

report: setup
	@echo "kvpareto report lands with issue #7; nothing to build yet." >&2; exit 1

bench: model
	$(BIN)/python -c "import optimum.quanto" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/kvpareto bench --model $(MODEL) --threads 2

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
