#!/usr/bin/env bash
# One prepared run on a lent GPU machine (H200, torch + nvcc preinstalled, no network), from the
# repository root of a copied working tree:
#   1. build the extension in place for sm_90 (FORCE_CUDA=1),
#   2. the whole test suite's CUDA cases (pytest -m cuda: the device-parametrized shared suites
#      and tests/test_cuda.py), then the CPU cases if time allows,
#   3. python -m rnn_ext.benchmark --device cuda against nn.RNN (cuDNN): float32 and bfloat16
#      dense, float32 packed, and float32 padded batches with lengths= (batch-first), and
#      --cell: loops of rnn_ext.RNNCell against nn.RNNCell; then, on the machine's CPU cores,
#      --threads 1,2,4,8,16: rnn_ext and nn.RNN across thread counts (the many-core CPU check),
# writing a summary to $OUT/cuda.md (benchmarks/results/cuda.md when OUT is unset) and every line
# of output to $OUT/log.txt (log.txt next to cuda.md). Each part has its own time limit and the
# whole run stays under about 7 minutes; the exit status is 0 only if the build and the CUDA
# tests passed. On a failure or a timeout the summary names the failing (or last running) test.
#
# Without a visible GPU it is a dry run (CI runs one on the oldest supported torch): the same
# build, CUDA kernels included, then the CUDA parts report "no GPU" and are skipped, and the CPU
# cases run whole, with no device time to save; the exit status is 0 only if the build and the
# CPU tests passed.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        (PYTHON defaults to python3)
set -u -o pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS_DIR"
SUMMARY="$RESULTS_DIR/cuda.md"
LOG="$RESULTS_DIR/log.txt"
WORK="$(mktemp -d)"

PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_GPU=1
  BUDGET_S=420  # the parts below stop starting once this much time has gone
  BUILD_LIMIT_S=300 CPU_TESTS_LIMIT_S=90
else
  HAVE_GPU=0  # a dry run: a 2-core CI machine builds the CUDA kernels in about 8 minutes
  BUDGET_S=3600 BUILD_LIMIT_S=1500 CPU_TESTS_LIMIT_S=2400
fi
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda  # else torch finds the toolkit from nvcc on PATH
fi
[[ -n "${CUDA_HOME:-}" ]] && export PATH="$CUDA_HOME/bin:$PATH"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONDONTWRITEBYTECODE=1

part() { echo; echo "=== $* (t=${SECONDS}s)"; }
left() { echo $((BUDGET_S - SECONDS)); }
# Runs "$@" with a limit of $1 seconds, capped by what is left of the budget; returns its status
# (124 on timeout, 125 when no time was left to start it).
limited() {
  local limit=$1; shift
  local remaining; remaining=$(left)
  if (( remaining < 20 )); then echo "skipped: only ${remaining}s of the budget left"; return 125; fi
  (( limit > remaining )) && limit=$remaining
  timeout --kill-after=10 "$limit" "$@"
}
NO_GPU=126  # the status of a CUDA part a dry run skips
status_word() {
  case $1 in
    0) echo passed ;; 124|137) echo "timed out" ;; 125) echo skipped ;; "$NO_GPU") echo "skipped: no GPU" ;;
    *) echo "failed (exit $1)" ;;
  esac
}

# ": " and the last line of file $1 (pytest's counts), or nothing when there is no such file.
last_line() { [[ -s "$1" ]] && echo ": $(tail -n 1 "$1")"; }

# pytest -v output in $2 -> what failed, or (after a timeout) the test that was running.
test_report() {
  local rc=$1 file=$2
  grep -E '^(FAILED|ERROR) ' "$file" | head -n 40 || true
  if (( rc == 124 || rc == 137 )); then
    echo "timed out while running: $(grep -E '::' "$file" | tail -n 1)"
  fi
}

# Runs pytest on the CUDA (or CPU) cases; $1 name, $2 limit, $3 marker expression.
run_tests() {
  local name=$1 limit=$2 marker=$3
  part "pytest -m '$marker'"
  limited "$limit" "$PYTHON" -m pytest -v -rfE -p no:cacheprovider -m "$marker" tests 2>&1 | tee "$WORK/$name.txt"
  return "${PIPESTATUS[0]}"
}

# Runs one benchmark table; $1 name, $2 limit, then the benchmark's arguments.
run_bench() {
  local name=$1 limit=$2; shift 2
  part "benchmark $name: $*"
  if (( HAVE_GPU == 0 )); then
    echo "skipped: no GPU"
    echo "benchmark $name: $(status_word $NO_GPU)" >> "$WORK/bench-status.txt"
    return "$NO_GPU"
  fi
  local device=cuda
  [[ $name == cpu-threads ]] && device=cpu
  limited "$limit" "$PYTHON" -m rnn_ext.benchmark --device "$device" --markdown "$WORK/bench-$name.md" "$@"
  local rc=$?
  echo "benchmark $name: $(status_word $rc)" >> "$WORK/bench-status.txt"
  return $rc
}

