#!/usr/bin/env bash
# The one-call GPU check: on a GPU machine with torch (and Triton) installed
# and no network, build the extension, run the whole test suite on CUDA, run
# compute-sanitizer (memcheck, racecheck) over every CUDA and Triton kernel,
# benchmark, and print a short summary last. Logs and results go to $OUT if
# set, else benchmarks/results/. About 6 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh        (or: make gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
status=()

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the exit code
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log"
  status+=("$name rc=$rc $((SECONDS - start))s")
  return $rc
}

nvidia-smi -L || true
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

step build env MAX_JOBS="$(nproc)" CRELU_EXT_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || {
  printf '%s\n' "${status[@]}"
  exit 1
}
step tests env CRELU_EXT_REQUIRE_NATIVE=1 "$PYTHON" -m pytest tests -q -x -m "not large" -p no:cacheprovider
step tests-large "$PYTHON" -m pytest tests/test_cuda.py -q -m large -p no:cacheprovider
for tool in memcheck racecheck; do
  step "sanitizer-$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$tool" --error-exitcode=1 "$PYTHON" benchmarks/sanitizer_cases.py
done
step bench "$PYTHON" -m crelu_ext bench --out "$OUT"
step bench-bf16 "$PYTHON" -m crelu_ext bench --dtype bfloat16 --out "$OUT"

echo
echo "== summary"
printf '%s\n' "${status[@]}"
grep -hE "^[0-9]+ (passed|failed)|passed|failed" "$OUT/tests.log" "$OUT/tests-large.log" | tail -n 2
grep -h "ERROR SUMMARY" "$OUT"/sanitizer-*.log
"$PYTHON" benchmarks/summarize.py "$OUT/bench_cuda.csv"
