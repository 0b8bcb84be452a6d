#!/usr/bin/env bash
# The one prepared GPU check: under 6 minutes on an H200 with the CUDA build, no network.  Steps, each
# under its own time budget (seconds), each result written the moment it exists:
#   env        15   versions, the GPU, every backend and why not (`python -m dasam3 env`)  -> env.json
#   build      90   the CUDA extension alone (DASAM3_BUILD_CPU=0), so the "cuda" backend is tested and
#                   timed too; DASAM3_BUILD_EXTENSION=0 skips it
#   tests      90   tests/kernels on the GPU (DASAM3_TEST_DEVICE=cuda)                    -> tests.xml
#   benchmark  120  benchmarks/gpu_check.py: dense FFN, torch, standard MoE, Triton, CUDA; every contender
#                   in its own guard, the JSON rewritten after each one                   -> benchmark.json
#   training   40   a short DA-SAM3 run with SAM3's towers under bf16 autocast            -> train_smoke.json
# Results go to $OUT when it is set, else to benchmarks/results/gpu_check_<UTC stamp>/: the log through
# tee as it is written, one JSON per step, and steps.json (each step's exit code, seconds, budget).
#
# Usage: benchmarks/gpu_check.sh [--dry-run]      (PYTHON=python3 by default; the repo is used in place)
# --dry-run walks every step on this machine's CPU with the GPU parts skipped (no build, the tests
# collected but not run, the benchmark and the training at toy size on the CPU) and writes no result files.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=""
if (( ! DRY_RUN )); then
    RESULTS=${OUT:-benchmarks/results/gpu_check_$STAMP}
    mkdir -p "$RESULTS"
    exec > >(tee "$RESULTS/gpu_check.log") 2>&1
fi

# out NAME: the option that writes result NAME (nothing in a dry run).
out() { (( DRY_RUN )) || echo "$1 $RESULTS/$2"; }

STEPS=()
FAILED=0
# step NAME BUDGET COMMAND...: COMMAND under its budget (three times it in a dry run: the CPU is slower);
# its exit code and seconds go to the log and to steps.json at once.
step() {
    local name=$1 budget=$2 start=$SECONDS rc
    shift 2
    (( DRY_RUN )) && budget=$((3 * budget))
    echo "== $name (budget $budget s)"
    timeout "$budget" "$@"
    rc=$?
    echo "== $name: exit code $rc after $((SECONDS - start)) s"
    STEPS+=("\"$name\": {\"exit_code\": $rc, \"seconds\": $((SECONDS - start)), \"budget_s\": $budget}")
    (( DRY_RUN )) || (IFS=,; echo "{${STEPS[*]}}") > "$RESULTS/steps.json"
    (( rc == 0 )) || FAILED=1
    return "$rc"
}
skipped() { echo "== $1: skipped in a dry run: $2"; }

echo "== gpu_check $STAMP$( (( DRY_RUN )) && echo ' (dry run: nothing is measured or written)')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
# shellcheck disable=SC2046  # out prints an option and its value, or nothing
step env 15 "$PYTHON" -m dasam3 env $(out --json env.json)

if (( DRY_RUN )); then
    skipped build "DASAM3_BUILD_CPU=0 DASAM3_BUILD_CUDA=1 $PYTHON setup.py -q build_ext --inplace"
elif [[ "${DASAM3_BUILD_EXTENSION:-1}" == 1 ]]; then
    step build 90 env DASAM3_BUILD_CPU=0 DASAM3_BUILD_CUDA=1 "$PYTHON" setup.py -q build_ext --inplace
fi

# The static report needs no GPU (CI runs it); here the budget goes to what only a GPU can check.
PYTEST_ARGS=(tests/kernels -q -p no:cacheprovider --ignore=tests/kernels/test_static_report.py)
if (( DRY_RUN )); then
    PYTEST_ARGS+=(--collect-only)
else
    PYTEST_ARGS+=(--durations=15 --junitxml="$RESULTS/tests.xml")
    "$PYTHON" -c 'import xdist' 2>/dev/null && PYTEST_ARGS+=(-n 8)  # Triton compiles on 8 CPU cores at once
fi
DASAM3_TEST_DEVICE=cuda step tests 90 "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"
TESTS_RC=$?

if (( DRY_RUN )); then
    TRITON_INTERPRET=1 step benchmark 120 "$PYTHON" benchmarks/gpu_check.py --dry-run
    step training 40 "$PYTHON" benchmarks/gpu_train_smoke.py --dry-run
else
    # shellcheck disable=SC2046
    step benchmark 120 "$PYTHON" benchmarks/gpu_check.py --tests-exit-code "$TESTS_RC" $(out --out benchmark.json)
    # shellcheck disable=SC2046
    step training 40 "$PYTHON" benchmarks/gpu_train_smoke.py $(out --out train_smoke.json)
fi
echo "== done$( (( FAILED )) && echo ': some step failed (see its exit code above)')"
exit "$FAILED"
