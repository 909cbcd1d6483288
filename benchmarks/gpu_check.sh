#!/usr/bin/env bash
# The GPU half in one command, on a GPU machine as it comes: torch and triton preinstalled, no
# open_clip, no network; pytest-benchmark and pytest-xdist used where they are (probed first). Runs the package from this checkout (PYTHONPATH), stage by stage (STAGES
# below), each in a time box, all within one budget (default 540 s: one 10-minute command with
# margin), then writes OUT/<gpu>.md and OUT/<gpu>.json (default OUT: benchmarks/results/<device>,
# the folder benchmarks/run.py writes this device's results to).
#
#   bash benchmarks/gpu_check.sh [OUT]             # run (or resume) the check
#   bash benchmarks/gpu_check.sh --plan            # the stages and their times; runs nothing
#   options: --budget SECONDS, --only NAME[,NAME], --box NAME=SECONDS, --fresh
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh     # another interpreter
#
# A cold machine compiles every kernel specialisation on first use (1.5-6 s each, plus about
# 3 s for its launcher), so the boxes are sized for a cold Triton cache, which is kept in
# OUT/gpu-check/triton-cache: a rerun finds it warm and resumes, skipping the stages that passed
# for the same sources (--fresh reruns them). A stage that outruns its box or the budget is
# stopped with SIGINT (then SIGKILL 20 s later), so pytest still writes its JUnit report; every
# log stays in OUT/gpu-check/. Without a GPU the CUDA stages are skipped with the reason and it
# exits 0; with one it exits 1 when a stage failed, ran out of time or was not reached.
set -u
cd "$(dirname "$0")/.."

# One line per stage, run in this order: name | needs (any, cuda, benchmark) | box (s) |
# cold-cache estimate (s) with pytest-xdist | the same in one process | command. The estimates
# count the kernel specialisations a stage compiles at ~6 s each (doctor: 21; smoke: ~30; the
# other CUDA tests: 150-200, the issue-21 audit) plus start-up; benchmarks also time their runs.
# `tests NAME ARGS` runs pytest on ARGS, `bench NAME ARGS` runs benchmarks/run.py on ARGS.
# (The AOT compile checks need no GPU: CI runs them.)
STAGES=(
  "doctor|any|240|150|150|doctor"
  "smoke|cuda|180|80|200|tests smoke \"\${SMOKE[@]}\""
  "tests|cuda|300|200|900|tests tests tests/test_cuda.py tests/test_kernels_*.py \"\${NOT_SMOKE[@]}\" -k 'not fits_the_architecture and not test_kernels_aot'"
  "solver|cuda,benchmark|180|120|120|bench solver benchmarks/bench_gpu_solver.py -k 'full or small'"
  "kernels|cuda,benchmark|120|90|90|bench kernels benchmarks/bench_kernels.py benchmarks/bench_training.py --quick"
  "solvegrad|cuda,benchmark|150|60|60|bench solvegrad benchmarks/bench_solve_grad.py -k 'full and not rows1024'"
)
# One native correctness test per kernel family, and fit + solve end to end on CUDA.
SMOKE=(
  "tests/test_kernels_cosine_topk.py::test_cosine_topk_equals_reference[17-130-64-5]"
  "tests/test_kernels_cosine_topk.py::test_step_ensemble_equals_reference[7-37-20-3]"
  "tests/test_kernels_cosine_cross_entropy.py::test_loss_and_grad_equal_reference[20-50-33-100.0-native]"
  "tests/test_kernels_euler.py::test_ten_steps_equal_reference[shape1-False]"
  "tests/test_kernels_flow_matching.py::test_pair_loss_and_grad_equal_reference[5-7-40-bridge]"
  "tests/test_kernels_flow_matching.py::test_noise_reproducible_and_seed_dependent"
  "tests/test_kernels_folded_step.py::test_residual_block_matches_reference[37-48-40-torch.float32]"
  "tests/test_kernels_folded_step.py::test_final_euler_update_matches_reference[37-48-40-torch.float32]"
  "tests/test_cuda.py::test_solve_on_cuda_agrees_with_the_reference[fp32]"
)
REPORT_RESERVE=20  # seconds kept for the report
MIN_BOX=30         # no stage starts with less of the budget left

