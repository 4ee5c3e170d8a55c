#!/usr/bin/env bash
# The one-call GPU check, for a GPU machine with torch and Triton installed
# and no network, where GPU time is short: every step has its own timeout
# inside a total budget (8 minutes by default, the build included), the most
# valuable steps run first, and the summary in $OUT is rewritten after every
# step, so a killed run still leaves what it got. The short table is printed
# last.
#
#   bash tools/gpu_check.sh             (or: make gpu-check)
#   bash tools/gpu_check.sh --dry-run   runs every step's command on the CPU,
#                                            CUDA steps skipped (CI runs this)
#
# Without a usable CUDA GPU (torch sees none) the check stops at once, with one
# line saying why, and exits 1. Steps: build (CUDA kernels and the host
# emulator, for this card's architecture only) -> the emulator-vs-GPU test ->
# CUDA parity subset of both backends -> fp32 and bf16 benchmarks -> small-size
# sweep -> compute-sanitizer memcheck and racecheck -> the full suite.
# Environment: OUT (results folder; default build/gpu_check, or
# build/gpu_check_dry_run for a dry run: inside build/, which git ignores),
# PYTHON (default python3), GPU_CHECK_BUDGET_S (default 480; 1200 for a dry
# run), MAX_JOBS (default: all cores). What else could change the steps
# (CRELU_EXT_BACKEND, TRITON_INTERPRET, PYTEST_ADDOPTS, ...) is reset: see
# gpu_check_environment.
set -uo pipefail

# gpu_check_environment DRY_RUN: the environment the steps run in, whatever the
# caller had set.
gpu_check_environment() {
  local dry_run=$1
  # What the package, the tests or pytest read that would change what runs:
  # another default backend, Triton's interpreter for CUDA tensors, a pytest
  # selection or plugin, torch's allocator or launch mode under the benchmarks.
  unset CRELU_EXT_BACKEND TRITON_INTERPRET CRELU_EXT_REQUIRE_NATIVE PYTEST_ADDOPTS \
    PYTEST_PLUGINS PYTORCH_NO_CUDA_MEMORY_CACHING CUDA_LAUNCH_BLOCKING PYTORCH_CUDA_ALLOC_CONF
  if ((dry_run)); then
    # The tests collect against the build that is here, with or without the
    # emulator; CRELU_EXT_CUDA=1 would make tests/conftest.py require it.
    unset CRELU_EXT_CUDA CRELU_EXT_TESTING
  else
    # The build compiles the CUDA kernels and the host emulator
    # (CRELU_EXT_TESTING=1), and with CRELU_EXT_CUDA=1 tests/conftest.py fails
    # the suite if the emulator is missing: the emulator-vs-GPU test runs.
    export CRELU_EXT_CUDA=1 CRELU_EXT_TESTING=1
  fi
}

# no_gpu_reason: nothing when torch sees a CUDA GPU, else why it does not (and
# what nvidia-smi says).
no_gpu_reason() {
  local seen smi=""
  seen=$(timeout 120 "$PYTHON" -c '
import os


def why_not():
    try:
        import torch
    except Exception as error:
        return f"torch does not import ({type(error).__name__}: {error})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if torch.cuda.is_available():
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device{where}"


print(why_not())
' 2>/dev/null)
  local rc=$?
  if ((rc)) && [[ -z $seen ]]; then
    seen="$PYTHON -c 'import torch' did not finish (exit $rc)"
  fi
  [[ -z $seen ]] && return 0
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    smi="no nvidia-smi on PATH"
  elif ! nvidia-smi -L >/dev/null 2>&1; then
    smi="nvidia-smi finds no GPU"
  else
    smi="nvidia-smi lists $(nvidia-smi -L 2>/dev/null | head -n 1)"
  fi
  echo "$seen; $smi"
}

# Sourced (by tests/tools/test_gpu_check.py), it only defines the functions.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *)
    echo "usage: bash tools/gpu_check.sh [--dry-run]" >&2
    exit 2
    ;;
esac

PYTHON=${PYTHON:-python3}
gpu_check_environment "$DRY_RUN"
if ((!DRY_RUN)); then
  reason=$(no_gpu_reason)
  if [[ -n $reason ]]; then
    echo "gpu_check: no usable CUDA GPU: $reason; nothing was run (--dry-run runs the steps' commands on the CPU)" >&2
    exit 1
  fi
fi

if ((DRY_RUN)); then
  # No GPU time to save on the CPU, where the steps take longer: a wider budget.
  BUDGET_S=${GPU_CHECK_BUDGET_S:-1200}
  OUT=${OUT:-build/gpu_check_dry_run}
else
  BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
  OUT=${OUT:-build/gpu_check}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Few files, so that they are quick to copy off the machine: the summary, one
# log of every step, and the benchmark's CSV and plot.
SUMMARY="$OUT/gpu_check_summary.txt"
LOG="$OUT/gpu_check.log"
STEP_LOGS=$(mktemp -d)
trap 'rm -rf "$STEP_LOGS"' EXIT
: >"$LOG"
START=$SECONDS
START_ISO=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)  # the format of the bench CSV's dates
BENCH_CSV="$OUT/bench_$( ((DRY_RUN)) && echo cpu || echo cuda).csv"
ROWS=()
FAILED=0

