# The README's two commands, set-up included: `make quickstart` and `make test`.
# On first use they create $(VENV), install the CPU build of torch only when $(VENV) has no importable torch (a
# CUDA build already there is kept), then install the project; later runs reinstall only when pyproject.toml changes.
# (--retries 1: where the CPU index cannot be reached, pip falls back to PyPI's wheel quickly.)
# Variables: VENV=.venv  PYTHON=python3  TORCH_VERSION=2.13.0  TORCH_INDEX=<CPU wheel index>  ARGS=<extra arguments>

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.condvec-installed

.PHONY: setup quickstart test lint

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "$(VENV): keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "$(VENV): installing torch==$(TORCH_VERSION) (CPU build)"; \
		$(BIN)/python -m pip install -q --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

quickstart: setup
	$(BIN)/python -m demo.data runs/data/quickstart-concepts --num 64 --if-missing \
		--concept "mascot=large magenta circle" --concept "badge=small cyan square"
	$(BIN)/condvec-train configs/quickstart.yaml $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check .
