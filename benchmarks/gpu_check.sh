#!/usr/bin/env bash
# The GPU check of the r-softmax attention kernels (issue 13): the GPU test suite, then every benchmark, all JSON
# into one folder. Sized to finish in under 8 minutes on one H100/H200; each step has its own time limit so that a
# slow step cannot eat the others' time, and a failing step does not stop the later ones (the exit status says
# whether any failed).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default benchmarks/results/gpu-check-<UTC time>
#   bash benchmarks/gpu_check.sh --dry-run      # print the steps without running them
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT="${1:-benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
FAILED=()

step() {  # step NAME SECONDS COMMAND...
    local name="$1" seconds="$2"
    shift 2
    echo "== ${name} (limit ${seconds} s): $*"
    if [[ "${DRY_RUN}" == 1 ]]; then
        return
    fi
    local start=${SECONDS}
    timeout --signal=INT "${seconds}" "$@" 2>&1 | tee "${OUT}/${name}.log"
    local status=${PIPESTATUS[0]}
    echo "== ${name}: exit ${status} after $((SECONDS - start)) s"
    [[ "${status}" == 0 ]] || FAILED+=("${name}")
}

[[ "${DRY_RUN}" == 1 ]] || mkdir -p "${OUT}"
[[ "${DRY_RUN}" == 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "${OUT}/gpu.csv"

# 1. correctness on the GPU: the kernel tests (interpreter cases now compile for real) and the gpu-marked ones
step kernel-tests 120 python -m pytest tests/kernels -q -p no:cacheprovider -m "gpu or not slow" \
    --junitxml "${OUT}/kernel-tests.xml"
# 2. passes of the threshold search on Gaussian, skewed and real (MiniLM, GPT-2) scores
step pass-count 45 python -m benchmarks.bench_threshold_passes --lengths 1024 4096 --out-dir "${OUT}"
# 3. speed and memory against SDPA, eager, the reference, AdaSplash and entmax, with the goal table
step attention 220 python -m benchmarks.bench_r_softmax_attention --lengths 1024 4096 --out-dir "${OUT}"
# 4. the patched models end to end, and the LM heads
step patched-forward 30 python -m benchmarks.bench_patched_forward --out-dir "${OUT}"
step lm-head 40 python -m benchmarks.bench_lm_head --out-dir "${OUT}"

if [[ "${DRY_RUN}" == 0 ]]; then
    echo "results in ${OUT}: $(ls "${OUT}" | tr '\n' ' ')"
fi
if (( ${#FAILED[@]} )); then
    echo "failed steps: ${FAILED[*]}"
    exit 1
fi
