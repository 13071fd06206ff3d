"""NVFP4: FP4 E2M1 values, one FP8 E4M3 scale per 16 consecutive values, one FP32 global scale.

Two-level scaling (NVIDIA Blackwell, TensorRT, ModelOpt):

- global scale ``g = amax / (6 * 448)`` over the whole tensor (from calibration for activations), so
  that the largest block scale lands on 448, the top of FP8 E4M3;
- block scale ``b = block_amax / (6 * g)``, rounded to FP8 E4M3 (ties to even), clamped to
  [2**-9, 448]: never 0 (TensorRT requires strictly positive scales, and ``x / 0`` is inf), and an
  all-zero block gets 2**-9 too (its codes are 0 whatever the scale);
- values ``q = fp4(x / (fp8(b) * g))``: divided by the scale *as deployed* (the FP8-rounded block
  scale times the global scale, computed in float32 exactly as the first DequantizeLinear computes
  it), rounded to E2M1 ties to even, saturated to +/-6. Dividing by the unrounded scale would give
  codes that the deployed scales do not reproduce.

Dequantization is the two chained standard DequantizeLinear: ``s = float32(fp8(b)) * g``, then
``w = float32(q) * s``, each a float32 product, so numpy and ``onnx.reference`` agree bit for bit.

Blocks run along ``axis`` (the reduction axis: 0 for a MatMul weight W[K, N], -1 for activations). A
length the block size does not divide ends in a shorter block, exactly as ONNX blocked Q/DQ reads
it; TensorRT wants whole blocks, so its emitter (``onnxq.graph.fp4_weights``) refuses such tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.formats.fp4_e2m1 import FLOAT4_E2M1FN, FP4_E2M1_MAX, saturate_to_fp4
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN, FP8_E4M3_MAX, FP8_E4M3_MIN_SUBNORMAL
from onnxq.formats.granularity import Granularity, block_reduce, block_size_problem
from onnxq.formats.int8 import channel_amax, normalize_axis, positive_scale

NVFP4_BLOCK_SIZE = 16
#: FLOAT4E2M1 QuantizeLinear/DequantizeLinear exist from opset 23, in models of IR version >= 11
NVFP4_MIN_OPSET = 23
NVFP4_MIN_IR_VERSION = 11
#: the global scale's divisor: the largest FP4 value times the largest FP8 E4M3 value
NVFP4_GLOBAL_DIVISOR = FP4_E2M1_MAX * FP8_E4M3_MAX


def nvfp4_global_scale(amax: np.ndarray | float) -> np.ndarray:
    """amax / (6 * 448): the block with the tensor's amax gets block scale 448, FP8's top. 1.0 if amax is 0."""
    return positive_scale(np.asarray(amax, dtype=np.float32) / np.float32(NVFP4_GLOBAL_DIVISOR))


def nvfp4_block_scale(block_amax: np.ndarray, global_scale: np.ndarray) -> np.ndarray:
    """block_amax / (6 * global): the unrounded scale that maps the block's amax onto 6, FP4's top."""
    return np.asarray(block_amax, np.float32) / (np.float32(FP4_E2M1_MAX) * np.float32(global_scale))


def round_block_scale(block_scale: np.ndarray) -> np.ndarray:
    """Block scales in FP8 E4M3 (ties to even), clamped to [2**-9, 448]: positive, finite, never 0."""
    clamped = np.clip(np.asarray(block_scale, np.float32), FP8_E4M3_MIN_SUBNORMAL, FP8_E4M3_MAX)
    # a block scale that rounds to 0 would be below 2**-10: the clamp already lifted it to 2**-9
    return clamped.astype(FLOAT8_E4M3FN)


def effective_scale(block_scales: np.ndarray, global_scale: np.ndarray) -> np.ndarray:
    """float32(fp8 block scale) * global: what the first DequantizeLinear outputs (one float32 product)."""
    return np.asarray(block_scales, FLOAT8_E4M3FN).astype(np.float32) * np.float32(global_scale)


@dataclass(frozen=True)
class Nvfp4Tensor:
    """One NVFP4 tensor: ``values`` (float4, the tensor's shape), ``block_scales`` (FP8 E4M3, the
    tensor's shape with ceil(D / block_size) along ``axis``), ``global_scale`` (float32, 0-d)."""

    values: np.ndarray
    block_scales: np.ndarray
    global_scale: np.ndarray
    axis: int
    block_size: int = NVFP4_BLOCK_SIZE

    @property
    def granularity(self) -> Granularity:
        return Granularity.block(self.axis, self.block_size)


def quantize_nvfp4(
    x: np.ndarray, axis: int, amax: float | None = None, block_size: int = NVFP4_BLOCK_SIZE
) -> Nvfp4Tensor:
    """NVFP4 of ``x`` with blocks along ``axis``; ``amax`` sets the global scale (default: max |x|).

    Cases: all-zero tensor (global 1.0, every block scale 2**-9, codes 0); values beyond a calibrated
    ``amax`` (block scale clamps to 448, values saturate to +/-6); NaN/inf in ``x`` (ValueError).
    """
    problem = block_size_problem(block_size)
    if problem:
        raise ValueError(problem)
    x = np.asarray(x, dtype=np.float32)
    axis = normalize_axis(axis, x.ndim)
    tensor_amax = channel_amax(x, None)  # refuses NaN/inf: FP4 has no code for them
    global_scale = nvfp4_global_scale(tensor_amax if amax is None else amax)
    granularity = Granularity.block(axis, block_size)
    block_scales = round_block_scale(nvfp4_block_scale(block_reduce(x, granularity), global_scale))
    scale = granularity.expand(effective_scale(block_scales, global_scale), x.shape)
    with np.errstate(over="ignore"):  # a value far beyond a calibrated amax overflows, then saturates
        values = saturate_to_fp4(x / scale)
    return Nvfp4Tensor(values, block_scales, np.asarray(global_scale, np.float32), axis, block_size)


def dequantize_nvfp4(q: Nvfp4Tensor) -> np.ndarray:
    """The two chained DequantizeLinear: ``s = fp8 * global``, then ``w = fp4 * s``, float32."""
    scale = q.granularity.expand(effective_scale(q.block_scales, q.global_scale), q.values.shape)
    return np.asarray(q.values, dtype=FLOAT4_E2M1FN).astype(np.float32) * scale


def fake_quantize_nvfp4(x: np.ndarray, axis: int, amax: float | None = None) -> np.ndarray:
    """Quantize then dequantize (same values a deployed NVFP4 tensor holds), float32."""
    return dequantize_nvfp4(quantize_nvfp4(x, axis, amax))
