# Two entry points (see README): `make train` runs the main job, `make test` runs the suite.
# Both create .venv and install what they need; on a machine without an NVIDIA GPU the CPU build
# of torch is installed first so that pip never pulls the multi-GB CUDA build. PyPI has no `+cpu`
# build: the first try takes one where pip already finds it (a local wheel), else torch's CPU index
# (2.13.0+cpu on Linux, 2.13.0 on macOS), else that index's newest torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing torch from PyPI (CUDA build)"; $(BIN)/pip install -q "torch>=2.6"; \
	else \
	  echo "no GPU: installing the CPU build of torch"; \
	  $(BIN)/pip install -q "torch==2.13.0+cpu" 2>/dev/null \
	    || $(BIN)/pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
	    || $(BIN)/pip install -q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(BIN)/seektrain train

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV)
