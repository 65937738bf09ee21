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

.PHONY: setup test test-all train bench bench-cpu lint params gpu-check gpu-compile gpu-venv clean notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python >= 3.12 found (on PATH or in pyenv); set PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c 'from cpu_kernels import grouped_gemm as g; print("C++ grouped GEMM (CPU MoE experts):", f"built, {g.KERNEL.tile_config()} register tiles" if g.available() else "not built, no C++ compiler? The MoE falls back to capacity slots")'
	@$(PY) -c 'from cpu_kernels import attention as a; print("C++ causal attention (CPU, float32):", "built" if a.available() else "not built, no C++ compiler? MLA falls back to XLA einsums")'
	@touch $(STAMP)

test: setup gpu-venv
	DEEPSEEK_JAX_REQUIRE_GPU_COMPILE=1 $(PY) -m pytest -q -m "not slow and not gpu" -n 2 --dist loadfile --durations=15

test-all: setup gpu-venv
	DEEPSEEK_JAX_REQUIRE_GPU_COMPILE=1 $(PY) -m pytest -q -m "not gpu" -n 2 --dist loadfile

train: setup
	$(PY) -m experiments.train $(ARGS)

bench: setup
	$(PY) -m experiments.bench_moe
	$(PY) -m experiments.bench_train
	$(PY) -m experiments.bench_ep
	$(PY) -m experiments.fp8_parity
	$(PY) -m experiments.bench_generate
	$(PY) -m experiments.bench_pipeline
	$(PY) -m experiments.bench_serve

# Our CPU path vs XLA alone vs PyTorch, native and as an AVX2 machine (README table).
# PyTorch runs in its own Python 3.11 venv (torch's CPU wheel); the test suite never uses it.
TORCH_VENV := .venv-torch
$(TORCH_VENV)/.installed:
	python3.11 -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q torch==2.13.0 transformers safetensors numpy
	@touch $@

bench-cpu: setup $(TORCH_VENV)/.installed
	$(PY) -m experiments.bench_cpu --torch $(TORCH_VENV)/bin/python

# Runs the notebooks at full size; each figure is saved as notebooks/<notebook>-<figure>.png.
notebooks: setup gpu-venv
	$(PY) -m experiments.notebooks --save-figures

params: setup
	$(PY) -m experiments.params --preset v3-671b

lint: setup
	$(PY) -m ruff check deepseek_jax pallas_kernels cpu_kernels experiments tests
	$(PY) -m ruff format --check deepseek_jax pallas_kernels cpu_kernels experiments tests

# On a GPU machine with JAX preinstalled and no registry access, run without the venv.
gpu-check:
	@if [ -x $(PY) ]; then $(PY) -m experiments.gpu_check; \
	else PYTHONPATH=. python3 -m experiments.gpu_check; fi

# Deviceless GPU compile (no GPU needed): a second venv layered on $(VENV) that adds the CUDA
# plugin wheels at exactly the installed jax version. Kept apart because with the plugin present a
# plain `import jax` (without JAX_PLATFORMS=cpu) prints a cuDNN traceback.
GPU_VENV := .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed

gpu-venv: $(GPU_STAMP)

$(GPU_STAMP): $(STAMP)
	rm -rf $(GPU_VENV)
	$$($(PY) -c 'import sys; print(sys._base_executable)') -m venv $(GPU_VENV)
	site=$$($(GPU_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  echo "import site; site.addsitedir('$$base')" > $$site/_deepseek_jax_main_venv.pth
	v=$$($(PY) -c 'import jax; print(jax.__version__)'); \
	  $(GPU_PY) -m pip install -q --no-deps "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v"
	@touch $(GPU_STAMP)

gpu-compile: setup gpu-venv
	JAX_PLATFORMS=cpu $(GPU_PY) -m experiments.gpu_compile $(ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) $(TORCH_VENV) .pytest_cache build *.egg-info
