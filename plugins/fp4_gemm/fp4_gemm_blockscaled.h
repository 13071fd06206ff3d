// C entry points of the Blackwell block-scaled FP4 GEMM (W4A4): see fp4_gemm_blockscaled.cu.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

enum Fp4BlockScaledStatus
{
    FP4_BLOCKSCALED_OK = 0,
    FP4_BLOCKSCALED_BAD_ARGUMENT = -1,
    FP4_BLOCKSCALED_UNSUPPORTED = -2,      //!< not sm_100/103/120/121, or CUTLASS cannot run this shape
    FP4_BLOCKSCALED_WORKSPACE_TOO_SMALL = -3
};

enum Fp4BlockScaledDtype
{
    FP4_BLOCKSCALED_FLOAT16 = 0,
    FP4_BLOCKSCALED_BFLOAT16 = 1
};

//! Y[M, N] = (g_x * g_w) * dequant(X_fp4)[M, K] @ dequant(W_fp4)[N, K]^T, all device pointers.
struct Fp4BlockScaledProblem
{
    int64_t m, n, k;                 //!< K a multiple of 32, N a multiple of 8
    int out_dtype;                   //!< Fp4BlockScaledDtype
    void const* x_fp4;               //!< [M, K/2] packed E2M1, low nibble first
    void const* w_fp4;               //!< [N, K/2] packed E2M1 (onnxq's w_packed)
    void const* x_scales_tiled;      //!< fp4_gemm_blockscaled_reorder_scales(..., is_activation=1)
    void const* w_scales_tiled;      //!< fp4_gemm_blockscaled_reorder_scales(..., is_activation=0)
    float const* x_global_scale;     //!< one float
    float const* w_global_scale;     //!< one float
    float* alpha_workspace;          //!< one float of scratch (alpha = g_x * g_w)
    void* y;                         //!< [M, N] float16/bfloat16
    void* gemm_workspace;            //!< CUTLASS workspace
    size_t gemm_workspace_bytes;
};

//! 1 when the current device has block-scaled FP4 tensor cores this library was built for.
int fp4_gemm_blockscaled_arch_supported();
//! Bytes of the tiled scale buffer for `rows` rows (M for activations, N for weights) and K.
int fp4_gemm_blockscaled_scale_bytes(int64_t rows, int64_t k, int is_activation);
//! Row-major FP8 scales [rows, K/16] -> CUTLASS's interleaved layout (zero padding).
int fp4_gemm_blockscaled_reorder_scales(
    uint8_t const* row_major, uint8_t* tiled, int64_t rows, int64_t k, int is_activation, cudaStream_t stream);
//! Run the GEMM; FP4_BLOCKSCALED_OK or a negative status or a cudaError_t.
int fp4_gemm_blockscaled_run(Fp4BlockScaledProblem const* problem, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
