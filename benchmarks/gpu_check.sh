#!/usr/bin/env bash
# Issue 16's GPU check: one script, under 8 minutes, on any machine with an NVIDIA GPU and no internet.
# Never part of CI. Run from anywhere; it runs from the repository root:
#
#     PYTHON=/path/to/python-with-cuda-torch bash benchmarks/gpu_check.sh
#     bash benchmarks/gpu_check.sh --cpu-smoke     # the checks and the certified step on the CPU, tiny (smoke test)
#
# Steps, each under `timeout`: the conformance suite on every CUDA device embedtools finds
# (tests/conformance picks devices through embedtools.backends.devices), bench_backends (every backend
# and device, 200,000 x 384), and the certified benchmark at 1,000,000 x 384 and x 1,024 with 1,000
# queries (bfloat16 and float16 screens against float32 exact search, torch naive and the float32
# product). The project is used in place (PYTHONPATH=.), nothing is installed. Exit status: 0 when
# every step passed, 1 when one failed or timed out, 2 when the machine cannot run the check at all.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
failed=0

step() {  # step SECONDS NAME COMMAND...: run under timeout, report, remember a failure
    local seconds=$1 name=$2
    shift 2
    echo
    echo "=== $name (timeout ${seconds}s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@"
    local rc=$?
    if [[ $rc -eq 0 ]]; then
        echo "=== $name: ok in $((SECONDS - started)) s"
    else
        [[ $rc -eq 124 ]] && echo "=== $name: TIMED OUT after ${seconds}s" || echo "=== $name: FAILED (exit $rc)"
        failed=1
    fi
}

echo "gpu_check: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), repository $PWD, $(date -u +%FT%TZ)"
missing=$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("numpy", "safetensors", "dependency_injector", "torch") if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "gpu_check: $PYTHON lacks $missing (embedtools needs numpy, safetensors and dependency-injector;"
    echo "the check needs a CUDA build of torch); nothing was run"
    exit 2
fi
if [[ $SMOKE -eq 0 ]]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device; nothing was run"
        exit 2
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    DEVICE=cuda:0 ROWS=1000000 QUERIES=1000 DIMS="384:110 1024:150" REPEAT=3 SIDE=4096
else
    DEVICE=cpu ROWS=3000 QUERIES=8 DIMS="64:120" REPEAT=1 SIDE=256
fi
if [[ $SMOKE -eq 0 ]]; then
    "$PYTHON" -c "from embedtools.backends import available_backends, devices
print('embedtools devices:', ', '.join(f'{b}-{d}' for b in available_backends() for d in devices(b)))"
    if "$PYTHON" -c "import pytest, hypothesis" 2>/dev/null; then
        step 150 "conformance suite on the CUDA devices" "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/conformance -k cuda
    else
        echo "=== conformance suite: SKIPPED, $PYTHON lacks pytest or hypothesis (pip install -e '.[dev]' where it can)"
        failed=1
    fi
    step 60 "bench_backends" "$PYTHON" -m benchmarks.bench_backends --repeat "$REPEAT"
fi
for dim_limit in $DIMS; do  # DIM:TIMEOUT
    dim=${dim_limit%:*}
    step "${dim_limit#*:}" "certified ${ROWS} x ${dim}, ${QUERIES} queries on $DEVICE" "$PYTHON" -m benchmarks.bench_search \
        --only certified --rows "$ROWS" --dim "$dim" --queries "$QUERIES" --repeat "$REPEAT" --device "$DEVICE" \
        --screens bfloat16,float16 --gemm-side "$SIDE"
done
echo
[[ $failed -eq 0 ]] && echo "gpu_check: every step passed" || echo "gpu_check: some step FAILED (see above)"
exit $failed
