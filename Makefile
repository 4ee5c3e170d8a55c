# Every target sets up what it needs: a fresh machine needs only `make test`
# or `make bench`. VENV=/path/to/env reuses another environment, and
# PYTHON=python3 (with VENV=) uses the current interpreter as it is.
# REQUIREMENTS picks the pinned set: `make test-oldest` is `make test` with
# the oldest torch the package supports (requirements-oldest.txt) in .venv-oldest.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
REQUIREMENTS ?= requirements-dev.txt
JOBS ?= 2
CMAKE_BUILD ?= build/cmake
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
SOURCES := $(CXX_SOURCES) CMakeLists.txt setup.py

.PHONY: test test-oldest bench build cmake-test release-check codegen-check lint format gpu-check gpu-check-dry-run clean

$(VENV)/.installed: $(REQUIREMENTS) requirements-test.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

# The extension, CUDA included when nvcc and a CUDA torch are there (see
# setup.py), with the CUDA kernels' host emulator that the tests run
# (CRELU_EXT_TESTING=1). It is built in place, against one venv's torch: the
# stamp names that venv, so switching venvs rebuilds.
BUILT := build/.built-$(subst /,_,$(abspath $(VENV)))
$(BUILT): $(VENV)/.installed $(SOURCES)
	rm -f build/.built-*
	CRELU_EXT_TESTING=1 MAX_JOBS=$(JOBS) $(PYTHON) -m pip install --quiet --no-build-isolation -e .
	mkdir -p build && touch $@

build: $(BUILT)

# The tests; the native CPU kernels must have been built (no silent fallback).
# The Triton kernels run on CPU tensors in Triton's interpreter, in a second
# session: TRITON_INTERPRET is read when the kernels are defined. Both sessions
# run, each writes its JUnit XML ($(TEST_RESULTS).xml, $(TEST_RESULTS)-triton-cpu.xml),
# and the last line counts the tests of both; any failure fails the target.
TEST_RESULTS ?= build/test-results/test
test: $(BUILT)
	@mkdir -p $(dir $(TEST_RESULTS))
	@rm -f $(TEST_RESULTS).xml $(TEST_RESULTS)-triton-cpu.xml
	@status=0; \
	CRELU_EXT_REQUIRE_NATIVE=1 $(PYTHON) -m pytest tests -q \
	  --junitxml=$(TEST_RESULTS).xml || status=1; \
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q -k triton-cpu \
	  --junitxml=$(TEST_RESULTS)-triton-cpu.xml || status=1; \
	$(PYTHON) tools/test_summary.py $(TEST_RESULTS).xml $(TEST_RESULTS)-triton-cpu.xml \
	  || status=1; \
	exit $$status

# The same suite on the oldest supported torch (see requirements-oldest.txt).
test-oldest:
	$(MAKE) test VENV=.venv-oldest REQUIREMENTS=requirements-oldest.txt \
	  TEST_RESULTS=build/test-results/test-oldest

# The benchmark, on the GPU if there is one, else the CPU.
bench: $(BUILT)
	$(PYTHON) -m crelu_ext bench

# On a GPU machine with torch installed (no venv, no network): build, CUDA
# parity, benchmarks, compute-sanitizer, the full suite, within 8 minutes; see
# the script. The dry run runs every step's command on the CPU (CI does).
gpu-check:
	bash tools/gpu_check.sh

gpu-check-dry-run: $(BUILT)
	PYTHON=$(PYTHON) bash tools/gpu_check.sh --dry-run

# The kernels' machine code, compiled without a GPU: Triton's PTX and SASS for
# sm_90 and sm_80, and the CUDA build's SASS (see the script).
codegen-check: $(BUILT)
	$(PYTHON) tools/codegen_check.py

# The plain CMake build, as libtorch users make it: the op library, the Python
# module and the C++ tests, run by ctest.
cmake-test: $(VENV)/.installed
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DPython3_EXECUTABLE=$(abspath $(PYTHON))
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# A release wheel (no emulator; CPU kernels only, to keep it quick) built from
# an sdist of the checkout, installed in a fresh venv and imported from outside
# the checkout: torch is its only dependency and no test op is registered.
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
