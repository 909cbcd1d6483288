#!/usr/bin/env bash
# The GPU half in one command, on a GPU machine as it comes: torch and triton preinstalled, no
# open_clip, no network, nothing to install. Runs the package from this checkout (PYTHONPATH)
# and, in about 6 minutes on one H100/H200:
#   1. fma-fast doctor: versions, devices, the path of each op, every kernel vs its reference;
#   2. the CUDA tests natively (kernels, fallbacks, whole solve and fit on the GPU);
#   3. the GPU benchmarks at reduced grids: the whole solve at N = 1,000,000 against the
#      released loop (issue 4's time targets; its torch.compile baseline takes minutes of
#      autotuning, so it is left to `python benchmarks/run.py -k gpu_solver`), the kernels and
#      the training step (quick grids);
# then writes OUT/<gpu>.md and OUT/<gpu>.json (default OUT: benchmarks/results).
#
#   bash benchmarks/gpu_check.sh [OUT]
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh     # another interpreter
#
# Without a GPU the CUDA parts are skipped, each with its reason, and it exits 0; with one it
# exits 1 when a stage failed or timed out (the results are written either way).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run it time-boxed, record status and seconds
  local name=$1 limit=$2
  shift 2
  local begin=$(date +%s)
  echo "=== gpu_check: $name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  local code=${PIPESTATUS[0]}
  echo "$name $code $(( $(date +%s) - begin ))" >> "$WORK/stages.txt"
}

skip() {  # skip NAME REASON
  echo "=== gpu_check: $1 skipped: $2"
  printf '%s skip 0 %s\n' "$1" "$2" >> "$WORK/stages.txt"
}

"$PY" -c "import fma_fast, fma_fast.kernels; print('gpu_check: fma_fast from', fma_fast.__file__)" \
  || { echo "gpu_check: fma_fast does not import"; exit 1; }
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

stage doctor 60 "$PY" -m fma_fast.cli doctor --json "$WORK/doctor.json"
if [ "$CUDA" = 1 ]; then
  # Kernel compiles dominate the tests: spread them over processes where pytest-xdist is
  # there. (The AOT compile check needs no GPU: CI runs it.)
  PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
  stage tests 150 "$PY" -m pytest -q -p no:cacheprovider $PARALLEL --junitxml="$WORK/tests.xml" \
    -k "not fits_the_architecture" tests/test_cuda.py tests/test_kernels_*.py
  FMA_BENCH_COMPILE=0 stage solver 150 "$PY" benchmarks/run.py \
    benchmarks/bench_gpu_solver.py -k "full or small" --out "$WORK" --name solver
  FMA_BENCH_COMPILE=0 stage kernels 75 "$PY" benchmarks/run.py \
    benchmarks/bench_kernels.py benchmarks/bench_training.py --quick --out "$WORK" --name kernels
else
  reason="no CUDA device here (torch.cuda.is_available() is False)"
  skip tests "$reason"
  skip solver "$reason"
  skip kernels "$reason"
fi
"$PY" benchmarks/gpu_report.py --work "$WORK" --out "$OUT" --seconds $(( $(date +%s) - START ))
