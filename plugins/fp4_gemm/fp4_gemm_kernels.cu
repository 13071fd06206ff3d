// On-chip-dequantization FP4 GEMM (Ada sm_89, Hopper sm_90, and Blackwell as a W4A16 fallback).
//
// Each thread block computes a BM x BN tile of Y. Per K step of BK values it
//  - copies the X tile (BM x BK, float16/bfloat16) into shared memory;
//  - reads the W tile as packed FP4 bytes (8 bytes = 16 values = one scale block per unit of work)
//    plus one FP8 scale per unit, and writes fp4 * fp8 into shared memory in X's type. That product
//    is exact in float16 and bfloat16 (2 + 4 significant bits, |v| in [2^-10, 2688]), so the only
//    rounding of the weight happens nowhere: the global scale g multiplies the FP32 accumulator in
//    the epilogue. Weights never pass through global memory in dequantized form;
//  - multiplies on tensor cores with WMMA 16x16x16 fragments, FP32 accumulation.
// Epilogue: y = g * acc (+ bias), rounded once to X's type.
//
// Two tile shapes: BM = 16 for decode-style M <= 16 (less wasted MMA work), BM = 64 otherwise.
// Correctness first: no multi-stage pipeline and no split-K yet (see README, "Performance").
#include "fp4_gemm_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <mma.h>