card="no GPU (dry run: CUDA steps skipped)"
if ((!DRY_RUN)); then
  card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    head -n 1)
  if [[ -z $card ]]; then  # no nvidia-smi: the name torch gives
    card="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)"
    card="$card (nvidia-smi gave nothing)"
  fi
fi
versions=$("$PYTHON" -c "import sys, torch
try:
    import triton; t = triton.__version__
except ImportError:
    t = 'none'
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}, '
      f'python {sys.version.split()[0]}, torch sees: {cuda}')" 2>&1 | tail -n 1)

write_summary() {
  {
    echo "crelu_ext GPU check$( ((DRY_RUN)) && echo ' (DRY RUN)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "card: $card"
    echo "stack: $versions"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "elapsed: $((SECONDS - START)) s of a $BUDGET_S s budget"
    if [[ -f $BENCH_CSV ]]; then
      echo
      "$PYTHON" benchmarks/summarize.py "$BENCH_CSV" --since "$START_ISO" 2>&1
    fi
    echo
    printf '%-20s %-8s %7s  %s\n' step result seconds detail
    local row
    for row in "${ROWS[@]}"; do
      printf '%s\n' "$row"
    done
  } >"$SUMMARY"
}

record() {  # record STEP RESULT SECONDS DETAIL
  ROWS+=("$(printf '%-20s %-8s %7s  %s' "$1" "$2" "$3" "$4")")
  # A step that failed or did not finish makes the check fail; a skip does not.
  [[ $2 == failed || $2 == timeout || $2 == no-time ]] && FAILED=1
  write_summary
}

log_detail() {  # a pytest log's closing line ("12 passed, 3 skipped in 4.2s"), else the last line
  local line
  line=$(grep -aE '^=*.*[0-9]+ (passed|failed|skipped|error|deselected|tests? collected)' "$1" |
    tail -n 1 | tr -d '=')
  [[ -z $line ]] && line=$(grep -av '^\s*$' "$1" | tail -n 1)
  echo "${line:0:100}"
}

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under its own timeout, capped by
# what is left of the budget; logs to $LOG; records the result.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 15)); then
    record "$name" no-time 0 "not run: the ${BUDGET_S}s budget is spent"
    return 0
  fi
  ((limit > left)) && limit=$left
  local log="$STEP_LOGS/$name.log"
  echo "== $name (timeout ${limit}s): $*"
  local begin=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$((SECONDS - begin))
  {
    echo "===== $name: $* (rc=$rc, ${took}s)"
    cat "$log"
  } >>"$LOG"
  tail -n 3 "$log"
  local detail result
  detail=$(log_detail "$log")
  if [[ $name == bench-* ]]; then  # the benchmark's verdict on its own noise
    local verdict
    verdict=$(grep -aE '^(UNRELIABLE|Figures hold)' "$log" | tail -n 1)
    [[ -n $verdict ]] && detail="${verdict:0:100}"
  fi
  case $rc in
    0) result=passed ;;
    124 | 137) result=timeout detail="killed after ${limit}s${detail:+; $detail}" ;;
    *) result=failed detail="exit $rc${detail:+; $detail}" ;;
  esac
  if [[ $name == sanitizer-* ]]; then
    if grep -aq "Device not supported" "$log"; then
      result=skipped detail="compute-sanitizer: Device not supported on this machine"
    elif grep -aq 'ERROR SUMMARY' "$log"; then
      detail="$(grep -a 'ERROR SUMMARY' "$log" | tail -n 1)${detail:+; $detail}"
    fi
  fi
  record "$name" "$result" "$took" "$detail"
}

skip_cuda_step() {  # in a dry run, a step that needs a GPU
  echo "== $1: skipped in a dry run ($2)"
  record "$1" skipped 0 "dry run: $2"
}

