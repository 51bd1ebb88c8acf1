# megasft: `make demo` and `make test` each set the project up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; pinned so that pip never pulls the CUDA wheels on a machine without a GPU.
CPU_TORCH := torch==2.13.0

.PHONY: setup test lint format demo bench clean images

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then \
		echo "accelerator found: installing torch from the package index"; \
	else \
		echo "no GPU: installing the CPU build $(CPU_TORCH)"; \
		$(BIN)/python -m pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: setup
	$(BIN)/python -m megasft.demo

# Every benchmark under bench/, or a chosen few: make bench BENCHES=bench/prepare.py
BENCHES ?= $(wildcard bench/*.py)
bench: setup
	@for script in $(BENCHES); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# The container images under docker/, named by src/megasft/images.py (MEGASFT_IMAGE_REGISTRY,
# MEGASFT_IMAGE_TAG). IMAGES picks families (make images IMAGES="cpu mlflow"); PUSH=1 pushes them.
# Exits 2, saying what it found, where neither docker nor podman can build (docs/deploy.md).
IMAGES ?=
images: setup
	$(BIN)/python -m megasft.images build $(IMAGES) $(if $(PUSH),--push)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
