"""FP8 E4M3FN (4 exponent bits, 3 mantissa bits, no infinities): TensorRT's FP8 format.

Quantization follows ONNX QuantizeLinear with ``saturate=1``: ``x / scale`` in float32, finite overflow
and +/-inf clamp to +/-448, then round half to even onto the FP8 grid; NaN stays NaN. ONNX Runtime CPU
and ``onnx.reference`` both send +/-inf to +/-448 (a bare ml_dtypes cast would give NaN).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq.formats.base import QuantParams
from onnxq.formats.int8 import (
    channel_amax,
    dequantize_linear,
    normalize_axis,
    positive_scale,
    range_amax,
    scaled,
)

FP8_E4M3_MAX = 448.0
#: smallest positive subnormal, 2**-9
FP8_E4M3_MIN_SUBNORMAL = 2.0**-9
FLOAT8_E4M3FN = np.dtype(ml_dtypes.float8_e4m3fn)
#: float32 bits below the 16 kept by the rounding table (1 sign, 8 exponent, 7 mantissa)
_DROPPED_BITS = 16


def fp8_scale(amax: np.ndarray | float) -> np.ndarray:
    """amax / 448: the largest magnitude lands on the largest finite E4M3FN value."""
    return positive_scale(np.asarray(amax, dtype=np.float32) / np.float32(FP8_E4M3_MAX))


def saturate_to_fp8(v: np.ndarray) -> np.ndarray:
    """Clamp float32 ``v`` in place to +/-448 (inf included, NaN kept) and round it to E4M3FN."""
    np.clip(v, -FP8_E4M3_MAX, FP8_E4M3_MAX, out=v)
    with np.errstate(invalid="ignore"):  # NaN -> NaN is intended, not an error
        return v.astype(FLOAT8_E4M3FN)  # ml_dtypes rounds half to even


@functools.cache
def _rounding_table() -> np.ndarray:
    """Saturated E4M3FN value, as float32, of every float32 whose low 16 bits are zero."""
    upper = (np.arange(1 << (32 - _DROPPED_BITS), dtype=np.uint32) << _DROPPED_BITS).view(np.float32)
    return saturate_to_fp8(upper).astype(np.float32)


def round_to_fp8_grid(v: np.ndarray) -> np.ndarray:
    """Same values as ``saturate_to_fp8(v).astype(float32)`` via a table lookup, about 3x faster.

    The low 16 bits are folded into the lowest kept bit (round to odd): 7 mantissa bits plus that
    sticky bit decide round-half-to-even to 3 bits exactly as the full float32 would.
    """
    bits = np.asarray(v, dtype=np.float32).view(np.uint32)
    index = (bits >> _DROPPED_BITS).astype(np.uint16)
    index |= (bits & ((1 << _DROPPED_BITS) - 1)) != 0
    return np.asarray(_rounding_table()[index])


def require_zero_point_zero(params: QuantParams) -> None:
    """Reject FP8 zero points other than 0: onnx.reference ignores them, so runtimes cannot agree."""
    if np.any(np.asarray(params.zero_point, dtype=np.float32) != 0):
        raise ValueError("FP8 E4M3 zero points must be 0")


class Fp8E4M3Format:
    """Symmetric FP8 E4M3FN, per-channel weights and per-tensor activations."""

    name: str = "fp8"
    onnx_dtype: ir.DataType = ir.DataType.FLOAT8E4M3FN
    numpy_dtype: np.dtype = FLOAT8_E4M3FN
    #: FLOAT8E4M3FN QuantizeLinear/DequantizeLinear exist from opset 19
    min_opset: int = 19
    max_representable: float = FP8_E4M3_MAX

    def weight_params(self, weight: np.ndarray, axis: int | None) -> QuantParams:
        amax = channel_amax(weight, axis)
        norm_axis = None if axis is None else normalize_axis(axis, np.ndim(weight))
        return QuantParams(fp8_scale(amax), np.zeros(amax.shape, FLOAT8_E4M3FN), norm_axis)

    def activation_params(self, low: float, high: float, symmetric: bool) -> QuantParams:
        if not symmetric:
            raise ValueError("fp8 has no zero point, so its activations are symmetric only")
        return QuantParams(fp8_scale(range_amax(low, high)), np.zeros((), FLOAT8_E4M3FN))

    def quantize(self, x: np.ndarray, params: QuantParams) -> np.ndarray:
        require_zero_point_zero(params)
        return saturate_to_fp8(scaled(x, params))

    def dequantize(self, q: np.ndarray, params: QuantParams) -> np.ndarray:
        return dequantize_linear(q, params)

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        scale = fp8_scale(amax)
        out = round_to_fp8_grid(scaled(x, QuantParams(scale, np.zeros((), FLOAT8_E4M3FN))))
        out *= scale
        return out