PLAN=0 FRESH=0 BUDGET=540 ONLY="" BOXES="" OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) PLAN=1 ;;
    --fresh) FRESH=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=",$2," ; shift ;;
    --box) BOXES="$BOXES $2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done

field() { echo "$1" | cut -d'|' -f"$2"; }
box_of() {  # box_of NAME DEFAULT: the --box override or the default
  local name=$1 box=$2 pair
  for pair in $BOXES; do [ "${pair%%=*}" = "$name" ] && box=${pair#*=}; done
  echo "$box"
}
selected() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

if [ "$PLAN" = 1 ]; then
  printf 'gpu_check plan: budget %s s (%s s kept for the report); estimates for a cold Triton cache\n' \
    "$BUDGET" "$REPORT_RESERVE"
  printf '%-8s %-15s %7s %12s %12s  %s\n' stage needs "box (s)" "est. xdist" "est. 1 proc" command
  total_box=0 total_fast=0 total_slow=0
  for line in "${STAGES[@]}"; do
    name=$(field "$line" 1)
    selected "$name" || continue
    box=$(box_of "$name" "$(field "$line" 3)")
    printf '%-8s %-15s %7s %12s %12s  %s\n' "$name" "$(field "$line" 2)" "$box" \
      "$(field "$line" 4)" "$(field "$line" 5)" "$(field "$line" 6-)"
    total_box=$((total_box + box)); total_fast=$((total_fast + $(field "$line" 4)))
    total_slow=$((total_slow + $(field "$line" 5)))
  done
  printf '%-8s %-15s %7s %12s %12s\n' total "" "$total_box" "$total_fast" "$total_slow"
  echo "Stages run in order while the budget lasts, each stopped at min(box, budget left);"
  echo "a rerun resumes with the warm cache in OUT/gpu-check/triton-cache."
  for column in 4 5; do  # where a cold run is expected to stop
    at=0 stop=""
    for line in "${STAGES[@]}"; do
      name=$(field "$line" 1); selected "$name" || continue
      box=$(box_of "$name" "$(field "$line" 3)") estimate=$(field "$line" "$column")
      [ "$estimate" -gt "$box" ] && estimate=$box
      at=$((at + estimate))
      if [ -z "$stop" ] && [ "$at" -gt $((BUDGET - REPORT_RESERVE)) ]; then stop=$name; fi
    done
    how=$([ "$column" = 4 ] && echo "with pytest-xdist" || echo "in one process")
    if [ -n "$stop" ]; then
      echo "Cold, $how: expected to run out of budget in '$stop'; the rest needs a rerun."
    else
      echo "Cold, $how: expected to finish within the budget (about $at s of stages)."
    fi
  done
  exit 0
fi

PY="${PYTHON:-python3}"
if [ -z "$OUT" ]; then  # the device's folder, named as run.py names it
  OUT="benchmarks/results/$(PYTHONPATH="$PWD" "$PY" benchmarks/run.py --device-slug 2>/dev/null \
    || echo unknown-device)"
fi
WORK="$OUT/gpu-check"
mkdir -p "$WORK/passed"
WORK=$(cd "$WORK" && pwd)
export PY WORK PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton-cache}"
unset TRITON_INTERPRET
[ "$FRESH" = 1 ] && rm -f "$WORK"/passed/*
: > "$WORK/stages.txt"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

# What ran: the sources' digest (a stage passed for other sources runs again) and the plugins.
SOURCES=$(find fma_fast kernels tests benchmarks -name gpu-check -prune -o \( -name '*.py' -o \
  -name '*.sh' \) -print | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
"$PY" -c "import fma_fast, fma_fast.kernels; print('gpu_check: fma_fast from', fma_fast.__file__)" \
  || { echo "gpu_check: fma_fast does not import"; exit 1; }
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
has() { "$PY" -c "import $1" >/dev/null 2>&1 && echo yes || echo no; }
BENCHMARK=$(has pytest_benchmark) XDIST=$(has xdist)
printf 'sources %s\ncuda %s\npytest-benchmark %s\npytest-xdist %s\n' \
  "$SOURCES" "$CUDA" "$BENCHMARK" "$XDIST" > "$WORK/probes.txt"
echo "gpu_check: work folder $WORK; $(tr '\n' ' ' < "$WORK/probes.txt")"
PARALLEL=""
if [ "$XDIST" = yes ]; then
  workers=$(nproc 2>/dev/null || echo 2); [ "$workers" -gt 8 ] && workers=8
  PARALLEL="-n $workers"
fi
export PARALLEL
# The stage commands see SMOKE and NOT_SMOKE (its --deselect options) as arrays.
ARRAYS="SMOKE=($(printf '%q ' "${SMOKE[@]}")); NOT_SMOKE=($(printf -- '--deselect=%q ' "${SMOKE[@]}"))"

doctor() { "$PY" -m fma_fast.cli doctor --json "$WORK/doctor.json"; }
tests() {  # tests NAME PYTEST-ARGS...: pytest with its JUnit report at WORK/NAME.xml
  local name=$1; shift
  "$PY" -m pytest -q -p no:cacheprovider $PARALLEL -rfEs --junitxml="$WORK/$name.xml" "$@"
}
bench() {  # bench NAME RUN-ARGS...: benchmarks/run.py, its report at WORK/NAME.json
  local name=$1; shift
  FMA_BENCH_COMPILE=0 "$PY" benchmarks/run.py "$@" --out "$WORK" --name "$name"
}
export -f doctor tests bench

record() { printf '%s\n' "$*" >> "$WORK/stages.txt"; }  # NAME CODE SECONDS [REASON]

for line in "${STAGES[@]}"; do
  name=$(field "$line" 1) needs=$(field "$line" 2) command=$(field "$line" 6-)
  selected "$name" || continue
  why=""
  [[ "$needs" == *cuda* && "$CUDA" != 1 ]] && why="no CUDA device here (torch.cuda.is_available() is False)"
  [[ "$needs" == *benchmark* && "$BENCHMARK" != yes ]] && \
    why="${why:+$why; }pytest-benchmark is not installed (the benchmark files need its fixture)"
  if [ -n "$why" ]; then
    echo "=== gpu_check: $name skipped: $why"; record "$name" skip 0 "$why"; continue
  fi
  if [ "$(cat "$WORK/passed/$name" 2>/dev/null)" = "$SOURCES" ]; then
    echo "=== gpu_check: $name passed in an earlier run for these sources (--fresh reruns it)"
    record "$name" earlier 0 "passed in an earlier run for the same sources"; continue
  fi
  left=$(( BUDGET - $(elapsed) - REPORT_RESERVE ))
  if [ "$left" -lt "$MIN_BOX" ]; then
    why="not reached: ${left} s of the ${BUDGET} s budget left; rerun to resume"
    echo "=== gpu_check: $name $why"; record "$name" budget 0 "$why"; continue
  fi
  box=$(box_of "$name" "$(field "$line" 3)")
  [ "$box" -gt "$left" ] && box=$left
  echo "=== gpu_check: $name (at most $box s): $command"
  rm -f "$WORK/$name.json" "$WORK/$name.md" "$WORK/$name.xml"  # no stale results in the report
  begin=$(date +%s)
  # SIGINT first, so that pytest writes its reports; SIGKILL 20 s later. (GNU timeout hands
  # its command a default SIGINT even where this script was started with SIGINT ignored.)
  timeout -s INT -k 20 "$box" bash -c "$ARRAYS; $command" 2>&1 | tee "$WORK/$name.log"
  code=${PIPESTATUS[0]}
  seconds=$(( $(date +%s) - begin ))
  reason=""
  [ "$code" = 124 ] || [ "$code" = 137 ] && reason="stopped after its ${box} s box"
  record "$name" "$code" "$seconds" "$reason"
  [ "$code" = 0 ] && echo "$SOURCES" > "$WORK/passed/$name"
done
"$PY" benchmarks/gpu_report.py --work "$WORK" --out "$OUT" --seconds "$(elapsed)"
