"""Symmetric INT8: the format TensorRT requires for weights and activations (zero point always 0).

INT8 is also the reference linear format: the axis handling and the integer QuantizeLinear /
DequantizeLinear arithmetic below are reused by the UINT8 and FP8 modules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.formats.base import QuantParams

INT8_MAX = 127
INT8_MIN = -128
#: scale given to an all-zero range: any positive value maps zeros to code 0 without producing inf/NaN
ZERO_RANGE_SCALE = 1.0
#: smallest scale kept as is; below it (zero, subnormal) ``x / scale`` turns inf or loses precision
MIN_SCALE = float(np.finfo(np.float32).tiny)
#: scales, amax and ranges live in float32, so larger bounds are as useless as inf
FLOAT32_MAX = float(np.finfo(np.float32).max)


def int8_scale(amax: np.ndarray | float) -> np.ndarray:
    """amax / 127: both signs share 127 codes, so amax lands exactly on the top code (-128 stays unused)."""
    return positive_scale(np.asarray(amax, dtype=np.float32) / np.float32(INT8_MAX))


def positive_scale(scale: np.ndarray) -> np.ndarray:
    """``scale`` as float32 with zero or subnormal entries (an all-zero range) replaced by 1.0."""
    scale = np.asarray(scale, dtype=np.float32)
    return np.where(scale >= MIN_SCALE, scale, np.float32(ZERO_RANGE_SCALE)).astype(np.float32)


def normalize_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative index; ONNX allows ``-ndim <= axis < ndim``."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def channel_amax(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Largest |w| per slice along ``axis`` (every other axis reduced), or over the tensor when None."""
    w = np.abs(np.asarray(weight, dtype=np.float32))
    reduced = None if axis is None else tuple(i for i in range(w.ndim) if i != normalize_axis(axis, w.ndim))
    amax = np.asarray(w.max(axis=reduced, initial=0.0), dtype=np.float32)
    # NaN survives max(): one non-finite weight would silently zero its whole channel
    if not np.isfinite(amax).all():
        raise ValueError("weight holds NaN or infinite values, so no finite scale covers it")
    return amax


def range_amax(low: float, high: float) -> float:
    """max(|low|, |high|) of a calibrated range, rejecting ranges no finite scale can cover."""
    # written so that NaN fails every comparison and lands in the error
    if not (abs(low) <= FLOAT32_MAX and abs(high) <= FLOAT32_MAX and low <= high):
        raise ValueError(f"calibrated range [{low}, {high}] is not a finite, ordered range")
    return max(abs(float(low)), abs(float(high)))


def along_axis(param: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """A 0-d parameter as is, or a 1-d one reshaped to broadcast along ``axis`` of ``shape``."""
    if param.ndim == 0:
        return param
    if axis is None or param.shape[0] != shape[normalize_axis(axis, len(shape))]:
        raise ValueError(f"per-channel parameter of shape {param.shape} does not fit axis {axis} of {shape}")
    view = [1] * len(shape)
    view[normalize_axis(axis, len(shape))] = param.shape[0]
    return param.reshape(view)


def scaled(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """``x / scale`` in float32 (a fresh array, even for 0-d input): the value QuantizeLinear rounds."""
    v = np.array(x, dtype=np.float32)
    # overflow to inf is fine (it saturates next); "invalid" only flags signalling-NaN inputs
    with np.errstate(over="ignore", invalid="ignore"):
        v /= along_axis(np.asarray(params.scale, dtype=np.float32), v.shape, params.axis)
    return v


def quantize_integer(
    x: np.ndarray, params: QuantParams, qmin: int, qmax: int, dtype: type[np.integer]
) -> np.ndarray:
    """ONNX QuantizeLinear to an integer type: round half to even, add the zero point, saturate."""
    v = np.rint(scaled(x, params))
    v += along_axis(np.asarray(params.zero_point, dtype=np.float32), v.shape, params.axis)
    # fmax/fmin (unlike clip) send NaN to qmin, the code ONNX Runtime's CPU kernel produces for NaN
    return np.fmin(np.fmax(v, qmin), qmax).astype(dtype)


def dequantize_linear(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    v = np.array(q, dtype=np.float32)
    v -= along_axis(np.asarray(params.zero_point, dtype=np.float32), v.shape, params.axis)
    v *= along_axis(np.asarray(params.scale, dtype=np.float32), v.shape, params.axis)
    return v


def fake_quantize_integer(
    x: np.ndarray, scale: np.ndarray, zero_point: int, qmin: int, qmax: int
) -> np.ndarray:
    """Per-tensor Q then DQ fused in one float32 buffer: same values, no integer array in between."""
    v = scaled(x, QuantParams(scale, np.asarray(zero_point)))
    np.rint(v, out=v)
    v += zero_point
    np.fmax(v, qmin, out=v)
    np.fmin(v, qmax, out=v)
    v -= zero_point
    v *= scale
    return v


class Int8Format:
    """Symmetric signed 8-bit integers, per-channel weights and per-tensor activations."""

    name: str = "int8"
    onnx_dtype: ir.DataType = ir.DataType.INT8
    numpy_dtype: np.dtype = np.dtype(np.int8)
    #: per-channel DequantizeLinear (``axis``) exists from opset 13
    min_opset: int = 13
    max_representable: float = float(INT8_MAX)

    def weight_params(self, weight: np.ndarray, axis: int | None) -> QuantParams:
        amax = channel_amax(weight, axis)
        norm_axis = None if axis is None else normalize_axis(axis, np.ndim(weight))
        return QuantParams(int8_scale(amax), np.zeros(amax.shape, np.int8), norm_axis)

    def activation_params(self, low: float, high: float, symmetric: bool) -> QuantParams:
        if not symmetric:
            raise ValueError("int8 activations are symmetric; use the 'uint8' format for asymmetric ranges")
        return QuantParams(int8_scale(range_amax(low, high)), np.zeros((), np.int8))

    def quantize(self, x: np.ndarray, params: QuantParams) -> np.ndarray:
        return quantize_integer(x, params, INT8_MIN, INT8_MAX, np.int8)

    def dequantize(self, q: np.ndarray, params: QuantParams) -> np.ndarray:
        return dequantize_linear(q, params)

    def fake_quantize(self, x: np.ndarray, amax: float) -> np.ndarray:
        # -128 stays reachable (values below -amax) exactly as in the deployed Q/DQ pair
        return fake_quantize_integer(x, int8_scale(amax), 0, INT8_MIN, INT8_MAX)
