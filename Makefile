# Quickstart: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py constraints.txt | cksum | cut -d' ' -f1)
WORKDIR ?= workdirs/siglip_shapes
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The demo and the tests run on CPU. libtpu (installed for the TPU compile tests) would
# otherwise probe for a TPU at start-up and log warnings; `make demo JAX_PLATFORMS=` lifts it.
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-all install gpu-compile-deps clean-demo

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is needed: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 is pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# JAX's CUDA plugin at the pinned jax's version, for tools/gpu_compile.py (compiles a train
# step for a GPU on a machine without one; its tests run in `make test`). Installed beside the
# environment, not in it: importable, the plugin makes every JAX program on a machine without
# a GPU print its failed CUDA start.
JAX_VERSION := $(shell sed -n 's/^jax==//p' constraints.txt)
GPU_PLUGIN_DIR := .venv-jax-cuda
GPU_PLUGIN_STAMP := $(GPU_PLUGIN_DIR)/.installed-$(JAX_VERSION)
$(GPU_PLUGIN_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --upgrade --no-deps --target $(GPU_PLUGIN_DIR) \
	    jax-cuda13-plugin==$(JAX_VERSION) jax-cuda13-pjrt==$(JAX_VERSION)
	@touch $@

gpu-compile-deps: $(GPU_PLUGIN_STAMP)

# Trains SigLIP on the embedded shapes data (about 5 minutes on 2 CPU cores, after the install), then prints
# held-out zero-shot accuracy and retrieval recall. Re-running resumes; `make clean-demo` restarts.
demo: $(STAMP)
	$(PY) -m vlpjax.train --config experiments/siglip_shapes.py --workdir $(WORKDIR)

clean-demo:
	rm -rf $(WORKDIR)

# The ten slowest tests are listed at the end: the suite must stay under 20 minutes on CI.
# Two pytest-xdist workers: most of a test's time is compiling or starting a subprocess, work
# that keeps one core busy, so two workers use both of CI's 2 cores (19.6 -> 15.0 min on a
# 2-core host).
# `loadfile` keeps each file in one worker, so a module fixture is built once.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP) $(GPU_PLUGIN_STAMP)
	$(PYTEST) -m "not slow" --durations=10

# The whole suite, slow checks included, compiled at the optimisation level users run (see
# tests/conftest.py: `make test` skips LLVM's optimisation of XLA:CPU's machine code).
test-all: $(STAMP) $(GPU_PLUGIN_STAMP)
	VLPJAX_TEST_FULL_OPT=1 $(PYTEST)