main() {
part "environment"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
nvcc --version | tail -n 2 || echo "nvcc not found under $CUDA_HOME/bin"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
(( HAVE_GPU == 1 )) || echo "no GPU: a dry run (build and CPU tests; the CUDA tests and benchmarks are skipped)"
"$PYTHON" -c "import ninja" 2>/dev/null && echo "ninja: yes" || echo "ninja: no (serial build)"
HAVE_PYTEST=1
"$PYTHON" -c "import pytest, hypothesis; print('pytest', pytest.__version__)" || { HAVE_PYTEST=0; echo "pytest or hypothesis missing: tests cannot run"; }
"$PYTHON" -c "import expecttest" 2>/dev/null && echo "expecttest: yes" || echo "expecttest: no (tests/test_module_db.py skips)"
"$PYTHON" -c "import onnx, onnxscript, onnxruntime" 2>/dev/null && echo "onnx: yes" || echo "onnx: no (tests/test_onnx.py, with its CUDA export case, skips)"
git log --oneline -n 3 2>/dev/null || true

part "build (FORCE_CUDA=1, sm_90, MAX_JOBS=$MAX_JOBS)"
build_start=$SECONDS
limited "$BUILD_LIMIT_S" "$PYTHON" setup.py build_ext --inplace
build_rc=$?
build_s=$((SECONDS - build_start))
if (( build_rc == 0 )); then
  "$PYTHON" -c "import rnn_ext, sys; print('cuda_kernels_built:', rnn_ext.cuda_kernels_built()); sys.exit(0 if rnn_ext.cuda_kernels_built() else 1)"
  build_rc=$?
fi
echo "build: $(status_word $build_rc) in ${build_s}s"

cuda_rc=125 cpu_rc=125
if (( HAVE_GPU == 0 )); then
  part "pytest -m 'cuda'"
  echo "skipped: no GPU"
  cuda_rc=$NO_GPU
elif (( build_rc == 0 && HAVE_PYTEST == 1 )); then
  run_tests cuda 200 "cuda"
  cuda_rc=$?
fi
if (( build_rc == 0 )); then
  run_bench float32 45 --shape-budget 4
  run_bench bfloat16 40 --dtype bfloat16 --shape-budget 4
  run_bench packed 30 --packed --shape-budget 4
  run_bench lengths 30 --lengths --batch-first --shapes 32,200,64,64 64,500,128,128 128,100,256,256 --shape-budget 4
  run_bench cell 25 --cell --shapes 1,32,32 1,256,256 16,128,128 64,1024,1024,20 --shape-budget 3
  # The CPU's cores (16 on the lent machine), after the GPU parts: the walks' thread scaling.
  run_bench cpu-threads 75 --threads 1,2,4,8,16 --shapes 1,1000,64,256 32,200,128,128 64,100,256,256,2 \
    128,50,1024,1024 --rounds 3 --min-time 0.01 --shape-budget 2
fi
if (( build_rc == 0 && HAVE_PYTEST == 1 )); then
  run_tests cpu "$CPU_TESTS_LIMIT_S" "not cuda and not slow"
  cpu_rc=$?
fi

part "summary"
{
  if (( HAVE_GPU == 1 )); then
    echo "# rnn_ext on CUDA: build, tests, benchmark"
  else
    echo "# rnn_ext: dry run of scripts/gpu_check.sh (no GPU): build and CPU tests"
  fi
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  echo "- $("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null); $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'nvcc ?')"
  echo "- build (sm_90): $(status_word $build_rc), ${build_s}s"
  echo "- CUDA tests (pytest -m cuda): $(status_word $cuda_rc)$(last_line "$WORK/cuda.txt")"
  echo "- CPU tests: $(status_word $cpu_rc)$(last_line "$WORK/cpu.txt")"
  [[ -s "$WORK/bench-status.txt" ]] && sed 's/^/- /' "$WORK/bench-status.txt"
  echo
  for name in cuda cpu; do
    if [[ -s "$WORK/$name.txt" ]]; then
      echo "## $name tests: failures"
      echo
      echo '```'
      rc_var="${name}_rc"
      test_report "${!rc_var}" "$WORK/$name.txt"
      echo '```'
      echo
    fi
  done
  for name in float32 bfloat16 packed lengths cpu-threads; do
    if [[ -s "$WORK/bench-$name.md" ]]; then
      echo "## Benchmark: $name"
      echo
      cat "$WORK/bench-$name.md"
      echo
    fi
  done
  echo "Full output: log.txt. Total time: ${SECONDS}s."
} > "$SUMMARY"
cat "$SUMMARY"
if (( HAVE_GPU == 1 )); then
  (( build_rc == 0 && cuda_rc == 0 ))
else
  (( build_rc == 0 && cpu_rc == 0 ))
fi
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
