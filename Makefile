# Every target sets up what it needs: a fresh machine needs only `make test`
# or `make bench`. The targets work in an environment of their own, .venv-dev,
# never in a venv you installed crelu_ext into (the README's .venv).
# VENV=/path/to/env uses another environment, and PYTHON=python3 (with VENV=)
# uses the current interpreter as it is. REQUIREMENTS picks the pinned set:
# `make test-oldest` runs on the oldest torch the package supports
# (requirements-oldest.txt), in .venv-oldest.
VENV ?= .venv-dev
PYTHON ?= $(VENV)/bin/python
REQUIREMENTS ?= requirements-dev.txt
JOBS ?= 2
# setup.py's CMake build of VENV's extension; a test build makes the C++ tests
# there too, so `make cmake-test` compiles nothing of its own.
CMAKE_BUILD ?= build/cmake-$(notdir $(abspath $(VENV)))
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
SOURCES := $(CXX_SOURCES) CMakeLists.txt setup.py

.PHONY: test test-oldest test-all bench build cmake-test release-check codegen-check lint format \
	gpu-check gpu-check-dry-run clean

$(VENV)/.installed: $(REQUIREMENTS) requirements-test.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

# The test build of the extension: CUDA included when nvcc and a CUDA torch are
# there (see setup.py), with the CUDA kernels' host emulator and the C++ tests
# (CRELU_EXT_TESTING=1). INSTALL=editable (the default) builds it into the source
# tree, which the tests and `make bench` then import; INSTALL=site installs it
# into VENV instead, for a second torch whose compiled part would otherwise
# replace the tree's: its tests run with PYTHONSAFEPATH=1, so that they import
# the installed package, never the source folder.
INSTALL ?= editable
PIP_INSTALL_editable := -e .
PIP_INSTALL_site := .
PYTEST_ENV_site := PYTHONSAFEPATH=1
PACKAGE_SOURCES_site := $(shell find crelu_ext -name '*.py') pyproject.toml
# The stamp names the venv; the source tree holds one editable build at a time.
BUILT := build/.built-$(INSTALL)$(subst /,_,$(abspath $(VENV)))
STALE_editable := build/.built-editable*
$(BUILT): $(VENV)/.installed $(SOURCES) $(PACKAGE_SOURCES_$(INSTALL))
	rm -f $(STALE_$(INSTALL)) $@
	CRELU_EXT_TESTING=1 CRELU_EXT_BUILD_DIR=$(abspath $(CMAKE_BUILD)) MAX_JOBS=$(JOBS) \
	  $(PYTHON) -m pip install --quiet --no-build-isolation $(PIP_INSTALL_$(INSTALL))
	mkdir -p build && touch $@

build: $(BUILT)

# The tests; the native CPU kernels must have been built (no silent fallback).
# The Triton kernels run on CPU tensors in Triton's interpreter, in a second
# session on their own cases: TRITON_INTERPRET is read when the kernels are
# defined. TESTS names what to run (default: all). Both sessions run, each
# writes its JUnit XML ($(TEST_RESULTS).xml, $(TEST_RESULTS)-triton-cpu.xml),
# and the last line counts the tests of both; any failure fails the target.
TESTS ?= tests
TEST_RESULTS ?= build/test-results/test
# pytest's processes (pytest-xdist), one per core by default
TEST_JOBS ?= $(JOBS)
PYTEST = $(PYTEST_ENV_$(INSTALL)) $(PYTHON) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS)
test: $(BUILT)
	@mkdir -p $(dir $(TEST_RESULTS))
	@rm -f $(TEST_RESULTS).xml $(TEST_RESULTS)-triton-cpu.xml
	@status=0; \
	CRELU_EXT_REQUIRE_NATIVE=1 $(PYTEST) $(TESTS) --junitxml=$(TEST_RESULTS).xml || status=1; \
	TRITON_INTERPRET=1 $(PYTEST) $(TESTS) -k triton-cpu \
	  --junitxml=$(TEST_RESULTS)-triton-cpu.xml || status=1; \
	$(PYTHON) tools/test_summary.py $(TEST_RESULTS).xml $(TEST_RESULTS)-triton-cpu.xml \
	  || status=1; \
	exit $$status

# On the oldest supported torch (requirements-oldest.txt), what can differ from
# one torch or Triton release to the next: the build and the ops'
# registration, every autograd mode, vmap, compile, export, TorchScript,
# opcheck, fuse (torch.fx and Dynamo), recompute (saved-tensor hooks), the
# Triton kernels, and the parity tests. Kernel-only properties, the paper's
# tools and the benchmarks' harness run once, on the pinned torch.
VERSION_SENSITIVE_TESTS := $(addprefix tests/ops/,test_autograd.py test_autograd_modes.py \
	test_compile.py test_export.py test_export_registration.py test_fast_path.py test_fuse.py \
	test_jit.py test_opcheck.py test_parity.py test_recompute.py test_triton.py test_vmap.py) \
	tests/tools/test_build.py
test-oldest:
	$(MAKE) test VENV=.venv-oldest REQUIREMENTS=requirements-oldest.txt INSTALL=site \
	  TESTS="$(VERSION_SENSITIVE_TESTS)" TEST_RESULTS=build/test-results/test-oldest

# Everything CI runs, in its order.
test-all: lint cmake-test test gpu-check-dry-run codegen-check test-oldest

# The benchmark, on the GPU if there is one, else the CPU.
bench: $(BUILT)
	$(PYTHON) -m crelu_ext bench

# On a GPU machine with torch installed (no venv, no network): the test build
# (emulator included), CUDA parity, the emulator against the GPU, benchmarks,
# compute-sanitizer, the full suite, within 8 minutes, results in build/gpu_check;
# without a GPU it stops at once, saying why. See the script. The dry run runs
# every step's command on the CPU (CI does).
gpu-check:
	bash tools/gpu_check.sh

gpu-check-dry-run: $(BUILT)
	PYTHON=$(PYTHON) bash tools/gpu_check.sh --dry-run

# The kernels' machine code, compiled without a GPU: Triton's PTX and SASS for
# sm_90 and sm_80, and the CUDA build's SASS (see the script).
codegen-check: $(BUILT)
	$(PYTHON) tools/codegen_check.py

# The C++ tests, run by ctest in the test build's CMake folder: the op
# library as libtorch users build it (docs/cpp.md), called with no Python.
cmake-test: $(BUILT)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# A release wheel (no emulator; CPU kernels only, to keep it quick) built from
# an sdist of the checkout, installed in a fresh venv and imported from outside
# the checkout: torch is its only dependency, no test op is registered, and the
# LICENSE ships in both.
release-check: $(VENV)/.installed
	PYTHON=$(abspath $(PYTHON)) JOBS=$(JOBS) bash tools/release_check.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES) tests/cpp/*.cpp tests/cpp/*.h

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES) tests/cpp/*.cpp tests/cpp/*.h

clean:
	rm -rf build crelu_ext/_C*.so crelu_ext/libcrelu_ext_*.so crelu_ext/testing/libcrelu_ext_*.so *.egg-info
