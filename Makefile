# vtfuse: `make serve` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PRESET ?= tiny
CHECKPOINT ?= $(PRESET)
REPOSITORY ?= model_repository
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: install repository triton serve test lint unit integration train clean

install: $(VENV)/.installed

# torch is pinned to the CPU build on this machine's disk; numpy<2 is nvidia-pytriton's pin.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[export,dev]'
	touch $@

# Export the shipped checkpoint to ONNX, check parity, install into model_repository/.
$(REPOSITORY)/fusion/1/model.onnx: $(VENV)/.installed checkpoints/tiny/model.safetensors
	$(PY) -m serving.cli export all --target embedded --checkpoint $(CHECKPOINT) --repo $(REPOSITORY)

repository: $(REPOSITORY)/fusion/1/model.onnx

# Triton alone on the built repository, foreground, ports 8000/8001/8002.
triton: repository
	$(PY) -m serving.cli triton --repository $(REPOSITORY)

# Triton + the Ray Serve API (8080 HTTP, 9000 gRPC), foreground; Ctrl-C stops every child.
serve: repository
	$(PY) -m serving.cli serve --repository $(REPOSITORY)

# Reproduce the shipped tiny checkpoint (≤ 60 min on 2 cores).
train: install
	$(PY) -m serving.cli train --out checkpoints/tiny

lint: install
	$(VENV)/bin/ruff check serving export tests loadtests
	$(VENV)/bin/mypy

test: repository lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf build $(REPOSITORY)/*/[0-9]*/*.onnx $(REPOSITORY)/*/[0-9]*/manifest.json $(REPOSITORY)/*/[0-9]*/checkpoint
