"""Asymmetric UINT8 activations: range widening, zero point rules, golden codes and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.formats.base import QuantParams
from onnxq.formats.uint8 import Uint8Format

UINT8 = Uint8Format()
# derandomize: the same examples on every run; no example database written into the repository
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# (low, high, expected scale, expected zero point)
PARAMS_GOLDEN = [
    (0.0, 2.55, np.float32(2.55) / np.float32(255), 0),
    (0.5, 2.55, np.float32(2.55) / np.float32(255), 0),  # widened down to 0
    (-1.0, 3.0, np.float32(4) / np.float32(255), 64),  # 63.75 rounds to 64
    (-127.5, 127.5, 1.0, 128),  # 127.5 ties to even
    (-1.0, 1.0, np.float32(2) / np.float32(255), 127),  # float32 scale is a hair above 2/255: 127.49999
    (-3.0, -1.0, np.float32(3) / np.float32(255), 255),  # widened up to 0
    (-2.55, 0.0, np.float32(2.55) / np.float32(255), 255),
    (0.0, 0.0, 1.0, 0),  # empty range: any positive scale, never inf/NaN
]


@pytest.mark.parametrize(("low", "high", "scale", "zp"), PARAMS_GOLDEN)
def test_activation_params_golden(low: float, high: float, scale: float, zp: int) -> None:
    params = UINT8.activation_params(low, high, symmetric=False)
    assert params.axis is None
    assert params.scale.dtype == np.float32 and params.scale.shape == ()
    assert params.zero_point.dtype == np.uint8 and params.zero_point.shape == ()
    assert params.scale == np.float32(scale)
    assert params.zero_point == zp


# (x, zero point, expected code) with scale 1: round half to even, add zp, saturate to [0, 255]
QUANTIZE_GOLDEN = [
    (0.0, 128, 128),
    (0.5, 128, 128),
    (1.5, 128, 130),
    (-0.5, 128, 128),
    (-2.5, 128, 126),
    (127.0, 128, 255),
    (127.5, 128, 255),
    (-128.0, 128, 0),
    (-128.5, 128, 0),
    (-129.0, 128, 0),
    (254.5, 0, 254),
    (255.5, 0, 255),
    (-0.5, 0, 0),
    (-0.6, 0, 0),
    (math.inf, 0, 255),
    (-math.inf, 0, 0),
    (math.nan, 128, 0),  # what ONNX Runtime CPU produces for NaN
]


@pytest.mark.parametrize(("x", "zp", "code"), QUANTIZE_GOLDEN)
def test_quantize_golden(x: float, zp: int, code: int) -> None:
    params = QuantParams(np.array(1.0, np.float32), np.array(zp, np.uint8))
    q = UINT8.quantize(np.array([x], np.float32), params)
    assert q.dtype == np.uint8
    assert q.tolist() == [code]


def test_dequantize_golden() -> None:
    params = QuantParams(np.array(0.5, np.float32), np.array(64, np.uint8))
    out = UINT8.dequantize(np.array([0, 63, 64, 65, 255], np.uint8), params)
    assert out.dtype == np.float32
    assert out.tolist() == [-32.0, -0.5, 0.0, 0.5, 95.5]


def test_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="int8"):
        UINT8.weight_params(np.ones((2, 2), np.float32), axis=0)


def test_symmetric_is_refused() -> None:
    with pytest.raises(ValueError, match="int8"):
        UINT8.activation_params(-1.0, 1.0, symmetric=True)


@pytest.mark.parametrize(("low", "high"), [(-math.inf, 1.0), (0.0, math.inf), (math.nan, 1.0), (3.0, 1.0)])
def test_bad_range_is_rejected(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="range"):
        UINT8.activation_params(low, high, symmetric=False)


def test_fake_quantize_uses_zero_point_zero_for_non_negative_tensors() -> None:
    x = np.array([0.0, 0.4, 1.0, 2.0], np.float32)
    params = UINT8.activation_params(0.0, 1.0, symmetric=False)
    np.testing.assert_array_equal(
        UINT8.fake_quantize(x, 1.0), UINT8.dequantize(UINT8.quantize(x, params), params)
    )


def test_fake_quantize_matches_quantize_then_dequantize() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((48, 80)) * 2).astype(np.float32)
    x.flat[:3] = [np.inf, -np.inf, np.nan]
    for amax in (0.0, 0.5, 3.0):
        params = UINT8.activation_params(-amax, amax, symmetric=False)
        expected = UINT8.dequantize(UINT8.quantize(x, params), params)
        np.testing.assert_array_equal(UINT8.fake_quantize(x, amax), expected)


def test_per_channel_params_are_honoured() -> None:
    params = QuantParams(np.array([1.0, 0.5], np.float32), np.array([0, 100], np.uint8), axis=-1)
    x = np.array([[1.0, 1.0], [-1.0, -1.0]], np.float32)
    q = UINT8.quantize(x, params)
    assert q.tolist() == [[1, 102], [0, 98]]
    np.testing.assert_array_equal(UINT8.dequantize(q, params), [[1.0, 1.0], [0.0, -1.0]])


bounds = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)


@FAST
@given(bounds, bounds)
def test_zero_is_exactly_representable(a: float, b: float) -> None:
    params = UINT8.activation_params(min(a, b), max(a, b), symmetric=False)
    zero = np.zeros(1, np.float32)
    assert UINT8.dequantize(UINT8.quantize(zero, params), params).tolist() == [0.0]
    if min(a, b) >= 0:
        assert params.zero_point == 0


@FAST
@given(bounds, bounds, hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(0, 1, width=32)))
def test_round_trip_error_within_half_step_inside_range(a: float, b: float, t: np.ndarray) -> None:
    params = UINT8.activation_params(min(a, b), max(a, b), symmetric=False)
    # values on the grid's span [(0 - zp) * scale, (255 - zp) * scale], which covers the widened range
    lo, hi = UINT8.dequantize(np.array([0, 255], np.uint8), params)
    x = (lo + t * (hi - lo)).astype(np.float32)
    err = np.abs(UINT8.dequantize(UINT8.quantize(x, params), params) - x)
    assert (err <= params.scale / 2 * (1 + 1e-4) + np.spacing(np.abs(x))).all()


@FAST
@given(hnp.arrays(np.float32, st.integers(2, 64), elements=bounds), bounds, bounds)
def test_quantize_is_monotonic(x: np.ndarray, a: float, b: float) -> None:
    params = UINT8.activation_params(min(a, b), max(a, b), symmetric=False)
    q = UINT8.quantize(np.sort(x), params)
    assert (np.diff(q.astype(np.int32)) >= 0).all()


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=bounds), st.floats(2.0**-10, 1e4, width=32))
def test_fake_quantize_is_idempotent(x: np.ndarray, amax: float) -> None:
    once = UINT8.fake_quantize(x, amax)
    np.testing.assert_array_equal(UINT8.fake_quantize(once, amax), once)
