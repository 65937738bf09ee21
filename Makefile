# The one place commands are spelled out. `make test` and `make train` each set up what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A Python >= 3.12: PYTHON if given, else python3.13/3.12 on PATH, else pyenv's newest 3.12+.
PYTHON ?= $(shell for c in python3.13 python3.12 python3; do \
	  p=$$(command -v $$c 2>/dev/null) && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
	done; \
	for d in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]* 2>/dev/null | sort -rV); do \
	  [ -x $$d/bin/python3 ] && $$d/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$d/bin/python3; exit 0; }; \
	done)

.PHONY: setup test test-all train bench lint params gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python >= 3.12 found (on PATH or in pyenv); set PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c 'from cpu_kernels import grouped_gemm as g; print("C++ grouped GEMM (CPU MoE experts):", "built" if g.available() else "not built, no C++ compiler? The MoE falls back to capacity slots")'
	@$(PY) -c 'from cpu_kernels import attention as a; print("C++ causal attention (CPU, float32):", "built" if a.available() else "not built, no C++ compiler? MLA falls back to XLA einsums")'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" -n 2 --dist loadfile

test-all: setup
	$(PY) -m pytest -q -m "not gpu" -n 2 --dist loadfile

train: setup
	$(PY) -m experiments.train $(ARGS)

bench: setup
	$(PY) -m experiments.bench_moe
	$(PY) -m experiments.bench_train
	$(PY) -m experiments.bench_ep
	$(PY) -m experiments.fp8_parity
	$(PY) -m experiments.bench_generate
	$(PY) -m experiments.bench_serve

params: setup
	$(PY) -m experiments.params --preset v3-671b

lint: setup
	$(PY) -m ruff check deepseek_jax pallas_kernels cpu_kernels experiments tests
	$(PY) -m ruff format --check deepseek_jax pallas_kernels cpu_kernels experiments tests

# On a GPU machine with JAX preinstalled and no registry access, run without the venv.
gpu-check:
	@if [ -x $(PY) ]; then $(PY) -m experiments.gpu_check; \
	else PYTHONPATH=. python3 -m experiments.gpu_check; fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