write_summary
echo "card: $card"
echo "stack: $versions"

# --- 1. build: the CUDA kernels and the emulator, this card's architecture, all cores
# CRELU_EXT_TESTING=1 builds the host emulator of the CUDA kernels, which the
# emulator-vs-GPU test compares with the GPU, byte for byte.
build_env=(env MAX_JOBS="${MAX_JOBS:-$(nproc)}" CRELU_EXT_CUDA=1 CRELU_EXT_TESTING=1)
if ((DRY_RUN)); then
  # Runs setup.py (and pip's metadata step) without compiling.
  step build 300 "${build_env[@]}" \
    "$PYTHON" -m pip install --dry-run --no-build-isolation --no-deps -e .
else
  # This card's architecture only (e.g. 9.0 on an H100/H200), whatever the caller
  # set; setup.py's default list if the capability cannot be read.
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST=$arch
  [[ -z $TORCH_CUDA_ARCH_LIST ]] && unset TORCH_CUDA_ARCH_LIST
  step build 300 "${build_env[@]}" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi
if ((FAILED)); then
  echo
  cat "$SUMMARY"
  exit 1
fi

# --- 2. the emulator against the GPU ----------------------------------------
# tests/ops/test_cuda.py::test_the_gpu_gives_the_emulators_bytes, the one test
# that ties the host emulator (which CI tests on the CPU) to the GPU: on the GPU
# every case must pass, none skip; a dry run checks that its cases are collected
# and that nothing but a missing GPU skips them.
if ((DRY_RUN)); then
  step emulator-vs-gpu 60 "$PYTHON" tools/emulator_vs_gpu.py --collect-only
else
  step emulator-vs-gpu 60 "$PYTHON" tools/emulator_vs_gpu.py
fi

# --- 3. quick CUDA parity of both backends (native, triton) -----------------
# Without a GPU no CUDA case is generated: a dry run collects the files.
# Each pytest run also writes its JUnit XML to build/test-results (CI counts them).
parity_files=(tests/ops/test_parity.py tests/ops/test_autograd.py tests/ops/test_cuda.py)
if ((DRY_RUN)); then
  parity_selection=(--collect-only)
else
  parity_selection=(-m "cuda and not large")
fi
step parity 120 env CRELU_EXT_REQUIRE_NATIVE=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
  --junitxml=build/test-results/gpu-check-parity.xml "${parity_files[@]}" "${parity_selection[@]}"

# --- 4. benchmarks: fp32, bf16 ---------------------------------------------
# Most of their time is torch.compile compiling its providers, case by case.
if ((DRY_RUN)); then
  bench_args=(--device cpu --shape 2,8,4,4 --reps 2 --allocator reuse --providers native,eager)
else
  bench_args=()
fi
step bench-fp32 150 "$PYTHON" -m crelu_ext bench "${bench_args[@]}" --dtype float32 --out "$OUT"
step bench-bf16 120 "$PYTHON" -m crelu_ext bench "${bench_args[@]}" --dtype bfloat16 --out "$OUT"

# --- 5. small-size sweep ----------------------------------------------------
# Per-call time at 2^10..2^20 elements, with the host time per call beside eager's.
step bench-small 80 "$PYTHON" -m crelu_ext bench "${bench_args[@]}" --sizes small --out "$OUT"

# --- 6. compute-sanitizer over every CUDA and Triton kernel -----------------
if ((DRY_RUN)); then
  # The workload itself, on the CPU, so that its mistakes fail here too.
  step sanitizer-cases 120 "$PYTHON" tools/sanitizer_cases.py --device cpu
  skip_cuda_step sanitizer-memcheck "compute-sanitizer needs a GPU"
  skip_cuda_step sanitizer-racecheck "compute-sanitizer needs a GPU"
else
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode=1 \
      "$PYTHON" tools/sanitizer_cases.py
  done
fi

# --- 7. the full suite, with whatever budget is left ------------------------
if ((DRY_RUN)); then
  step suite 120 env CRELU_EXT_REQUIRE_NATIVE=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests --collect-only
else
  step suite "$BUDGET_S" env CRELU_EXT_REQUIRE_NATIVE=1 "$PYTHON" -m pytest -q \
    -p no:cacheprovider --junitxml=build/test-results/gpu-check-suite.xml tests
fi

echo
echo "== summary ($SUMMARY; every step's output in $LOG)"
cat "$SUMMARY"
exit "$FAILED"
