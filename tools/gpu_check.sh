#!/usr/bin/env bash
# FP4 GEMM on an NVIDIA GPU: build libfp4_gemm_kernels.so for this GPU, check every kernel against the
# numpy reference (max relative error; exit 1 above tolerance), and print the throughput table
# (tools/fp4_gemm_gpu_check.py). Needs nvcc, nvidia-smi and torch with CUDA in PYTHON's environment.
#
# Environment: PYTHON (default .venv/bin/python, else python3), NVCC (nvcc), CUTLASS_DIR (else the
# nvidia-cutlass wheel: tools/cutlass_headers.sh), FP4_BUILD_DIR (build/fp4_gemm_gpu).
# Arguments are passed to the Python check (e.g. --skip-throughput).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/plugins/fp4_gemm"
NVCC="${NVCC:-nvcc}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
BUILD="${FP4_BUILD_DIR:-$ROOT/build/fp4_gemm_gpu}"
mkdir -p "$BUILD"

"$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || { echo "$PYTHON needs torch with CUDA (cuBLAS baseline, device memory): pip install torch" >&2; exit 2; }
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), sm_$CAP"
COMMON=(-std=c++17 -O3 -Xcompiler -fPIC -I"$SRC")
OBJECTS=()

case "$CAP" in
  100|103|120|121) FAMILY=$(( CAP / 10 * 10 )); ARCH="${CAP}a" ;;
  *) FAMILY=""; ARCH="$CAP" ;;
esac
"$NVCC" "${COMMON[@]}" -gencode "arch=compute_$ARCH,code=sm_$ARCH" -c "$SRC/fp4_gemm_kernels.cu" -o "$BUILD/kernels.o"
OBJECTS+=("$BUILD/kernels.o")

if [[ -n "$FAMILY" ]]; then
  CUTLASS_DIR="$(PYTHON="$PYTHON" "$ROOT/tools/cutlass_headers.sh")"
  # sm_100 and sm_120 objects are both needed by the dispatcher; the other family's is compiled for its own arch
  for sm in 100 120; do
    "$NVCC" "${COMMON[@]}" -I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include" --expt-relaxed-constexpr \
      -DFP4_GEMM_BLOCKSCALED_SM=$sm -gencode "arch=compute_${sm}a,code=sm_${sm}a" \
      -c "$SRC/fp4_gemm_blockscaled.cu" -o "$BUILD/blockscaled_sm$sm.o"
    OBJECTS+=("$BUILD/blockscaled_sm$sm.o")
  done
  "$NVCC" "${COMMON[@]}" -c "$SRC/fp4_gemm_blockscaled_dispatch.cpp" -o "$BUILD/dispatch.o"
  OBJECTS+=("$BUILD/dispatch.o")
fi
"$NVCC" -shared -o "$BUILD/libfp4_gemm_kernels.so" "${OBJECTS[@]}" -lcudart
echo "built $BUILD/libfp4_gemm_kernels.so"

"$PYTHON" "$ROOT/tools/fp4_gemm_gpu_check.py" --lib "$BUILD/libfp4_gemm_kernels.so" "$@"
