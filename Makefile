# make demo : set up (idempotent) and run the main job
# make test : set up (idempotent) and run lint + the test suite
# make bench BENCH=layer BENCH_ARGS="--config a" : one benchmark (python -m benchmarks --help)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda),/usr/local/cuda,)
EXT_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
EXT_STAMP := build/.ext-stamp
# CUTLASS C++ headers for the 'cutlass' grouped GEMM backend (its Python deps are not needed).
CUTLASS_HEADERS := nvidia-cutlass==4.2.0.0
# The CUDA wheels are several GB: no second copy in pip's cache.
export PIP_NO_CACHE_DIR := 1

.PHONY: setup deps mpi ext test-deps demo test lint clean bench bench-deps cutlass-headers megablocks-carry

setup: deps mpi ext

deps: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(CUTLASS_HEADERS)
	touch $@

# Open MPI + mpi4py for the mpirun launch path (best effort: without root/apt its tests skip).
mpi: $(VENV)/.mpi-stamp

$(VENV)/.mpi-stamp: $(VENV)/.deps-stamp
	command -v mpirun >/dev/null && command -v mpicc >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null; } || \
	  echo "warning: Open MPI not installed; mpirun tests will skip"
	command -v mpicc >/dev/null && $(PY) -m pip install -q --disable-pip-version-check mpi4py || true
	touch $@

# `pip install -e .` builds the extension (ninja, objects kept in build/: a rebuild compiles only
# what changed) and installs the package editable into .venv, so `import moe_parallel` works from
# any directory.
ext: $(EXT_STAMP)

$(EXT_STAMP): $(VENV)/.deps-stamp $(EXT_SOURCES) pyproject.toml
	CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q \
	  --disable-pip-version-check --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

# The optional integrations the tests exercise (extras of pyproject.toml), so they run, not skip.
# DS_BUILD_OPS=0: DeepSpeed installs without compiling its CUDA ops (the CPU tests JIT-build
# the one they use into build/torch_extensions).
TEST_EXTRAS := megatron,hf,deepspeed,bench,observe
test-deps: $(VENV)/.test-deps-stamp

$(VENV)/.test-deps-stamp: $(EXT_STAMP) pyproject.toml
	DS_BUILD_OPS=0 CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q \
	  --disable-pip-version-check --no-build-isolation -e ".[test,$(TEST_EXTRAS)]"
	touch $@

# The main job: 4 CPU processes (gloo), experts over EP=2 (EDP=2), data over DP=4.
DEMO_ARGS ?= --ep 2
demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 4 -m moe_parallel.train $(DEMO_ARGS)

# Benchmark extras (DeepSpeed without its CUDA ops, on the CPU accelerator in dispatch_bench).
bench-deps: $(VENV)/.bench-stamp

$(VENV)/.bench-stamp: requirements-bench.txt $(VENV)/.deps-stamp
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

BENCH ?= layer
BENCH_ARGS ?=
bench: setup bench-deps
	$(PY) -m benchmarks $(BENCH) $(BENCH_ARGS)

# CUTLASS headers in an ignored folder, for a build on a machine without PyPI
# (benchmarks/device_session.sh reads build/cutlass_include).
cutlass-headers: deps
	rm -rf build/cutlass_include && mkdir -p build/cutlass_include
	cp -r "$$($(PY) -c 'import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))')/source/include/." build/cutlass_include/

# MegaBlocks sdists (megablocks 0.10.0, grouped_gemm 0.3.0, stanford-stk 0.7.1) in build/megablocks,
# for the layer benchmark's 'megablocks' contender on a machine without PyPI: carry build/megablocks
# and run benchmarks/megablocks_install.sh there.
megablocks-carry:
	bash benchmarks/megablocks_install.sh --download

lint: deps
	$(VENV)/bin/ruff check moe_parallel tests benchmarks launch setup.py

test: setup test-deps lint
	MOE_PARALLEL_REQUIRE_EXTENSION=1 $(PY) -m pytest -q tests

clean:
	rm -rf build moe_parallel/_C*.so *.egg-info
