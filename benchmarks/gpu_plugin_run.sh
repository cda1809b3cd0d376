#!/usr/bin/env bash
# One GPU session for the ReciprocalNeighbors plugin: build, GPU tests, compute-sanitizer, benchmark.
#
#   OUT=/path/for/logs bash benchmarks/gpu_plugin_run.sh
#
# Builds libnformer_kernels.so (sm_90 only unless CUDA_ARCHS is set; plus libnformer_plugins.so and its
# self-test when TENSORRT_ROOT or ./.trt-headers holds TensorRT's headers), runs the `gpu` tests, runs
# compute-sanitizer memcheck / racecheck / synccheck on a mid-size case, then the benchmark. The script
# goes on after a failed step, so one run says as much as it can, and exits non-zero if any step failed.
# $OUT receives four files: run.log (every step), gpu_test_log.txt, sanitizer.log and
# reciprocal_neighbors_gpu.json. Needs nvcc, cmake, compute-sanitizer, python3 with torch (CUDA) and
# pytest; no network, no pip install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_plugin_run}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
BUILD=build/plugins
export NFORMER_PLUGIN_DIR="$PWD/$BUILD"
ARCHS=${CUDA_ARCHS:-90}
SKIP=${SKIP:-}   # e.g. SKIP="sanitizer benchmark" on a rerun
failed=()
LOG="$OUT/run.log"
: > "$LOG"
step() { # step NAME LOGFILE COMMAND...: run, append to LOGFILE and run.log, remember failures
    local name=$1 log=$2; shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    local rc
    if [ "$log" = "$LOG" ]; then
        "$@" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]}
    else
        local start=0; [ -f "$log" ] && start=$(wc -l < "$log")
        "$@" 2>&1 | tee -a "$log" | tee -a "$LOG" >/dev/null; rc=${PIPESTATUS[0]}
        tail -n +"$((start + 1))" "$log" | tail -n 40
    fi
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name")
    return "$rc"
}

step environment "$LOG" bash -c "nvidia-smi; nvcc --version; date -u; \
    python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"

TRT_ARGS=(-DNFORMER_BUILD_PLUGIN=OFF)
if [ -n "${TENSORRT_ROOT:-}" ]; then TRT_ARGS=(-DTENSORRT_ROOT="$TENSORRT_ROOT");
elif [ -f .trt-headers/include/NvInfer.h ]; then TRT_ARGS=(-DTENSORRT_ROOT="$PWD/.trt-headers"); fi
step build "$LOG" bash -c "cmake -S plugins -B $BUILD -DCMAKE_CUDA_ARCHITECTURES='$ARCHS' ${TRT_ARGS[*]} && cmake --build $BUILD -j" \
    || { echo "build failed: nothing else can run"; exit 1; }

# the wgmma candidate kernel must be real Hopper warpgroup MMA (HGMMA) in the machine code, not HMMA
if command -v cuobjdump >/dev/null; then
    step sass_hgmma "$LOG" bash -c "n=\$(cuobjdump -sass $BUILD/libnformer_kernels.so | grep -c HGMMA); \
        echo \"HGMMA instructions in libnformer_kernels.so: \$n\"; [ \"\$n\" -gt 0 ]"
fi

if [ -x "$BUILD/nformer_plugin_selftest" ]; then
    step plugin_selftest "$LOG" "$BUILD/nformer_plugin_selftest" "$BUILD/libnformer_plugins.so" --gpu
fi

# a quick check of the candidate kernels first: if it fails, stop here and keep the device time
step smoke "$LOG" timeout 120 python3 benchmarks/wgmma_smoke.py \
    || { echo "smoke check failed: stopping before the long steps"; echo "failed steps: ${failed[*]}" | tee -a "$LOG"; exit 1; }

[[ " $SKIP " == *" tests "* ]] || step gpu_tests "$OUT/gpu_test_log.txt" timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -m gpu tests/plugins/test_plugin_gpu.py -q -rs -p no:cacheprovider

