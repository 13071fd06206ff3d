"""MXFP8 (OCP Microscaling): FP8 E4M3 values, one E8M0 power-of-two scale per 32 consecutive values.

Block scale ``2**(floor(log2(block_amax)) - 8)`` (OCP MX rule, see :mod:`onnxq.formats.e8m0`; 8 is
E4M3's top exponent, 448 = 1.75 * 2**8). Values ``fp8(x / scale)``: dividing by a power of two is exact,
then round half to even onto E4M3 and saturate to +/-448 (a block's scaled amax lies in [256, 512), so
values above 448 clip, as the spec accepts). ``rule="round_up"`` takes NVIDIA's recipe instead,
``2**ceil(log2(block_amax / 448))``: nothing clips, and it measured 0.9-2.2 dB better on random weights.

ONNX form: ``DequantizeLinear(values_fp8, scales_e8m0, axis, block_size=32, output_dtype=FLOAT)``,
opset 24 (the first with FLOAT8E8M0 scales); the checker rejects it without ``output_dtype``, since the
output type would otherwise be the scale's type. ``fp8 * 2**e`` is exact in float32 (unless it falls
below float32's normal range), so the dequantized values do not depend on the order of operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxq.formats.e8m0 import (
    FLOAT8_E8M0FNU,
    e8m0_from_exponent,
    e8m0_to_float32,
    mx_scale,
    mx_shared_exponent_round_up,
)
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN, FP8_E4M3_MAX, saturate_to_fp8
from onnxq.formats.granularity import Granularity, block_reduce, block_size_problem
from onnxq.formats.int8 import channel_amax, normalize_axis

MXFP8_BLOCK_SIZE = 32
#: DequantizeLinear takes FLOAT8E8M0 scales (with ``output_dtype``) from opset 24
MXFP8_MIN_OPSET = 24
#: exponent of E4M3's largest value, 448 = 1.75 * 2**8 (``emax_elem`` in the OCP MX spec)
FP8_E4M3_EMAX = 8
#: "ocp": the spec's floor rule (default); "round_up": NVIDIA's recipe, no element saturates
ScaleRule = Literal["ocp", "round_up"]


@dataclass(frozen=True)
class Mxfp8Tensor:
    """``values`` (FP8 E4M3, the tensor's shape) and ``scales`` (E8M0, ceil(D / block_size) along ``axis``)."""

    values: np.ndarray
    scales: np.ndarray
    axis: int
    block_size: int = MXFP8_BLOCK_SIZE

    @property
    def granularity(self) -> Granularity:
        return Granularity.block(self.axis, self.block_size)


def mxfp8_block_scales(block_amax: np.ndarray, rule: ScaleRule = "ocp") -> np.ndarray:
    """E8M0 block scales. "ocp": 2**(floor(log2(amax)) - 8), each block's amax lands in E4M3's top
    binade [256, 512); "round_up": 2**ceil(log2(amax / 448)), amax lands in (224, 448], never clipped."""
    if rule == "round_up":
        return e8m0_from_exponent(mx_shared_exponent_round_up(block_amax, FP8_E4M3_MAX))
    if rule != "ocp":
        raise ValueError(f"unknown MX scale rule {rule!r}, expected 'ocp' or 'round_up'")
    return mx_scale(block_amax, FP8_E4M3_EMAX)


def quantize_mxfp8(
    x: np.ndarray, axis: int, block_size: int = MXFP8_BLOCK_SIZE, rule: ScaleRule = "ocp"
) -> Mxfp8Tensor:
    """MXFP8 of ``x`` with blocks along ``axis``, block scales by ``rule`` (see :func:`mxfp8_block_scales`).

    Cases: all-zero block (scale 1.0, codes 0); tiny blocks (exponent clamped at -126, see e8m0);
    a partial last block (its own scale, as ONNX blocked DQ reads it); NaN/inf (ValueError).
    """
    problem = block_size_problem(block_size)
    if problem:
        raise ValueError(problem)
    x = np.asarray(x, dtype=np.float32)
    axis = normalize_axis(axis, x.ndim)
    channel_amax(x, None)  # refuses NaN/inf: one would poison its whole block's scale
    granularity = Granularity.block(axis, block_size)
    scales = mxfp8_block_scales(block_reduce(x, granularity), rule)
    return Mxfp8Tensor(
        saturate_to_fp8(x / granularity.expand(e8m0_to_float32(scales), x.shape)), scales, axis, block_size
    )


def dequantize_mxfp8(q: Mxfp8Tensor) -> np.ndarray:
    """DequantizeLinear(values, scales, axis, block_size, output_dtype=FLOAT): fp8 * 2**e in float32."""
    scale = q.granularity.expand(e8m0_to_float32(q.scales), q.values.shape)
    return np.asarray(q.values, dtype=FLOAT8_E4M3FN).astype(np.float32) * scale


def fake_quantize_mxfp8(x: np.ndarray, axis: int, rule: ScaleRule = "ocp") -> np.ndarray:
    """Quantize then dequantize: the values a deployed MXFP8 tensor holds, float32."""
    return dequantize_mxfp8(quantize_mxfp8(x, axis, rule=rule))


__all__ = [
    "FLOAT8_E8M0FNU",
    "FP8_E4M3_EMAX",
    "MXFP8_BLOCK_SIZE",
    "MXFP8_MIN_OPSET",
    "Mxfp8Tensor",
    "ScaleRule",
    "dequantize_mxfp8",
    "fake_quantize_mxfp8",
    "mxfp8_block_scales",
    "quantize_mxfp8",
]
