// FP4 GEMM kernels: Y[M, N] = X[M, K] @ dequant(W[N, K], S[N, K/16], g)^T (+ bias[N]).
//
// W: uint8 [N, K/2], two FP4 E2M1 codes per byte, element 2i of a row in the low nibble.
// S: FP8 E4M3 [N, K/16] (bytes). g: one float32 on the device. X, bias, Y: float16 or bfloat16, row-major.
// All pointers are device pointers. K must be a multiple of 16 (whole scale blocks).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

//! Element type of X, bias and Y.
enum Fp4GemmDtype
{
    FP4_GEMM_FLOAT16 = 0,
    FP4_GEMM_BFLOAT16 = 1
};

//! Status codes besides cudaError_t values (which are >= 0).
enum Fp4GemmStatus
{
    FP4_GEMM_OK = 0,
    FP4_GEMM_BAD_ARGUMENT = -1
};

//! Run the on-chip-dequantization tensor-core kernel (every arch >= sm_80). Returns FP4_GEMM_OK, a
//! negative Fp4GemmStatus, or the cudaError_t of the launch. Asynchronous on `stream`.
int fp4_gemm_run(int dtype, void const* x, uint8_t const* w_packed, uint8_t const* scales,
    float const* global_scale, void const* bias, void* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream);

//! Name of the kernel fp4_gemm_run picks for this M (for logs and the GPU check's table).
char const* fp4_gemm_kernel_name(int64_t m);

#ifdef __cplusplus
}
#endif
