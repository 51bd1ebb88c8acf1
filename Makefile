# megasft: `make demo` and `make test` each set the project up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; pinned so that pip never pulls the CUDA wheels on a machine without a GPU.
CPU_TORCH := torch==2.13.0

.PHONY: setup test lint format demo demo-moe bench clean images compile setup-compat test-compat gpu-check

# kubectl renders the manifests for tests/deploy (`kubectl kustomize`, kustomize v5 from kubectl
# 1.27 on; those tests skip without it). Where it is absent, setup installs it from the
# distribution's packages, once per virtual environment and only as root with apt-get: the
# package `kubectl` where a configured repository has it (pkgs.k8s.io), else `kubernetes-client`
# if it is 1.27 or newer (Debian 12's is 1.20, whose kustomize cannot build the overlays).
# Otherwise it says so; kubectl never fails setup.
KUBECTL_MIN := 1.27
KUBECTL_TRIED := $(VENV)/.kubectl-tried

setup: $(STAMP)
	@if command -v kubectl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ ! -e $(KUBECTL_TRIED) ]; then \
		touch $(KUBECTL_TRIED); \
		echo "no kubectl: trying the distribution's packages"; \
		apt-get update -qq >/dev/null 2>&1; \
		client=$$(apt-cache policy kubernetes-client 2>/dev/null | sed -n 's/^ *Candidate: *//p'); \
		if apt-get install -y -qq kubectl >/dev/null 2>&1; then \
			echo "installed kubectl: $$(kubectl version --client 2>/dev/null | head -n 1)"; \
		elif [ -n "$$client" ] && [ "$$client" != "(none)" ] \
			&& dpkg --compare-versions "$${client#*:}" ge $(KUBECTL_MIN) \
			&& apt-get install -y -qq kubernetes-client >/dev/null 2>&1; then \
			echo "installed kubernetes-client $$client"; \
		else \
			echo "note: no kubectl $(KUBECTL_MIN)+ in the distribution's packages (kubernetes-client: $${client:-none}); tests/deploy's manifest tests will skip; see docs/deploy.md"; \
		fi; \
	else \
		echo "note: no kubectl; tests/deploy's manifest tests will skip (install kubectl $(KUBECTL_MIN)+, see docs/deploy.md)"; \
	fi

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then \
		echo "accelerator found: installing torch from the package index"; \
	else \
		echo "no GPU: installing the CPU build $(CPU_TORCH)"; \
		$(BIN)/python -m pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev,lmeval]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

# The second, newer environment (README, "Supported versions"): Python 3.12 and the megatron-core
# that pyproject.toml selects there (0.19.2), beside the default one above. For Python 3.12 the
# registries serve only the CUDA build of torch (several GB, runs on CPU); it is pinned to the
# default's version so the two environments differ in Python and megatron-core alone. python3.12
# is looked for on PATH, then in pyenv's versions; set PYTHON_COMPAT to choose another.
COMPAT_VENV := .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TORCH := torch==2.13.0
PYTHON_COMPAT ?= $(firstword $(foreach candidate,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(candidate) -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $(candidate))))
# Every test that runs megatron-core: its models and CPU emulation, checkpoint conversion,
# training, evaluation of a megatron checkpoint, the demo pipeline at test size, the GPU
# check's dry run, and the plan held against the live models.
COMPAT_TESTS := tests/megatron tests/checkpoint tests/train tests/evaluate/test_stage.py tests/test_demo.py \
	tests/test_gpu_check.py tests/plan/test_static.py tests/plan/test_activations.py

setup-compat: $(COMPAT_STAMP)

$(COMPAT_STAMP): pyproject.toml
	@test -n "$(PYTHON_COMPAT)" || { echo "no Python 3.12 found; set PYTHON_COMPAT=/path/to/python3.12"; exit 1; }
	test -x $(COMPAT_BIN)/python || $(PYTHON_COMPAT) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install --quiet --upgrade pip
	$(COMPAT_BIN)/python -m pip install --quiet $(COMPAT_TORCH)
	$(COMPAT_BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(COMPAT_STAMP)

test-compat: setup-compat
	$(COMPAT_BIN)/python -m pytest -q $(COMPAT_TESTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# One line per step; VERBOSE=1 streams everything the steps print (python -m megasft.demo --verbose).
demo: setup
	$(BIN)/python -m megasft.demo $(if $(VERBOSE),--verbose)

# The same with a tiny Qwen3-MoE, its experts split over the 2 training processes.
demo-moe: setup
	$(BIN)/python -m megasft.demo --config demo-moe $(if $(VERBOSE),--verbose)

# The pipeline's KFP YAML, compiled from source (never committed); CI checks that it compiles.
compile: setup
	$(BIN)/megasft pipeline compile --output build/sft-pipeline.yaml

# Every benchmark under bench/ (the GPU check has its own target), or a chosen few:
# make bench BENCHES=bench/prepare.py
BENCHES ?= $(filter-out bench/gpu_check%.py,$(wildcard bench/*.py))
bench: setup
	@for script in $(BENCHES); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# One command for a fresh CUDA/ROCm machine (bench/gpu_check.py; docs/train.md, "Checking a GPU
# machine"). Not through setup: it runs on the machine's own Python and torch, offline.
# WHEELS=DIR installs the wheels there first (megatron-core's), OUTPUT=DIR takes the report,
# DRY_RUN=1 runs the same code at tiny shapes on the CPU.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py --output $(or $(OUTPUT),gpu-check) \
		$(if $(WHEELS),--wheels $(WHEELS)) $(if $(DRY_RUN),--dry-run)

# The container images under docker/, named by src/megasft/images.py (MEGASFT_IMAGE_REGISTRY,
# MEGASFT_IMAGE_TAG). IMAGES picks images (make images IMAGES="cpu mlflow"); PUSH=1 pushes them.
# Exits 2, saying what it found, where neither docker nor podman can build (docs/deploy.md).
IMAGES ?=
images: setup
	$(BIN)/python -m megasft.images build $(IMAGES) $(if $(PUSH),--push)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) demo-output demo-moe-output .pytest_cache