# compute-sanitizer on a standalone driver (no Python under the sanitizer): N = 2000 with duplicates and
# zero rows, fp32 and fp16, k = 20 and 64, default / exact-only / 32-row tiles.
DRIVER=/tmp/nformer_sanitize_driver
cat > "$DRIVER.cu" <<'CU'
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
extern "C" int nformer_reciprocal_neighbors_ex(const void*, int, int, int, int, int, int*, int*, void*, size_t,
                                               cudaStream_t, int, int);
extern "C" size_t nformer_reciprocal_neighbors_workspace_ex(int, int, int, int, int);
extern "C" const char* nformer_status_string(int);
int main(int argc, char** argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000, d = 256;
    bool quick = argc > 2;  // racecheck / synccheck: fewer configurations
    std::vector<float> x(size_t(n) * d);
    srand(1);
    for (auto& v : x) v = float(rand()) / RAND_MAX - 0.5f;
    for (int i = 100; i < 180 && i < n; ++i) for (int t = 0; t < d; ++t) x[size_t(i) * d + t] = x[t];  // duplicates
    for (int t = 0; t < d && n > 300; ++t) x[size_t(300) * d + t] = 0.f;                               // zero row
    std::vector<__half> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = __float2half(x[i]);
    void *dx, *dh; int *idx, *valid; void* ws;
    cudaMalloc(&dx, x.size() * 4); cudaMalloc(&dh, h.size() * 2);
    cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dh, h.data(), h.size() * 2, cudaMemcpyHostToDevice);
    int bad = 0;
    for (int k : {20, 64}) for (int dtype : {0, 1}) for (int flags : {0, 1, 4, 16}) {
        if (quick && !((k == 20 && dtype == 0 && flags != 4) || (k == 64 && dtype == 1 && flags == 4))) continue;
        size_t wsb = nformer_reciprocal_neighbors_workspace_ex(1, n, d, k, 0);
        int ke = k < n ? k : n;
        cudaMalloc(&idx, size_t(n) * ke * 4); cudaMalloc(&valid, size_t(n) * ke * 4); cudaMalloc(&ws, wsb);
        int s = nformer_reciprocal_neighbors_ex(dtype ? dh : dx, dtype, 1, n, d, k, idx, valid, ws, wsb, 0, 0, flags);
        cudaError_t e = cudaDeviceSynchronize();
        printf("k=%d dtype=%d flags=%d: status %d (%s), sync %s\n", k, dtype, flags, s, nformer_status_string(s),
               cudaGetErrorString(e));
        bad |= s != 0 || e != cudaSuccess;
        cudaFree(idx); cudaFree(valid); cudaFree(ws);
    }
    printf("%s\n", bad ? "FAILED" : "OK");
    return bad;
}
CU
if [[ " $SKIP " != *" sanitizer "* ]] && step sanitize_build "$LOG" nvcc -O2 -std=c++17 -arch=sm_90 "$DRIVER.cu" -o "$DRIVER" \
    -L"$BUILD" -lnformer_kernels -Xlinker -rpath -Xlinker "$PWD/$BUILD"; then
    step memcheck "$OUT/sanitizer.log" timeout 150 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 "$DRIVER" 2000
    step racecheck "$OUT/sanitizer.log" timeout 120 compute-sanitizer --tool racecheck --error-exitcode 3 "$DRIVER" 700 quick
    step synccheck "$OUT/sanitizer.log" timeout 120 compute-sanitizer --tool synccheck --error-exitcode 3 "$DRIVER" 700 quick
fi

[[ " $SKIP " == *" benchmark "* ]] || step benchmark "$LOG" timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_reciprocal_neighbors_gpu.py --json "$OUT/reciprocal_neighbors_gpu.json" \
    ${BENCH_ARGS:-}

echo "failed steps: ${failed[*]:-none}" | tee -a "$LOG"
[ ${#failed[@]} -eq 0 ]
