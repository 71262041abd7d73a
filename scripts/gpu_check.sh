#!/usr/bin/env bash
# One prepared run on a lent GPU machine (H200, torch + nvcc preinstalled, no network), from the
# repository root of a copied working tree:
#   1. build the extension in place for sm_90 (FORCE_CUDA=1),
#   2. pytest tests/test_cuda.py, then the other tests if time allows,
#   3. scripts/gpu_bench.py (rnn_ext vs cuDNN, float32, TF32 off),
# writing a summary to $OUT/cuda.md (benchmarks/results/cuda.md when OUT is unset) and every line
# of output to $OUT/log.txt (log.txt next to cuda.md). Each phase has its own time limit and the
# whole run stays under about 7 minutes; the exit status is 0 only if the build and the CUDA
# tests passed.
#
#   OUT=/some/dir bash scripts/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS_DIR"
SUMMARY="$RESULTS_DIR/cuda.md"
LOG="$RESULTS_DIR/log.txt"
WORK="$(mktemp -d)"

BUDGET_S=420  # the phases below stop starting once this much time has gone
PYTHON="${PYTHON:-python}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda  # else torch finds the toolkit from nvcc on PATH
fi
[[ -n "${CUDA_HOME:-}" ]] && export PATH="$CUDA_HOME/bin:$PATH"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16
export PYTHONDONTWRITEBYTECODE=1

phase() { echo; echo "=== $* (t=${SECONDS}s)"; }
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
status_word() { case $1 in 0) echo passed ;; 124) echo "timed out" ;; 125) echo skipped ;; *) echo "failed (exit $1)" ;; esac; }

main() {
phase "environment"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
nvcc --version | tail -n 2 || echo "nvcc not found under $CUDA_HOME/bin"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
"$PYTHON" -c "import ninja" 2>/dev/null && echo "ninja: yes" || echo "ninja: no (serial build)"
HAVE_PYTEST=1
"$PYTHON" -c "import pytest; print('pytest', pytest.__version__)" || { HAVE_PYTEST=0; echo "pytest missing: tests cannot run"; }
git log --oneline -n 3 2>/dev/null || true

phase "build (FORCE_CUDA=1, sm_90, MAX_JOBS=16)"
build_start=$SECONDS
limited 300 "$PYTHON" setup.py build_ext --inplace
build_rc=$?
build_s=$((SECONDS - build_start))
if (( build_rc == 0 )); then
  "$PYTHON" -c "import rnn_ext, sys; print('cuda_kernels_built:', rnn_ext.cuda_kernels_built()); sys.exit(0 if rnn_ext.cuda_kernels_built() else 1)"
  build_rc=$?
fi
echo "build: $(status_word $build_rc) in ${build_s}s"

cuda_rc=125 other_rc=125 bench_rc=125
cuda_summary="not run" other_summary="not run"
if (( build_rc == 0 && HAVE_PYTEST == 1 )); then
  phase "pytest tests/test_cuda.py"
  limited 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$WORK/cuda_tests.txt"
  cuda_rc=${PIPESTATUS[0]}
  cuda_summary=$(tail -n 1 "$WORK/cuda_tests.txt")

  phase "pytest: the other tests, quick ones"
  other=$(ls tests/test_*.py 2>/dev/null | grep -v '^tests/test_cuda.py$' || true)
  if [[ -n "$other" ]]; then
    limited 60 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" $other 2>&1 | tee "$WORK/other_tests.txt"
    other_rc=${PIPESTATUS[0]}
    other_summary=$(tail -n 1 "$WORK/other_tests.txt")
  else
    other_summary="no other test files"
  fi
fi

if (( build_rc == 0 )); then
  phase "benchmark"
  limited 120 "$PYTHON" scripts/gpu_bench.py --out "$WORK/bench.md"
  bench_rc=$?
fi

phase "summary"
{
  echo "# rnn_ext on CUDA: build, tests, benchmark"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  echo "- $("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null); $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'nvcc ?')"
  echo "- build (sm_90): $(status_word $build_rc), ${build_s}s"
  echo "- tests/test_cuda.py: $(status_word $cuda_rc): $cuda_summary"
  echo "- other tests: $(status_word $other_rc): $other_summary"
  echo "- benchmark: $(status_word $bench_rc)"
  echo
  if [[ -s "$WORK/cuda_tests.txt" ]]; then
    echo "## Test failures and skips (pytest -ra)"
    echo
    echo '```'
    grep -E '^(FAILED|ERROR|SKIPPED)' "$WORK/cuda_tests.txt" | head -n 40 || true
    echo '```'
    echo
  fi
  if [[ -s "$WORK/bench.md" ]]; then
    echo "## Benchmark"
    echo
    cat "$WORK/bench.md"
  fi
  echo
  echo "Full output: log.txt. Total time: ${SECONDS}s."
} > "$SUMMARY"
cat "$SUMMARY"
(( build_rc == 0 && cuda_rc == 0 ))
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