namespace
{
using namespace nvcuda;

constexpr int kBlockN = 64;
constexpr int kBlockK = 64;
constexpr int kScaleBlock = 16;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSmemPad = 8;     // 16 bytes: keeps WMMA's ldm a multiple of 8 and spreads banks
constexpr int kSmallM = 16;     // M up to this uses the BM = 16 tile
constexpr int kFragment = 16;

constexpr uint32_t kFp4SignBit = 0x8;
constexpr int kFloatExponentShift = 23;
constexpr int kFloatMantissaTopShift = 22;
constexpr int kFp4ToFloatExponentBias = 126;  // E2M1 exponent bias 1 -> float's 127

//! E2M1 code -> float, bit arithmetic instead of a table (a table in constant memory serializes lanes
//! that read different codes): exponent field 0 is the subnormal 0 / 0.5, otherwise
//! (1 + mantissa / 2) * 2^(exponent - 1); bit 3 is the sign (code 8 is -0).
__device__ float fp4ToFloat(uint32_t code)
{
    uint32_t const exponent = (code >> 1) & 0x3;
    uint32_t const mantissa = code & 0x1;
    float const magnitude = exponent == 0 ? 0.5f * static_cast<float>(mantissa)
                                          : __uint_as_float(((exponent + kFp4ToFloatExponentBias) << kFloatExponentShift)
                                              | (mantissa << kFloatMantissaTopShift));
    return (code & kFp4SignBit) ? -magnitude : magnitude;
}

template <typename T>
__device__ T fromFloat(float v);
template <>
__device__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

__device__ float fp8ToFloat(uint8_t bits)
{
    __nv_fp8_e4m3 value;
    value.__x = bits;
    return static_cast<float>(value);
}

// WMMA loads and stores need 256-bit aligned tile pointers: every tile row used starts at a multiple
// of 16 rows (16 x 144 bytes, 16 x 272 bytes) and the arrays start 128-byte aligned
template <typename T, int BM>
struct alignas(128) SharedTiles
{
    T x[BM][kBlockK + kSmemPad];
    T w[kBlockN][kBlockK + kSmemPad];
    float y[BM][kBlockN + 4];
};

//! X tile [BM, BK] at (m0, k0) into shared memory, zeros outside the matrix.
template <typename T, int BM>
__device__ void loadX(SharedTiles<T, BM>& s, T const* x, int64_t m, int64_t k, int64_t m0, int64_t k0)
{
    for (int i = threadIdx.x; i < BM * kBlockK; i += kThreads)
    {
        int const row = i / kBlockK;
        int const col = i % kBlockK;
        bool const inside = m0 + row < m && k0 + col < k;
        s.x[row][col] = inside ? x[(m0 + row) * k + k0 + col] : fromFloat<T>(0.0f);
    }
}

//! W tile [BN, BK] at (n0, k0): packed FP4 + FP8 scale -> fp4 * fp8 in T, one scale block per step.
template <typename T, int BM>
__device__ void loadW(SharedTiles<T, BM>& s, uint8_t const* w, uint8_t const* scales, int64_t n, int64_t k,
    int64_t n0, int64_t k0)
{
    constexpr int kBlocksPerRow = kBlockK / kScaleBlock;
    for (int unit = threadIdx.x; unit < kBlockN * kBlocksPerRow; unit += kThreads)
    {
        int const row = unit / kBlocksPerRow;
        int const block = unit % kBlocksPerRow;
        int64_t const kBlockStart = k0 + block * kScaleBlock;
        T* out = &s.w[row][block * kScaleBlock];
        if (n0 + row >= n || kBlockStart >= k)
        {
            for (int j = 0; j < kScaleBlock; ++j)
                out[j] = fromFloat<T>(0.0f);
            continue;
        }
        // 8 bytes, 8-byte aligned: a row is K / 2 bytes, a multiple of 8 because K % 16 == 0
        uint2 const packed = *reinterpret_cast<uint2 const*>(w + (n0 + row) * (k / 2) + kBlockStart / 2);
        float const scale = fp8ToFloat(scales[(n0 + row) * (k / kScaleBlock) + kBlockStart / kScaleBlock]);
        uint32_t const words[2] = {packed.x, packed.y};
#pragma unroll
        for (int j = 0; j < kScaleBlock; ++j)
        {
            uint32_t const code = (words[j / 8] >> (4 * (j % 8))) & 0xF;
            out[j] = fromFloat<T>(fp4ToFloat(code) * scale);
        }
    }
}

template <typename T, int BM, int WM, int WN>
__global__ void __launch_bounds__(kThreads) fp4GemmDequantMma(T const* __restrict__ x,
    uint8_t const* __restrict__ w, uint8_t const* __restrict__ scales, float const* __restrict__ globalScale,
    T const* __restrict__ bias, T* __restrict__ y, int64_t m, int64_t n, int64_t k)
{
    static_assert((BM / WM) * (kBlockN / WN) == kWarps, "one warp tile per warp");
    constexpr int kFragsM = WM / kFragment;
    constexpr int kFragsN = WN / kFragment;
    __shared__ SharedTiles<T, BM> s;

    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * BM;
    int64_t const n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
    int const warp = threadIdx.x / 32;
    int const warpM = warp / (kBlockN / WN);
    int const warpN = warp % (kBlockN / WN);

    wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float> acc[kFragsM][kFragsN];
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
            wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t k0 = 0; k0 < k; k0 += kBlockK)
    {
        loadX<T, BM>(s, x, m, k, m0, k0);
        loadW<T, BM>(s, w, scales, n, k, n0, k0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBlockK; kk += kFragment)
        {
            wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major> a[kFragsM];
            wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::col_major> b[kFragsN];
#pragma unroll
            for (int i = 0; i < kFragsM; ++i)
                wmma::load_matrix_sync(a[i], &s.x[warpM * WM + i * kFragment][kk], kBlockK + kSmemPad);
#pragma unroll
            for (int j = 0; j < kFragsN; ++j)  // B[k][n] = W[n][k]: W's rows are B's columns
                wmma::load_matrix_sync(b[j], &s.w[warpN * WN + j * kFragment][kk], kBlockK + kSmemPad);
#pragma unroll
            for (int i = 0; i < kFragsM; ++i)
#pragma unroll
                for (int j = 0; j < kFragsN; ++j)
                    wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
            wmma::store_matrix_sync(&s.y[warpM * WM + i * kFragment][warpN * WN + j * kFragment], acc[i][j],
                kBlockN + 4, wmma::mem_row_major);
    __syncthreads();

    float const g = *globalScale;
    for (int i = threadIdx.x; i < BM * kBlockN; i += kThreads)
    {
        int const row = i / kBlockN;
        int const col = i % kBlockN;
        if (m0 + row >= m || n0 + col >= n)
            continue;
        float v = s.y[row][col] * g;
        if (bias != nullptr)
            v += static_cast<float>(bias[n0 + col]);
        y[(m0 + row) * n + n0 + col] = fromFloat<T>(v);
    }
}

template <typename T>
int launch(void const* x, uint8_t const* w, uint8_t const* scales, float const* g, void const* bias, void* y,
    int64_t m, int64_t n, int64_t k, cudaStream_t stream)
{
    auto const* xT = static_cast<T const*>(x);
    auto const* biasT = static_cast<T const*>(bias);
    auto* yT = static_cast<T*>(y);
    unsigned const gridN = static_cast<unsigned>((n + kBlockN - 1) / kBlockN);
    if (m <= kSmallM)
    {
        dim3 const grid(gridN, static_cast<unsigned>((m + 15) / 16));
        fp4GemmDequantMma<T, 16, 16, 16><<<grid, kThreads, 0, stream>>>(xT, w, scales, g, biasT, yT, m, n, k);
    }
    else
    {
        dim3 const grid(gridN, static_cast<unsigned>((m + 63) / 64));
        fp4GemmDequantMma<T, 64, 32, 32><<<grid, kThreads, 0, stream>>>(xT, w, scales, g, biasT, yT, m, n, k);
    }
    return static_cast<int>(cudaGetLastError());
}
} // namespace

extern "C" int fp4_gemm_run(int dtype, void const* x, uint8_t const* w_packed, uint8_t const* scales,
    float const* global_scale, void const* bias, void* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream)
{
    bool const shapesOk = m >= 0 && n > 0 && k > 0 && k % kScaleBlock == 0;
    bool const pointersOk = x != nullptr && w_packed != nullptr && scales != nullptr && global_scale != nullptr
        && y != nullptr;
    bool const gridOk = (m + 15) / 16 <= 65535;  // gridDim.y limit
    if (!shapesOk || !pointersOk || !gridOk)
        return FP4_GEMM_BAD_ARGUMENT;
    if (m == 0)
        return FP4_GEMM_OK;
    switch (dtype)
    {
    case FP4_GEMM_FLOAT16: return launch<__half>(x, w_packed, scales, global_scale, bias, y, m, n, k, stream);
    case FP4_GEMM_BFLOAT16:
        return launch<__nv_bfloat16>(x, w_packed, scales, global_scale, bias, y, m, n, k, stream);
    default: return FP4_GEMM_BAD_ARGUMENT;
    }
}

extern "C" char const* fp4_gemm_kernel_name(int64_t m)
{
    return m <= kSmallM ? "dequant_mma_bm16" : "dequant_mma_bm64";
}
