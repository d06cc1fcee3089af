# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv and
# installs what it needs: torch (pinned), the project with its C++ extension, and the
# extras for the target. On Linux PyPI's torch is the CUDA build; for the CPU-only one:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (empty by default: pip's own configuration, e.g. a local mirror, picks the wheel).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: demo test bench install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when the build inputs change.
$(VENV)/.core: $(BIN)/python $(SOURCES)
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "medmnist==3.0.2"
	touch $@

install: $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/salm-fast demo

test: $(VENV)/.test
	$(BIN)/python -m pytest

bench: $(VENV)/.test
	$(BIN)/python -m bench kernels
