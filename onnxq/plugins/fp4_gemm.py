"""numpy reference of the FP4 GEMM plugin op, and the same op for ``onnx.reference``.

``Y = X @ dequant(W, S, g)^T (+ bias)``:

- ``w_packed`` uint8 [N, K / 2]: FP4 E2M1 codes of W[N, K], two per byte, element ``2i`` of a row in
  the low nibble (ONNX's FLOAT4E2M1 packing, row by row);
- ``scales_fp8`` FLOAT8E4M3FN [N, K / 16] (or their uint8 bit patterns): one scale per 16 values of K;
- ``global_scale`` float32, one value;
- ``dequant[n, k] = float32(fp4) * (float32(fp8) * g)``: the same two float32 products as onnxq's two
  chained DequantizeLinear (:func:`onnxq.formats.nvfp4.dequantize_nvfp4`), so the weights match it
  bit for bit;
- the product accumulates in float32 (what the kernels do: FP32 accumulators), the optional bias [N]
  is added in float32, and Y is rounded once to X's type (float16, bfloat16, or float32 for tests).

Cases: X of rank >= 1 (the product runs over the last axis), X in float16/bfloat16/float32, bias
absent or [N], K a multiple of 16 (shorter scales are a ValueError, as are odd shapes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx.reference.op_run import OpRun

from onnxq.formats.fp4_e2m1 import pack_fp4, unpack_fp4
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN
from onnxq.formats.nvfp4 import NVFP4_BLOCK_SIZE
from onnxq.plugins.description import fp4_gemm_description

_DESCRIPTION = fp4_gemm_description()


def pack_fp4_weight(values_nk: np.ndarray) -> np.ndarray:
    """Float4 W[N, K] (ml_dtypes float4_e2m1fn) -> uint8 [N, K / 2], each row packed low nibble first."""
    values_nk = np.asarray(values_nk)
    n, k = values_nk.shape
    if k % 2:
        raise ValueError(f"K = {k} must be even to pack two FP4 codes per byte")
    return pack_fp4(np.ascontiguousarray(values_nk)).reshape(n, k // 2)


def dequantize_fp4_weight(
    w_packed: np.ndarray, scales_fp8: np.ndarray, global_scale: np.ndarray | float | np.floating[Any]
) -> np.ndarray:
    """W[N, K] in float32: ``float32(fp4) * (float32(fp8 scale) * g)``, one scale per 16 values of K."""
    w_packed = np.asarray(w_packed, np.uint8)
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    scales32 = _scales_as_float32(scales_fp8)
    if scales32.shape != (n, k // NVFP4_BLOCK_SIZE) or k % NVFP4_BLOCK_SIZE:
        raise ValueError(f"scales {scales32.shape} must be [N, K / 16] = [{n}, {k / NVFP4_BLOCK_SIZE}]")
    g = np.float32(np.asarray(global_scale, np.float32).reshape(()))
    scale = np.repeat(scales32 * g, NVFP4_BLOCK_SIZE, axis=1)
    return unpack_fp4(w_packed, (n, k)).astype(np.float32) * scale


def fp4_gemm_reference(
    x: np.ndarray,
    w_packed: np.ndarray,
    scales_fp8: np.ndarray,
    global_scale: np.ndarray | float | np.floating[Any],
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """``x @ dequant(w)^T (+ bias)``, accumulated in float32, returned in x's type."""
    x = np.asarray(x)
    weight = dequantize_fp4_weight(w_packed, scales_fp8, global_scale)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last axis {x.shape[-1]} differs from K = {weight.shape[1]}")
    y = np.matmul(x.astype(np.float32), weight.T)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float32).reshape(-1)
    return y.astype(x.dtype)


def _scales_as_float32(scales: np.ndarray) -> np.ndarray:
    scales = np.asarray(scales)
    if scales.dtype == np.uint8:  # FP8 bit patterns (what ONNX Runtime hands back for FP8 tensors)
        scales = scales.view(FLOAT8_E4M3FN)
    return scales.astype(FLOAT8_E4M3FN).astype(np.float32)


class Fp4GemmPlugin(OpRun):
    """The plugin node for ``onnx.reference.ReferenceEvaluator(model, new_ops=[Fp4GemmPlugin])``."""

    op_domain = _DESCRIPTION.onnx_domain

    def _run(self, x: np.ndarray, w_packed: np.ndarray, scales: np.ndarray, global_scale: np.ndarray,
             bias: np.ndarray | None = None, **attributes: Any) -> tuple[np.ndarray]:  # fmt: skip
        block_size = attributes.get("block_size") or _DESCRIPTION.block_size
        if block_size != NVFP4_BLOCK_SIZE:
            raise ValueError(f"{_DESCRIPTION.name}: block_size must be {NVFP4_BLOCK_SIZE}, got {block_size}")
        return (fp4_gemm_reference(x, w_packed, scales, global_scale, bias),)


assert Fp4GemmPlugin.__name__ == _DESCRIPTION.name, "the op class must carry the plugin's ONNX op_type"
