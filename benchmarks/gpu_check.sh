#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on an H200, no network):
#   1. correctness on cuda: the backend conformance suite (every backend available on cuda against the
#      reference, fp32/fp16/bf16 and a float64 gradcheck) and the Triton tests, DASAM3_TEST_DEVICE=cuda;
#   2. the benchmark (benchmarks/gpu_check.py): dense FFN, torch path, standard MoE, Triton path.
# Writes benchmarks/results/gpu_check_<UTC stamp>.{json,log}, and copies both to $OUT when it is set.
#
# Usage: benchmarks/gpu_check.sh          (PYTHON=python3 by default; the repo is used in place)
#        DASAM3_BUILD_EXTENSION=1 benchmarks/gpu_check.sh   also builds csrc/ first, so that the
#        compiled "cuda" backend is tested and timed too (adds minutes: nvcc).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS=benchmarks/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG=$RESULTS/gpu_check_$STAMP.log
JSON=$RESULTS/gpu_check_$STAMP.json
mkdir -p "$RESULTS"
exec > >(tee "$LOG") 2>&1

echo "== gpu_check $STAMP"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "device", torch.cuda.get_device_name())'

if [[ "${DASAM3_BUILD_EXTENSION:-0}" == 1 ]]; then
    echo "== building the extension"
    timeout 240 "$PYTHON" -m pip install -e . --no-build-isolation --no-deps -q || echo "extension build failed"
fi

echo "== correctness on cuda"
PYTEST_ARGS=(tests/kernels -q -p no:cacheprovider --durations=15)
"$PYTHON" -c 'import xdist' 2>/dev/null && PYTEST_ARGS+=(-n 8)  # Triton compiles on 8 CPU cores at once
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && PYTEST_ARGS+=(--timeout=150)
START=$SECONDS
DASAM3_TEST_DEVICE=cuda timeout 240 "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"
TESTS_RC=$?
echo "tests exit code $TESTS_RC after $((SECONDS - START)) s"

echo "== benchmark"
START=$SECONDS
timeout 200 "$PYTHON" benchmarks/gpu_check.py --tests-exit-code "$TESTS_RC" --out "$JSON"
BENCH_RC=$?
echo "benchmark exit code $BENCH_RC after $((SECONDS - START)) s"

[[ -n "${OUT:-}" ]] && cp "$LOG" "$OUT/"  # gpu_check.py copies the JSON itself
exit $(( TESTS_RC != 0 || BENCH_RC != 0 ))
