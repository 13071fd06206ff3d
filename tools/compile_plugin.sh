#!/usr/bin/env bash
# CI compile step of the FP4 GEMM plugin (compile only: nothing runs without a GPU).
#
# Compiles, one architecture at a time:
#   fp4_gemm_kernels.cu      (on-chip dequantization + WMMA) for sm_89, sm_90, sm_100a, sm_120a;
#   fp4_gemm_blockscaled.cu  (CUTLASS block-scaled FP4) for sm_100a and sm_120a;
#   fp4_gemm_blockscaled_dispatch.cpp, and fp4_gemm_plugin.cpp when TensorRT headers are found
#   (TRT_ROOT/include or TRT_INCLUDE_DIR: the TensorRT OSS repository's include/ works too).
# Prints the wall time of each step. Exit status: non-zero on the first failure.
#
# CUTLASS headers: tools/cutlass_headers.sh (CUTLASS_DIR, else the nvidia-cutlass wheel from PyPI,
# `pip download`, the only registry CI reaches, unpacked once into FP4_CACHE_DIR).
#
# Environment: NVCC (default nvcc), PYTHON (default .venv/bin/python, else python3), FP4_BUILD_DIR
# (default build/fp4_gemm_ci), CUTLASS_DIR / FP4_CACHE_DIR / CUTLASS_VERSION (tools/cutlass_headers.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/plugins/fp4_gemm"
NVCC="${NVCC:-nvcc}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
BUILD="${FP4_BUILD_DIR:-$ROOT/build/fp4_gemm_ci}"
mkdir -p "$BUILD/generated"

step() {  # step NAME COMMAND...: run, print its wall time
  local name="$1"; shift
  local start end
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  printf "%-44s %7.1f s\n" "$name" "$(awk "BEGIN { print $end - $start }")"
}

command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC): the CUDA toolkit is needed to compile" >&2; exit 1; }
CUTLASS_DIR="$(PYTHON="$PYTHON" "$ROOT/tools/cutlass_headers.sh")"
test -f "$CUTLASS_DIR/include/cutlass/version.h" || { echo "no CUTLASS headers in $CUTLASS_DIR" >&2; exit 1; }
echo "CUTLASS: $CUTLASS_DIR"
echo "nvcc: $("$NVCC" --version | tail -1)"

COMMON=(-std=c++17 -O3 -Xcompiler -fPIC -I"$SRC")
CUTLASS_INCLUDES=(-I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include" --expt-relaxed-constexpr)
total_start=$(date +%s)

step "description header" "$PYTHON" "$SRC/gen_header.py" "$SRC/fp4_gemm_plugin.toml" "$BUILD/generated/fp4_gemm_description.h"
for arch in 89 90 100a 120a; do
  step "fp4_gemm_kernels.cu sm_$arch" "$NVCC" "${COMMON[@]}" -gencode "arch=compute_$arch,code=sm_$arch" \
    -c "$SRC/fp4_gemm_kernels.cu" -o "$BUILD/fp4_gemm_kernels_sm$arch.o"
done
for sm in 100 120; do
  step "fp4_gemm_blockscaled.cu sm_${sm}a (CUTLASS)" "$NVCC" "${COMMON[@]}" "${CUTLASS_INCLUDES[@]}" \
    -DFP4_GEMM_BLOCKSCALED_SM=$sm -gencode "arch=compute_${sm}a,code=sm_${sm}a" \
    -c "$SRC/fp4_gemm_blockscaled.cu" -o "$BUILD/fp4_gemm_blockscaled_sm$sm.o"
done
step "fp4_gemm_blockscaled_dispatch.cpp" "$NVCC" "${COMMON[@]}" -c "$SRC/fp4_gemm_blockscaled_dispatch.cpp" \
  -o "$BUILD/fp4_gemm_blockscaled_dispatch.o"

# the link catches duplicate symbols between the per-family objects and unresolved entry points
step "link libfp4_gemm_kernels.so (sm_89 kernels)" "$NVCC" -shared -o "$BUILD/libfp4_gemm_kernels.so" \
  "$BUILD/fp4_gemm_kernels_sm89.o" "$BUILD/fp4_gemm_blockscaled_sm100.o" "$BUILD/fp4_gemm_blockscaled_sm120.o" \
  "$BUILD/fp4_gemm_blockscaled_dispatch.o" -lcudart
for symbol in fp4_gemm_run fp4_gemm_blockscaled_run fp4_gemm_blockscaled_reorder_scales fp4_gemm_blockscaled_scale_bytes; do
  nm -D --defined-only "$BUILD/libfp4_gemm_kernels.so" | grep -qw "$symbol" || { echo "missing entry point $symbol" >&2; exit 1; }
done

TRT_INCLUDE_DIR="${TRT_INCLUDE_DIR:-${TRT_ROOT:+$TRT_ROOT/include}}"
if [[ -n "$TRT_INCLUDE_DIR" && -f "$TRT_INCLUDE_DIR/NvInferRuntime.h" ]]; then
  step "fp4_gemm_plugin.cpp (TensorRT IPluginV3)" "$NVCC" "${COMMON[@]}" -I"$BUILD/generated" -I"$TRT_INCLUDE_DIR" \
    -Xcompiler -Wno-deprecated-declarations -x cu -c "$SRC/fp4_gemm_plugin.cpp" -o "$BUILD/fp4_gemm_plugin.o"
else
  echo "fp4_gemm_plugin.cpp: skipped (no TensorRT headers: set TRT_ROOT or TRT_INCLUDE_DIR)"
fi
echo "total: $(( $(date +%s) - total_start )) s"
