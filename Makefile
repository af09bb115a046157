# kvpareto: `make search` runs the main job, `make test` runs the tests. Both set up everything
# they need first (a .venv, the dependencies, the default model), and both are idempotent.
#
# torch: TORCH picks the build pip installs when the venv has none. The default, torch==2.13.0,
# is a CPU wheel on the machines this project targets; elsewhere pass the build you want, e.g.
# `make test TORCH="torch==2.13.0 --index-url <your CUDA index>"`, or install torch into .venv first.
#
# Versions: every other dependency is installed at the exact version in constraints.txt, the set
# CI tested (`make lock` regenerates it from pyproject.toml's ranges; .ci/compat checks the newest
# versions those ranges allow).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
MODEL  ?= smollm2-135m
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpareto-installed
RESULTS ?= results

.PHONY: setup model search smoke test report bench bench-peers sampler-grid lint format lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# the fused decode kernel, compiled once per CPU kind; without a compiler, runs go without it
	$(BIN)/kvpareto build-kernels || true
	touch $@

model: setup
	$(BIN)/kvpareto models pull $(MODEL)

# The main job: a multi-objective search of the default space on the default model. It resumes
# if interrupted (same study name), prints the frontier, and writes results and an HTML report
# under results/<model>/niah-mk-uuid-2k/. The tasks are multi-key NIAH and UUID needles at 2k:
# plain NIAH scores most of SmolLM2's configs 10/10 and cannot rank them (docs/findings.md).
# The knee's group gets 20 samples per task, so its paired interval is about +-0.1 or less.
SEARCH_FLAGS ?= --space search_spaces/default.yaml --context-length 2048 --tasks niah-mk,niah:uuid \
	--samples 5 --knee-samples 20 --trials 24 --sampler tpe --seed 0 --study niah-mk-uuid-2k

search: model
	$(BIN)/kvpareto search --model $(MODEL) --out $(RESULTS) $(SEARCH_FLAGS)

# A tiny-model search end to end in well under two minutes (what CI's smoke test also runs).
smoke: setup
	$(BIN)/kvpareto search --model tiny-llama --space search_spaces/smoke.yaml --tasks agreement \
		--context-length 512 --samples 6 --trials 12 --study smoke --out $(RESULTS)
	$(BIN)/kvpareto frontier $(RESULTS)/tiny-llama/smoke

test: model
	$(BIN)/python -m pytest

# Rebuild the HTML report from existing results (every study of every model under results/).
report: setup
	$(BIN)/kvpareto report $$(dirname $$(ls $(RESULTS)/*/*/frontier.json)) -o $(RESULTS)/report.html

bench: model
	$(BIN)/python -c "import optimum.quanto" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/kvpareto bench --model $(MODEL) --threads 2

# llama.cpp beside ours on the same GGUF (issue #14's peer): pip compiles llama-cpp-python for
# this CPU the first time (several minutes on 2 cores), then decode is timed at 1k, 4k and 8k.
bench-peers: model
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[peers]"
	$(BIN)/kvpareto bench --model $(MODEL) --threads 2 --parts peers --context-lengths 1024,4096,8192

# The sampler replay benchmark's stored grids (benchmarks/samplers/README.md): every config of a
# space evaluated once by a grid study (racing and the knee top-up off: the table needs every
# config's figures at one sample count), then its table written beside the space.
# GRID=tiny-llama-agreement (the default, 330 configs: ~15 min quiet on 2 cores) or
# GRID=smollm2-niah (96 configs of SmolLM2-135M: ~44 s each, about 75 min quiet on 2 cores).
GRID ?= tiny-llama-agreement
GRID_MODEL_tiny-llama-agreement := tiny-llama
GRID_FLAGS_tiny-llama-agreement := --tasks agreement --context-length 512 --samples 12
GRID_MODEL_smollm2-niah := smollm2-135m
GRID_FLAGS_smollm2-niah := --tasks niah --context-length 2048 --task-lengths 1024,2048 --samples 5
SAMPLER_GRID := benchmarks/samplers/$(GRID)
sampler-grid: setup
	$(BIN)/kvpareto search --model $(GRID_MODEL_$(GRID)) --space $(SAMPLER_GRID).yaml \
		$(GRID_FLAGS_$(GRID)) --min-samples 0 --knee-samples 0 --sampler grid --trials 1 \
		--study sampler-grid-$(GRID) --out $(RESULTS)
	$(BIN)/python -c "import json, sys; from pathlib import Path; \
		from kvpareto.search.replay import table_from_study as t; \
		Path(sys.argv[3]).write_text(json.dumps(t(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))" \
		$(RESULTS)/$(GRID_MODEL_$(GRID))/sampler-grid-$(GRID) $(SAMPLER_GRID).yaml $(SAMPLER_GRID).json

# style, then the layer contract of docs/architecture.md (pyproject's [tool.importlinter])
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate constraints.txt: the newest versions pyproject.toml allows, resolved by uv against the
# torch build installed in .venv (so its dependencies are those of the CPU wheel, not of PyPI's
# CUDA build; torch itself stays out of the file, TORCH installs it). Run `make test` after it.
lock: setup
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench --extra peers --upgrade --quiet \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--constraint $(VENV)/torch-pin.txt $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
		--no-emit-package torch --custom-compile-command "make lock" -o constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
