// Blackwell native block-scaled FP4 GEMM (sm_100a: tcgen05 block-scaled MMA; sm_120a: GeForce
// block-scaled MMA), from CUTLASS's collective builders (examples 72a and 79a of CUTLASS 4.2).
//
// This is the W4A4 (NVFP4 activations) form: Blackwell's FP4 tensor cores multiply FP4 by FP4, so X
// is first quantized to NVFP4 with its own global scale (onnxq's nvfp4 mode, TRT_FP4DynamicQuantize
// numbers), then
//     D = (g_x * g_w) * sum_k fp4(A) * sfA * fp4(B) * sfB
// with alpha = g_x * g_w applied in the epilogue (a device scalar). A W4A16 plugin node keeps the
// exact FP16 activations and uses the on-chip-dequantization kernel on every arch (fp4_gemm_kernels.cu).
//
// Layouts: A = X [M, K] K-major, B = W [N, K] K-major (CUTLASS's ColumnMajor B) packed two codes per
// byte low nibble first: onnxq's w_packed bytes as they are. Scale factors: CUTLASS wants them
// interleaved in 128 x 4 tiles (Sm1xxBlkScaledConfig); fp4_gemm_reorder_scales() writes onnxq's
// row-major [rows, K/16] FP8 scales into that layout, computed with CUTLASS's own layout object.
// UE4M3 (CUTLASS) and E4M3 (ONNX) scales have the same bits for the positive values onnxq writes.
//
// Instantiations (compile time): this file is compiled once per Blackwell family with
// FP4_GEMM_BLOCKSCALED_SM=100 (-arch sm_100a) or 120 (-arch sm_120a); each object holds one 1-SM tile
// per output type (float16, bfloat16) and exports fp4_gemm_blockscaled_*_sm100 / _sm120, which
// fp4_gemm_blockscaled_dispatch.cpp picks from by the device's compute capability.
#include "fp4_gemm_blockscaled.h"

#if !defined(FP4_GEMM_BLOCKSCALED_SM) || (FP4_GEMM_BLOCKSCALED_SM != 100 && FP4_GEMM_BLOCKSCALED_SM != 120)
#error "compile with -DFP4_GEMM_BLOCKSCALED_SM=100 (sm_100a) or 120 (sm_120a)"
#endif
#define FP4_GEMM_PASTE(name, sm) name##_sm##sm
#define FP4_GEMM_SUFFIXED(name, sm) FP4_GEMM_PASTE(name, sm)
#define FP4_GEMM_EXPORT(name) FP4_GEMM_SUFFIXED(name, FP4_GEMM_BLOCKSCALED_SM)

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

// a named namespace (nvcc's kernel stubs cannot tell an anonymous one from cute's under `using
// namespace cute`), one per family: both objects link into one library
#define FP4_BLOCKSCALED_NAMESPACE FP4_GEMM_EXPORT(fp4_blockscaled)
namespace FP4_BLOCKSCALED_NAMESPACE
{
using namespace cute;

constexpr int kAlignmentFp4 = 32;  // 16 bytes
constexpr int kScaleBlock = 16;

template <typename ArchTag, typename TileShape, typename ClusterShape, typename ElementD>
struct BlockScaledGemm
{
    using ElementAB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
    static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<ArchTag,
        cutlass::arch::OpClassBlockScaledTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, cutlass::layout::RowMajor,
        kAlignmentD, ElementD, cutlass::layout::RowMajor, kAlignmentD,
        cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<ArchTag,
        cutlass::arch::OpClassBlockScaledTensorOp, ElementAB, cutlass::layout::RowMajor, kAlignmentFp4, ElementAB,
        cutlass::layout::ColumnMajor, kAlignmentFp4, float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, void>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    using Config = typename Mainloop::Sm1xxBlkScaledConfig;
};

using OneSm = Shape<_1, _1, _1>;
#if FP4_GEMM_BLOCKSCALED_SM == 100
template <typename ElementD>
using ArchGemm = BlockScaledGemm<cutlass::arch::Sm100, Shape<_128, _128, _256>, OneSm, ElementD>;
#else
template <typename ElementD>
using ArchGemm = BlockScaledGemm<cutlass::arch::Sm120, Shape<_128, _128, _128>, OneSm, ElementD>;
#endif

__global__ void multiplyScalars(float const* a, float const* b, float* out)
{
    *out = *a * *b;
}

//! Row-major [rows, K/16] scales -> CUTLASS's interleaved layout (unwritten padding stays as memset).
template <typename Layout>
__global__ void reorderScales(uint8_t const* rowMajor, uint8_t* tiled, Layout layout, int rows, int kBlocks)
{
    int64_t const i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<int64_t>(rows) * kBlocks)
        return;
    int const row = static_cast<int>(i / kBlocks);
    int const block = static_cast<int>(i % kBlocks);
    tiled[layout(make_coord(row, block * kScaleBlock, 0))] = rowMajor[i];
}

