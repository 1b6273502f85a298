#!/usr/bin/env bash
# GPU first light in one command, on a machine with one CUDA GPU and no network:
#
#     scripts/gpu_first_light.sh [--out DIR] [--skip-tests]
#
# builds and installs the package against the torch and triton already there
# (pip install --no-build-isolation --no-deps --no-index -e .: nothing is downloaded; the C++/CUDA
# extension is compiled with ninja, MAX_JOBS jobs, nvcc compiling its GPU targets in parallel), then
# runs `python -m vit_fast.first_light` with what is left of FIRST_LIGHT_BUDGET_S (default 480 s:
# 8 minutes, build included). Other arguments go to vit_fast.first_light; see its --help. The
# results (first_light.json, FIRST_LIGHT.md, bench_train.json, traces, logs) go to --out, default
# results/gpu/<gpu-name>/. A failed build is recorded and the stages still run: those that need the
# extension then fail with its error.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
total_s=${FIRST_LIGHT_BUDGET_S:-480}
python=${PYTHON:-$(command -v python || command -v python3)}
log=$(mktemp "${TMPDIR:-/tmp}/first_light_install.XXXXXX.log")
start=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# --threads 0: nvcc compiles the -gencode targets (sm_80, sm_90, ... and PTX) side by side.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --threads 0"
echo "[first_light] installing (build log: $log)"
if timeout 240 "$python" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$log" 2>&1; then
    install_status=ok
else
    install_status="failed (exit $?)"
    tail -20 "$log"
fi
install_s=$(( $(date +%s) - start ))
echo "[first_light] install: $install_status in ${install_s} s"
left=$(( total_s - install_s - 5 ))
if (( left < 60 )); then
    left=60  # the build took the budget: still take the environment and what a minute allows
fi
exec "$python" -m vit_fast.first_light --budget-s "$left" --install-log "$log" --install-s "$install_s" \
    --install-status "$install_status" "$@"
