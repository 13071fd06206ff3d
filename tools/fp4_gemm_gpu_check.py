"""FP4 GEMM kernels on an NVIDIA GPU: correctness against onnxq's numpy reference, and throughput.

Called by tools/gpu_check.sh with the built libfp4_gemm_kernels.so. Needs torch with CUDA (device
memory, timing, and cuBLAS FP16 as the baseline).

Correctness: each kernel (on-chip dequantization for float16 and bfloat16, with and without bias,
shapes with M, N, K off the tiles; the Blackwell block-scaled W4A4 kernel where the GPU has it) against
:func:`onnxq.plugins.fp4_gemm_reference` (W4A4: activations quantized by onnxq's NVFP4 dynamic-quantize
reference first). Metric: max |y - ref| / max |ref|; a case above its tolerance fails the run.

Throughput: M = 1, 16, 128, 4096 at N = K = 4096 and 8192: weight-streaming GB/s against the GPU's
peak bandwidth (a table by name, else a measured device copy) and TFLOP/s against torch's FP16 matmul.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN
from onnxq.formats.nvfp4 import nvfp4_global_scale, quantize_nvfp4
from onnxq.plugins import fp4_gemm_reference, pack_fp4_weight
from onnxq.reference_ops import quantize_fp4_dynamic

FLOAT16, BFLOAT16 = 0, 1
#: max |y - ref| / max |ref|: two rounding steps of the output type (float32 accumulation order aside)
TOLERANCE = {FLOAT16: 2 * 2.0**-10, BFLOAT16: 2 * 2.0**-7}
TORCH_TYPES = {FLOAT16: torch.float16, BFLOAT16: torch.bfloat16}
NUMPY_TYPES = {FLOAT16: np.float16, BFLOAT16: ml_dtypes.bfloat16}
CORRECTNESS_SHAPES = ((1, 256, 512), (7, 200, 272), (16, 4096, 4096), (33, 96, 64), (130, 520, 1024))
BLOCKSCALED_SHAPES = ((1, 256, 512), (128, 512, 1024), (300, 1024, 2048))
THROUGHPUT_M = (1, 16, 128, 4096)
THROUGHPUT_NK = (4096, 8192)
#: peak DRAM bandwidth, GB/s, by a substring of torch's device name (vendor data sheets)
PEAK_BANDWIDTH = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350,
                  "B200": 8000, "B100": 8000, "GB200": 8000, "L40S": 864, "L40": 864, "L4": 300,
                  "RTX 6000 Ada": 960, "RTX 4090": 1008, "RTX 5090": 1792, "RTX PRO 6000": 1792}  # fmt: skip
WARMUP, ITERATIONS = 5, 30


class Fp4BlockScaledProblem(ctypes.Structure):
    _fields_ = [
        ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("out_dtype", ctypes.c_int),
        ("x_fp4", ctypes.c_void_p), ("w_fp4", ctypes.c_void_p), ("x_scales_tiled", ctypes.c_void_p),
        ("w_scales_tiled", ctypes.c_void_p), ("x_global_scale", ctypes.c_void_p),
        ("w_global_scale", ctypes.c_void_p), ("alpha_workspace", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("gemm_workspace", ctypes.c_void_p), ("gemm_workspace_bytes", ctypes.c_size_t),
    ]  # fmt: skip


@dataclass
class Weight:
    packed: np.ndarray
    scales: np.ndarray
    global_scale: np.float32


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.fp4_gemm_run.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 6, *[ctypes.c_int64] * 3, ctypes.c_void_p]
    lib.fp4_gemm_run.restype = ctypes.c_int
    lib.fp4_gemm_kernel_name.argtypes = [ctypes.c_int64]
    lib.fp4_gemm_kernel_name.restype = ctypes.c_char_p
    if hasattr(lib, "fp4_gemm_blockscaled_run"):
        lib.fp4_gemm_blockscaled_run.argtypes = [ctypes.POINTER(Fp4BlockScaledProblem), ctypes.c_void_p]
        lib.fp4_gemm_blockscaled_reorder_scales.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.fp4_gemm_blockscaled_scale_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def random_weight(rng: np.random.Generator, n: int, k: int) -> Weight:
    q = quantize_nvfp4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, axis=1)
    return Weight(
        pack_fp4_weight(q.values), np.asarray(q.block_scales, FLOAT8_E4M3FN), np.float32(q.global_scale)
    )


def to_device(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).cuda()
    if array.dtype == FLOAT8_E4M3FN:
        return torch.from_numpy(array.view(np.uint8).copy()).cuda()
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


def to_host(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return tensor.cpu().numpy()


def run_dequant(
    lib: ctypes.CDLL,
    dtype: int,
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
    y: torch.Tensor,
) -> None:
    m, k = x.shape
    status = lib.fp4_gemm_run(
        dtype, x.data_ptr(), w["packed"].data_ptr(), w["scales"].data_ptr(), w["g"].data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), m, y.shape[1], k,
        torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"fp4_gemm_run returned {status}")


def device_weight(weight: Weight) -> dict[str, torch.Tensor]:
    return {
        "packed": to_device(weight.packed), "scales": to_device(weight.scales),
        "g": torch.tensor([weight.global_scale], dtype=torch.float32, device="cuda"),
    }  # fmt: skip


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    expected32 = expected.astype(np.float32)
    return float(np.abs(actual.astype(np.float32) - expected32).max() / max(np.abs(expected32).max(), 1e-30))


def check_dequant(lib: ctypes.CDLL, rng: np.random.Generator) -> list[tuple[str, float, float]]:
    rows = []
    for dtype in (FLOAT16, BFLOAT16):
        for m, n, k in CORRECTNESS_SHAPES:
            for with_bias in (False, True):
                weight = random_weight(rng, n, k)
                x = rng.standard_normal((m, k)).astype(NUMPY_TYPES[dtype])
                bias = rng.standard_normal(n).astype(NUMPY_TYPES[dtype]) if with_bias else None
                y = torch.empty((m, n), dtype=TORCH_TYPES[dtype], device="cuda")
                run_dequant(
                    lib,
                    dtype,
                    to_device(x),
                    device_weight(weight),
                    None if bias is None else to_device(bias),
                    y,
                )
                torch.cuda.synchronize()
                expected = fp4_gemm_reference(x, weight.packed, weight.scales, weight.global_scale, bias)
                name = f"{lib.fp4_gemm_kernel_name(m).decode()} {'bf16' if dtype else 'fp16'} M={m} N={n} K={k}{' +bias' if with_bias else ''}"
                rows.append((name, relative_error(to_host(y), expected), TOLERANCE[dtype]))
    return rows


def blockscaled_inputs(
    lib: ctypes.CDLL,
    rng: np.random.Generator,
    m: int,
    k: int,
    dtype: int,
    weight: Weight,
    reference: bool = True,
) -> tuple[Fp4BlockScaledProblem, dict[str, torch.Tensor], np.ndarray | None]:
    """Device buffers of one W4A4 problem and (when asked) its numpy reference output."""
    n = weight.packed.shape[0]
    x = rng.standard_normal((m, k)).astype(np.float32)
    gx = nvfp4_global_scale(np.abs(x).max())
    x_values, x_scales = quantize_fp4_dynamic(x, gx, axis=-1)
    expected = None
    if reference:
        x_scale = np.repeat(x_scales.astype(np.float32) * np.float32(gx), 16, axis=1)
        x_dequant = x_values.astype(np.float32) * x_scale
        expected = fp4_gemm_reference(x_dequant, weight.packed, weight.scales, weight.global_scale)
        expected = expected.astype(NUMPY_TYPES[dtype])
    stream = torch.cuda.current_stream().cuda_stream
    buffers = {"x": to_device(pack_fp4_weight(x_values)), "w": to_device(weight.packed)}
    for name, rows, scales, is_activation in (("sx", m, x_scales, 1), ("sw", n, weight.scales, 0)):
        size = lib.fp4_gemm_blockscaled_scale_bytes(rows, k, is_activation)
        buffers[name] = torch.empty(size, dtype=torch.uint8, device="cuda")
        row_major = to_device(np.asarray(scales, FLOAT8_E4M3FN))
        status = lib.fp4_gemm_blockscaled_reorder_scales(
            row_major.data_ptr(), buffers[name].data_ptr(), rows, k, is_activation, stream
        )
        if status != 0:
            raise RuntimeError(f"fp4_gemm_blockscaled_reorder_scales returned {status}")
        torch.cuda.synchronize()
    buffers["gx"] = torch.tensor([gx], dtype=torch.float32, device="cuda")
    buffers["gw"] = torch.tensor([weight.global_scale], dtype=torch.float32, device="cuda")
    buffers["alpha"] = torch.empty(1, dtype=torch.float32, device="cuda")
    buffers["y"] = torch.empty((m, n), dtype=TORCH_TYPES[dtype], device="cuda")
    buffers["workspace"] = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    problem = Fp4BlockScaledProblem(
        m, n, k, dtype, buffers["x"].data_ptr(), buffers["w"].data_ptr(), buffers["sx"].data_ptr(),
        buffers["sw"].data_ptr(), buffers["gx"].data_ptr(), buffers["gw"].data_ptr(), buffers["alpha"].data_ptr(),
        buffers["y"].data_ptr(), buffers["workspace"].data_ptr(), buffers["workspace"].numel(),
    )  # fmt: skip
    return problem, buffers, expected


def run_blockscaled(lib: ctypes.CDLL, problem: Fp4BlockScaledProblem) -> None:
    status = lib.fp4_gemm_blockscaled_run(ctypes.byref(problem), torch.cuda.current_stream().cuda_stream)
    if status != 0:
        raise RuntimeError(f"fp4_gemm_blockscaled_run returned {status}")


def check_blockscaled(lib: ctypes.CDLL, rng: np.random.Generator) -> list[tuple[str, float, float]]:
    rows = []
    for dtype in (FLOAT16, BFLOAT16):
        for m, n, k in BLOCKSCALED_SHAPES:
            weight = random_weight(rng, n, k)
            problem, buffers, expected = blockscaled_inputs(lib, rng, m, k, dtype, weight)
            assert expected is not None
            run_blockscaled(lib, problem)
            torch.cuda.synchronize()
            name = f"blockscaled W4A4 {'bf16' if dtype else 'fp16'} M={m} N={n} K={k}"
            rows.append((name, relative_error(to_host(buffers["y"]), expected), TOLERANCE[dtype]))
    return rows


def time_ms(function: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERATIONS):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ITERATIONS


def peak_bandwidth() -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return float(value), f"{name} data sheet"
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source))
    return 2 * source.numel() / ms / 1e6, f"{name}, measured device copy"


def throughput(lib: ctypes.CDLL, rng: np.random.Generator, blockscaled: bool) -> list[str]:
    bandwidth, source = peak_bandwidth()
    lines = [f"peak bandwidth {bandwidth:.0f} GB/s ({source})", "",
             "| kernel | M | N=K | ms | weight+act GB/s | % of peak BW | TFLOP/s | cuBLAS FP16 TFLOP/s | vs cuBLAS |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for nk in THROUGHPUT_NK:
        host_weight = random_weight(rng, nk, nk)
        weight = device_weight(host_weight)
        w16 = torch.randn((nk, nk), dtype=torch.float16, device="cuda")
        for m in THROUGHPUT_M:
            x = torch.randn((m, nk), dtype=torch.float16, device="cuda")
            y = torch.empty((m, nk), dtype=torch.float16, device="cuda")
            flop = 2.0 * m * nk * nk
            cublas_ms = time_ms(lambda: torch.matmul(x, w16.t()))  # noqa: B023
            ms = time_ms(lambda: run_dequant(lib, FLOAT16, x, weight, None, y))  # noqa: B023
            moved = nk * nk / 2 + nk * nk / 16 + 2 * m * nk * 2
            lines.append(
                _row(lib.fp4_gemm_kernel_name(m).decode(), m, nk, ms, moved, bandwidth, flop, cublas_ms)
            )
            if blockscaled and nk % 32 == 0:
                problem, _buffers, _ = blockscaled_inputs(
                    lib, rng, m, nk, FLOAT16, host_weight, reference=False
                )
                ms = time_ms(lambda: run_blockscaled(lib, problem))  # noqa: B023
                moved = nk * nk / 2 + nk * nk / 16 + m * nk / 2 + 2 * m * nk
                lines.append(_row("blockscaled W4A4", m, nk, ms, moved, bandwidth, flop, cublas_ms))
    return lines


def _row(
    kernel: str, m: int, nk: int, ms: float, moved: float, bandwidth: float, flop: float, cublas_ms: float
) -> str:
    gbs = moved / ms / 1e6
    return (f"| {kernel} | {m} | {nk} | {ms:.4f} | {gbs:.0f} | {100 * gbs / bandwidth:.0f}% | "
            f"{flop / ms / 1e9:.1f} | {flop / cublas_ms / 1e9:.1f} | {cublas_ms / ms:.2f}x |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, required=True, help="libfp4_gemm_kernels.so")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    lib = load(args.lib)
    rng = np.random.default_rng(0)
    blockscaled = hasattr(lib, "fp4_gemm_blockscaled_arch_supported") and bool(
        lib.fp4_gemm_blockscaled_arch_supported()
    )
    rows = check_dequant(lib, rng) + (check_blockscaled(lib, rng) if blockscaled else [])
    print(
        f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    )
    print("block-scaled FP4 kernel:", "checked" if blockscaled else "not on this GPU (Blackwell only)")
    print("\n| case | max rel. error | tolerance | result |\n|---|---|---|---|")
    failed = 0
    for name, error, tolerance in rows:
        ok = error <= tolerance
        failed += not ok
        print(f"| {name} | {error:.2e} | {tolerance:.1e} | {'ok' if ok else 'FAIL'} |")
    if not args.skip_throughput:
        print()
        print("\n".join(throughput(lib, rng, blockscaled)))
    print(f"\n{len(rows) - failed} of {len(rows)} correctness cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