template <typename G>
int sfLayoutBytes(int rows, int k, bool isA)
{
    auto const shape = make_shape(isA ? rows : 1, isA ? 1 : rows, k, 1);
    auto const layout = isA ? G::Config::tile_atom_to_shape_SFA(shape) : G::Config::tile_atom_to_shape_SFB(shape);
    return static_cast<int>(cute::cosize(filter_zeros(layout)));
}

template <typename G>
int reorder(uint8_t const* rowMajor, uint8_t* tiled, int rows, int k, bool isA, cudaStream_t stream)
{
    auto const shape = make_shape(isA ? rows : 1, isA ? 1 : rows, k, 1);
    int const bytes = sfLayoutBytes<G>(rows, k, isA);
    cudaMemsetAsync(tiled, 0, bytes, stream);
    int const total = rows * (k / kScaleBlock);
    int const threads = 256;
    if (isA)
        reorderScales<<<(total + threads - 1) / threads, threads, 0, stream>>>(
            rowMajor, tiled, G::Config::tile_atom_to_shape_SFA(shape), rows, k / kScaleBlock);
    else
        reorderScales<<<(total + threads - 1) / threads, threads, 0, stream>>>(
            rowMajor, tiled, G::Config::tile_atom_to_shape_SFB(shape), rows, k / kScaleBlock);
    return static_cast<int>(cudaGetLastError());
}

template <typename G>
int runGemm(Fp4BlockScaledProblem const& p, cudaStream_t stream)
{
    using Gemm = typename G::Gemm;
    using Element = typename G::ElementAB::DataType;
    using ScaleFactor = typename G::ElementAB::ScaleFactorType;
    using ElementD = typename Gemm::ElementD;
    int const m = static_cast<int>(p.m);
    int const n = static_cast<int>(p.n);
    int const k = static_cast<int>(p.k);
    auto const problem = make_shape(m, n, k, 1);
    auto const strideA = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideA{}, {m, k, 1});
    auto const strideB = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideB{}, {n, k, 1});
    auto const strideD = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideD{}, {m, n, 1});
    auto const layoutSFA = G::Config::tile_atom_to_shape_SFA(problem);
    auto const layoutSFB = G::Config::tile_atom_to_shape_SFB(problem);

    multiplyScalars<<<1, 1, 0, stream>>>(p.x_global_scale, p.w_global_scale, p.alpha_workspace);
    typename Gemm::Arguments arguments{cutlass::gemm::GemmUniversalMode::kGemm, problem,
        {static_cast<Element const*>(p.x_fp4), strideA, static_cast<Element const*>(p.w_fp4), strideB,
            static_cast<ScaleFactor const*>(p.x_scales_tiled), layoutSFA,
            static_cast<ScaleFactor const*>(p.w_scales_tiled), layoutSFB},
        {{1.0f, 0.0f}, static_cast<ElementD const*>(p.y), strideD, static_cast<ElementD*>(p.y), strideD}};
    arguments.epilogue.thread.alpha_ptr = p.alpha_workspace;

    Gemm gemm;
    if (gemm.can_implement(arguments) != cutlass::Status::kSuccess)
        return FP4_BLOCKSCALED_UNSUPPORTED;
    if (Gemm::get_workspace_size(arguments) > p.gemm_workspace_bytes)
        return FP4_BLOCKSCALED_WORKSPACE_TOO_SMALL;
    if (gemm.initialize(arguments, p.gemm_workspace, stream) != cutlass::Status::kSuccess)
        return FP4_BLOCKSCALED_UNSUPPORTED;
    if (gemm.run(stream) != cutlass::Status::kSuccess)
        return FP4_BLOCKSCALED_UNSUPPORTED;
    return static_cast<int>(cudaGetLastError());
}

template <template <typename> class G>
int dispatchDtype(Fp4BlockScaledProblem const& p, cudaStream_t stream)
{
    if (p.out_dtype == FP4_BLOCKSCALED_BFLOAT16)
        return runGemm<G<cutlass::bfloat16_t>>(p, stream);
    return runGemm<G<cutlass::half_t>>(p, stream);
}

} // namespace FP4_BLOCKSCALED_NAMESPACE

using namespace FP4_BLOCKSCALED_NAMESPACE;

extern "C" int FP4_GEMM_EXPORT(fp4_gemm_blockscaled_scale_bytes)(int64_t rows, int64_t k, int is_activation)
{
    return sfLayoutBytes<ArchGemm<cutlass::half_t>>(static_cast<int>(rows), static_cast<int>(k), is_activation != 0);
}

extern "C" int FP4_GEMM_EXPORT(fp4_gemm_blockscaled_reorder_scales)(
    uint8_t const* row_major, uint8_t* tiled, int64_t rows, int64_t k, int is_activation, cudaStream_t stream)
{
    return reorder<ArchGemm<cutlass::half_t>>(
        row_major, tiled, static_cast<int>(rows), static_cast<int>(k), is_activation != 0, stream);
}

extern "C" int FP4_GEMM_EXPORT(fp4_gemm_blockscaled_run)(Fp4BlockScaledProblem const* problem, cudaStream_t stream)
{
    return dispatchDtype<ArchGemm>(*problem, stream);
}
