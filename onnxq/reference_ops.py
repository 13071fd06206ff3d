"""numpy references of TensorRT's ``trt``-domain quantization ops, for ``onnx.reference``.

TensorRT's ``DynamicQuantize`` layer (TensorRT operator docs, "DynamicQuantize"; parser importers of
``TRT_FP4DynamicQuantize`` / ``TRT_MXFP8DynamicQuantize``) quantizes a float32/float16/bfloat16
tensor of rank 2 or 3 block by block along one axis (the last or the second to last; the extent
static and a multiple of the block), and outputs the quantized data and the computed block scales:

- NVFP4: block size 16, output FP4 E2M1, scales FP8 E4M3, quantized with the scalar *double
  quantization scale* (the FP32 global scale ``g``, a build-time constant). TensorRT's docs do not
  spell the arithmetic out; onnxq follows NVIDIA's recipe as :mod:`onnxq.formats.nvfp4` writes it:
  block scale ``fp8(clip(block_amax / (6 * g), 2**-9, 448))``, values ``fp4(x / (fp8(b) * g))``,
  ties to even, saturated to +/-6.
- MXFP8: block size 32, output FP8 E4M3, scales E8M0 (a power of two; ``UINT8`` bits in ONNX), no
  double quantization scale. TensorRT's docs: "the quantization and dequantization formulas are
  identical to the FP8 scheme" (``castToFp8(clip(x / s, -448, 448))``, ties to even). The block
  scale follows the OCP MX rule (:mod:`onnxq.formats.mxfp8`): ``2**(floor(log2(amax)) - 8)``.
- ``TRT_MXFP8DequantizeLinear(x_fp8, scale_uint8)``: ``float32(x) * 2**(scale - 127)`` per block,
  cast to ``output_dtype`` (float32 when absent, as TensorRT's parser defaults for MX).

Cases: any axis (TensorRT restricts it to the last two: these references do not), float16/bfloat16
inputs (computed in float32, exact widening), all-zero blocks (NVFP4 scale 2**-9, MXFP8 scale 1.0),
values beyond the calibrated amax (NVFP4 block scale clamps to 448, values saturate to +/-6; MXFP8
values saturate to +/-448). A block size other than TensorRT's (16 / 32) is a ValueError, as
TensorRT's parser refuses it. NaN inputs have no defined result here (FP4 has no NaN code).

:func:`reference_evaluator` builds a ``ReferenceEvaluator`` with these ops registered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnxq.formats.e8m0 import FLOAT8_E8M0FNU
from onnxq.formats.fp4_e2m1 import saturate_to_fp4
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN, saturate_to_fp8
from onnxq.formats.granularity import Granularity, block_reduce
from onnxq.formats.int8 import normalize_axis
from onnxq.formats.mxfp8 import MXFP8_BLOCK_SIZE, mxfp8_block_scales
from onnxq.formats.nvfp4 import NVFP4_BLOCK_SIZE, effective_scale, nvfp4_block_scale, round_block_scale

TRT_DOMAIN = "trt"
#: TensorRT's parser: axis defaults to 1 for TRT_FP4DynamicQuantize, to -1 for the MXFP8 ops
FP4_DEFAULT_AXIS = 1
MXFP8_DEFAULT_AXIS = -1
FLOAT8E4M3FN_ONNX = onnx.TensorProto.FLOAT8E4M3FN


def _check(op: str, name: str, value: int, expected: int) -> None:
    if value != expected:
        raise ValueError(f"{op}: TensorRT supports {name}={expected} only, got {value}")


def _blocks(x: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, Granularity, int]:
    """``x`` as float32, the block granularity along ``axis`` (normalized), and that axis."""
    x32 = np.asarray(x).astype(np.float32)
    axis = normalize_axis(axis, x32.ndim)
    if x32.shape[axis] % block_size:
        raise ValueError(
            f"axis {axis} of length {x32.shape[axis]} is not a multiple of the block {block_size}"
        )
    return x32, Granularity.block(axis, block_size), axis


def quantize_fp4_dynamic(
    x: np.ndarray, global_scale: np.ndarray, axis: int = -1, block_size: int = NVFP4_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4 of ``x`` with the given global scale: (FP4 values, FP8 E4M3 block scales)."""
    x32, granularity, _ = _blocks(x, axis, block_size)
    g = np.float32(np.asarray(global_scale, np.float32).reshape(()))
    with np.errstate(over="ignore"):  # far beyond the calibrated amax: overflow to inf, then clamped
        block_scales = round_block_scale(nvfp4_block_scale(block_reduce(x32, granularity), g))
        scale = granularity.expand(effective_scale(block_scales, g), x32.shape)
        return saturate_to_fp4(x32 / scale), block_scales


