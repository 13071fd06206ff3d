"""Asymmetric UINT8 activations, the layout ONNX Runtime's CPU kernels (QLinearConv, ...) prefer.

Weights stay symmetric INT8 (the ``int8`` format); only activations use this format.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.formats.base import QuantParams
from onnxq.formats.int8 import (
    dequantize_linear,
    fake_quantize_integer,
    positive_scale,
    quantize_integer,
    range_amax,
)

UINT8_MAX = 255
UINT8_MIN = 0


def uint8_scale(low: float, high: float) -> np.ndarray:
    """(high - low) / 255: the 256 codes span exactly the observed range, none spent on unseen values."""
    return positive_scale(np.float32(high - low) / np.float32(UINT8_MAX))


def uint8_zero_point(low: float, scale: np.ndarray) -> np.ndarray:
    """The code standing for 0.0, so padding and ReLU zeros quantize without error; 0 when low == 0."""
    code = np.rint(np.float32(-low) / scale)
    return np.asarray(np.clip(code, UINT8_MIN, UINT8_MAX), dtype=np.uint8)


def widened_range(low: float, high: float) -> tuple[float, float]:
    """[low, high] stretched to contain 0, which must be exactly representable."""
    range_amax(low, high)  # rejects non-finite and reversed ranges
    return min(float(low), 0.0), max(float(high), 0.0)


class Uint8Format:
    """Unsigned 8-bit integers with a zero point, per-tensor, for activations only."""

    name: str = "uint8"
    onnx_dtype: ir.DataType = ir.DataType.UINT8
    numpy_dtype: np.dtype = np.dtype(np.uint8)
    min_opset: int = 13
    #: no symmetric grid: the largest code
    max_representable: float = float(UINT8_MAX)

    def weight_params(self, weight: np.ndarray, axis: int | None) -> QuantParams:
        raise ValueError("uint8 is for activations only; weights use the symmetric 'int8' format")

    def activation_params(self, low: float, high: float, symmetric: bool) -> QuantParams:
        if symmetric:
            raise ValueError("uint8 activations are asymmetric; use the 'int8' format for symmetric ranges")
        low, high = widened_range(low, high)
        scale = uint8_scale(low, high)
        return QuantParams(scale, uint8_zero_point(low, scale))

    def quantize(self, x: np.ndarray, params: QuantParams) -> np.ndarray:
        return quantize_integer(x, params, UINT8_MIN, UINT8_MAX, np.uint8)

    def dequantize(self, q: np.ndarray, params: QuantParams) -> np.ndarray:
        return dequantize_linear(q, params)

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        # A tensor that never goes negative gets [0, amax] (zero point 0), as activation_params would
        # give it; otherwise the range is [-amax, amax].
        low = -amax if (np.asarray(x) < 0).any() else 0.0
        params = self.activation_params(low, amax, symmetric=False)
        return fake_quantize_integer(x, params.scale, int(params.zero_point), UINT8_MIN, UINT8_MAX)
