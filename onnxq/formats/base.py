"""The contract every number format implements, and the parameters of one quantized tensor.

A format knows its storage type, its representable range and how to turn observed ranges into
scale/zero-point. It never touches the graph: placement and Q/DQ insertion live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one quantized tensor.

    ``scale`` is float32, ``zero_point`` has the storage dtype of the format; both are 0-d for
    per-tensor quantization or 1-d (one entry per channel along ``axis``) for per-channel.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


class NumberFormat(Protocol):
    """A quantized number format (INT8, UINT8, FP8 E4M3, ...)."""

    name: str
    onnx_dtype: ir.DataType
    numpy_dtype: np.dtype
    min_opset: int
    #: largest representable magnitude on the symmetric grid (127 for INT8, 448 for FP8 E4M3)
    max_representable: float

    def weight_params(self, weight: np.ndarray, axis: int | None) -> QuantParams:
        """Symmetric parameters for a constant weight, per channel along ``axis`` (None: per tensor)."""
        ...

    def activation_params(self, low: float, high: float, symmetric: bool) -> QuantParams:
        """Per-tensor parameters covering the calibrated range ``[low, high]``."""
        ...

    def quantize(self, x: np.ndarray, params: QuantParams) -> np.ndarray:
        """ONNX QuantizeLinear semantics (round half to even, saturate), in the storage dtype."""
        ...

    def dequantize(self, q: np.ndarray, params: QuantParams) -> np.ndarray:
        """ONNX DequantizeLinear semantics, float32 result."""
        ...

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        """Quantize then dequantize ``x`` on the symmetric grid whose largest value is ``amax``."""
        ...