def quantize_mxfp8_dynamic(
    x: np.ndarray, axis: int = -1, block_size: int = MXFP8_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """MXFP8 of ``x`` (OCP rule): (FP8 E4M3 values, E8M0 scale codes as uint8)."""
    x32, granularity, _ = _blocks(x, axis, block_size)
    scales = mxfp8_block_scales(block_reduce(x32, granularity), "ocp")
    values = saturate_to_fp8(x32 / granularity.expand(scales.astype(np.float32), x32.shape))
    return values, scales.view(np.uint8)


def dequantize_mxfp8_codes(
    values: np.ndarray, scale_codes: np.ndarray, axis: int = -1, block_size: int = MXFP8_BLOCK_SIZE
) -> np.ndarray:
    """``float32(values) * 2**(code - 127)`` per block, float32 (code 255 is NaN, as E8M0 says)."""
    values32 = np.asarray(values, FLOAT8_E4M3FN).astype(np.float32)
    axis = normalize_axis(axis, values32.ndim)
    scale = np.asarray(scale_codes, np.uint8).view(FLOAT8_E8M0FNU).astype(np.float32)
    return values32 * Granularity.block(axis, block_size).expand(scale, values32.shape)


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the op's name in the model)
    op_domain = TRT_DOMAIN

    def _run(
        self,
        x: np.ndarray,
        global_scale: np.ndarray,
        axis: int = FP4_DEFAULT_AXIS,
        block_size: int = NVFP4_BLOCK_SIZE,
        scale_type: int = FLOAT8E4M3FN_ONNX,
    ) -> tuple[np.ndarray, np.ndarray]:
        _check("TRT_FP4DynamicQuantize", "block_size", block_size, NVFP4_BLOCK_SIZE)
        _check("TRT_FP4DynamicQuantize", "scale_type", scale_type, FLOAT8E4M3FN_ONNX)
        return quantize_fp4_dynamic(x, global_scale, axis, block_size)


class TRT_MXFP8DynamicQuantize(OpRun):  # noqa: N801
    op_domain = TRT_DOMAIN

    def _run(
        self,
        x: np.ndarray,
        axis: int = MXFP8_DEFAULT_AXIS,
        block_size: int = MXFP8_BLOCK_SIZE,
        output_dtype: int = FLOAT8E4M3FN_ONNX,
    ) -> tuple[np.ndarray, np.ndarray]:
        _check("TRT_MXFP8DynamicQuantize", "block_size", block_size, MXFP8_BLOCK_SIZE)
        _check("TRT_MXFP8DynamicQuantize", "output_dtype", output_dtype, FLOAT8E4M3FN_ONNX)
        return quantize_mxfp8_dynamic(x, axis, block_size)


class TRT_MXFP8DequantizeLinear(OpRun):  # noqa: N801
    op_domain = TRT_DOMAIN

    def _run(
        self,
        x: np.ndarray,
        scale: np.ndarray,
        axis: int = MXFP8_DEFAULT_AXIS,
        block_size: int = MXFP8_BLOCK_SIZE,
        output_dtype: int = onnx.TensorProto.FLOAT,
    ) -> tuple[np.ndarray]:
        _check("TRT_MXFP8DequantizeLinear", "block_size", block_size, MXFP8_BLOCK_SIZE)
        out_type = onnx.helper.tensor_dtype_to_np_dtype(output_dtype)
        return (dequantize_mxfp8_codes(x, scale, axis, block_size).astype(out_type),)


TRT_REFERENCE_OPS: tuple[type[OpRun], ...] = (
    TRT_FP4DynamicQuantize,
    TRT_MXFP8DynamicQuantize,
    TRT_MXFP8DequantizeLinear,
)


def reference_evaluator(model: Any, **kwargs: Any) -> ReferenceEvaluator:
    """``ReferenceEvaluator`` on ``model`` (ModelProto, onnx_ir Model, bytes or path) with the trt ops."""
    if hasattr(model, "graph") and not isinstance(model, onnx.ModelProto):
        import onnx_ir as ir

        model = ir.serde.serialize_model(model)
    from onnxq.plugins.fp4_gemm import Fp4GemmPlugin  # onnxq.plugins imports this module's package

    return ReferenceEvaluator(model, new_ops=[*TRT_REFERENCE_OPS, Fp4GemmPlugin], **kwargs)
