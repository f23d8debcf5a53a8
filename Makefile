# raylift: `make demo` runs the whole lifecycle on the embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raylift-installed
CONFIG ?= configs/banking77/minilm_lora.yaml

.PHONY: setup demo test test-gpu lint format bench clean-state

# Python writes each module's bytecode (__pycache__) the first time it imports it, here even
# where the environment says PYTHONDONTWRITEBYTECODE (an empty value lets it write): setup
# installs with --no-compile instead of byte-compiling all of torch, Ray, transformers and the
# rest up front, most of which is never imported. On 2 AVX2-only cores a fresh setup took 101 s
# against 196 s compiled; the first imports of the modules the suite and the demo use then
# compile those once (about 16 CPU-s for the main ones).
export PYTHONDONTWRITEBYTECODE :=

setup: $(STAMP)

# torch first and pinned: the CPU wheel of 2.13.0 is what dev machines and CI have; letting a
# dependency pull torch unpinned would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-compile torch==2.13.0
	$(BIN)/pip install --no-compile -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/raylift demo --config $(CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest -q -rs -p no:cacheprovider -n 2 tests/unit tests/integration tests/e2e

# tests/gpu: the train loop and the Predictor on a CUDA GPU, without Ray; skipped elsewhere.
test-gpu: setup
	$(BIN)/pytest -q -rs -p no:cacheprovider tests/gpu

bench: setup
	$(BIN)/pytest -q -s -p no:cacheprovider tests/benchmarks

clean-state:
	rm -rf .raylift
