// Host-side dispatch of the Blackwell block-scaled FP4 GEMM: checks arguments and picks the sm_100 or
// sm_120 object (fp4_gemm_blockscaled.cu, compiled once per family) by the device's compute capability.
#include "fp4_gemm_blockscaled.h"

namespace
{
constexpr int64_t kScaleBlock = 16;
constexpr int64_t kKAlignment = 32;  // 16 bytes of FP4
constexpr int64_t kNAlignment = 8;   // 16 bytes of float16/bfloat16 output

int deviceArch()
{
    int device = 0;
    int major = 0;
    int minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess)
        return 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return major * 10 + minor;
}

bool isSm100(int arch)
{
    return arch == 100 || arch == 103;
}

bool isSm120(int arch)
{
    return arch == 120 || arch == 121;
}
} // namespace

extern "C" {
int fp4_gemm_blockscaled_scale_bytes_sm100(int64_t rows, int64_t k, int is_activation);
int fp4_gemm_blockscaled_scale_bytes_sm120(int64_t rows, int64_t k, int is_activation);
int fp4_gemm_blockscaled_reorder_scales_sm100(uint8_t const*, uint8_t*, int64_t, int64_t, int, cudaStream_t);
int fp4_gemm_blockscaled_reorder_scales_sm120(uint8_t const*, uint8_t*, int64_t, int64_t, int, cudaStream_t);
int fp4_gemm_blockscaled_run_sm100(Fp4BlockScaledProblem const*, cudaStream_t);
int fp4_gemm_blockscaled_run_sm120(Fp4BlockScaledProblem const*, cudaStream_t);

int fp4_gemm_blockscaled_arch_supported()
{
    int const arch = deviceArch();
    return isSm100(arch) || isSm120(arch);
}

int fp4_gemm_blockscaled_scale_bytes(int64_t rows, int64_t k, int is_activation)
{
    int const arch = deviceArch();
    if (isSm100(arch))
        return fp4_gemm_blockscaled_scale_bytes_sm100(rows, k, is_activation);
    if (isSm120(arch))
        return fp4_gemm_blockscaled_scale_bytes_sm120(rows, k, is_activation);
    return FP4_BLOCKSCALED_UNSUPPORTED;
}

int fp4_gemm_blockscaled_reorder_scales(
    uint8_t const* row_major, uint8_t* tiled, int64_t rows, int64_t k, int is_activation, cudaStream_t stream)
{
    if (row_major == nullptr || tiled == nullptr || rows <= 0 || k <= 0 || k % kScaleBlock != 0)
        return FP4_BLOCKSCALED_BAD_ARGUMENT;
    int const arch = deviceArch();
    if (isSm100(arch))
        return fp4_gemm_blockscaled_reorder_scales_sm100(row_major, tiled, rows, k, is_activation, stream);
    if (isSm120(arch))
        return fp4_gemm_blockscaled_reorder_scales_sm120(row_major, tiled, rows, k, is_activation, stream);
    return FP4_BLOCKSCALED_UNSUPPORTED;
}

int fp4_gemm_blockscaled_run(Fp4BlockScaledProblem const* problem, cudaStream_t stream)
{
    if (problem == nullptr || problem->m <= 0 || problem->n <= 0 || problem->k <= 0
        || problem->k % kKAlignment != 0 || problem->n % kNAlignment != 0)
        return FP4_BLOCKSCALED_BAD_ARGUMENT;
    int const arch = deviceArch();
    if (isSm100(arch))
        return fp4_gemm_blockscaled_run_sm100(problem, stream);
    if (isSm120(arch))
        return fp4_gemm_blockscaled_run_sm120(problem, stream);
    return FP4_BLOCKSCALED_UNSUPPORTED;
}
}
