"""Symmetric INT8: golden tables, parameter rules and properties of QuantizeLinear semantics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.formats.base import QuantParams
from onnxq.formats.int8 import INT8_MAX, INT8_MIN, Int8Format, int8_scale

INT8 = Int8Format()
# derandomize: the same examples on every run; no example database written into the repository
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# (x, scale, expected code): ties round half to even, then saturate to [-128, 127]
QUANTIZE_GOLDEN = [
    (0.0, 1.0, 0),
    (-0.0, 1.0, 0),
    (0.5, 1.0, 0),
    (1.5, 1.0, 2),
    (2.5, 1.0, 2),
    (3.5, 1.0, 4),
    (-0.5, 1.0, 0),
    (-1.5, 1.0, -2),
    (-2.5, 1.0, -2),
    (0.49999997, 1.0, 0),
    (0.50000006, 1.0, 1),
    (126.5, 1.0, 126),
    (127.0, 1.0, 127),
    (127.5, 1.0, 127),  # rounds to 128, saturates
    (1000.0, 1.0, 127),
    (-127.5, 1.0, -128),
    (-128.0, 1.0, -128),
    (-128.5, 1.0, -128),
    (-1e30, 1.0, -128),
    (0.25, 0.5, 0),
    (0.75, 0.5, 2),
    (-1.25, 0.5, -2),
    (63.5, 0.5, 127),
    (3.0, 0.25, 12),
    (1.0, 1 / 127, 127),
    (math.inf, 1.0, 127),
    (-math.inf, 1.0, -128),
    (math.nan, 1.0, -128),  # what ONNX Runtime CPU produces for NaN
]


@pytest.mark.parametrize(("x", "scale", "code"), QUANTIZE_GOLDEN)
def test_quantize_golden(x: float, scale: float, code: int) -> None:
    params = QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    q = INT8.quantize(np.array([x], np.float32), params)
    assert q.dtype == np.int8
    assert q.tolist() == [code]


# (code, zero point, scale, expected value)
DEQUANTIZE_GOLDEN = [
    (-128, 0, 0.5, -64.0),
    (-1, 0, 0.5, -0.5),
    (0, 0, 0.5, 0.0),
    (127, 0, 0.5, 63.5),
    (127, 0, 1 / 127, 1.0),
    (10, -5, 0.25, 3.75),
]


@pytest.mark.parametrize(("code", "zp", "scale", "value"), DEQUANTIZE_GOLDEN)
def test_dequantize_golden(code: int, zp: int, scale: float, value: float) -> None:
    params = QuantParams(np.array(scale, np.float32), np.array(zp, np.int8))
    out = INT8.dequantize(np.array([code], np.int8), params)
    assert out.dtype == np.float32
    assert out.tolist() == [np.float32(value)]


def test_quantize_adds_zero_point_after_rounding_and_saturates() -> None:
    params = QuantParams(np.array(1.0, np.float32), np.array(-10, np.int8))
    x = np.array([0.5, 1.5, -118.0, -119.0, 200.0], np.float32)
    assert INT8.quantize(x, params).tolist() == [-10, -8, -128, -128, 127]


def test_weight_params_per_channel_scale_is_amax_over_127() -> None:
    w = np.array([[1.0, -2.0], [0.0, 0.0], [127.0, 3.0]], np.float32)
    params = INT8.weight_params(w, axis=0)
    assert params.axis == 0
    assert params.scale.dtype == np.float32 and params.zero_point.dtype == np.int8
    np.testing.assert_array_equal(params.scale, np.array([2 / 127, 1.0, 1.0], np.float32))
    np.testing.assert_array_equal(params.zero_point, [0, 0, 0])


def test_weight_params_negative_axis_and_per_tensor() -> None:
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 12
    per_channel = INT8.weight_params(w, axis=-1)
    assert per_channel.axis == 2
    np.testing.assert_array_equal(per_channel.scale, np.abs(w).max(axis=(0, 1)) / np.float32(127))
    per_tensor = INT8.weight_params(w, axis=None)
    assert per_tensor.axis is None and per_tensor.scale.shape == () and per_tensor.zero_point.shape == ()
    assert per_tensor.scale == np.float32(12) / np.float32(127)


def test_zero_weight_gets_positive_scale_and_no_warnings() -> None:
    w = np.zeros((3, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = INT8.weight_params(w, axis=0)
        q = INT8.quantize(w, params)
        out = INT8.fake_quantize(w, 0.0)
    assert (params.scale == 1.0).all()
    assert (q == 0).all() and (out == 0).all()


def test_subnormal_scale_is_replaced() -> None:
    assert int8_scale(1e-40) == 1.0
    assert int8_scale(127.0) == 1.0


def test_non_finite_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        INT8.weight_params(np.array([[1.0, np.nan]]), axis=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        INT8.weight_params(np.array([1.0, -np.inf]), axis=None)


def test_activation_params() -> None:
    params = INT8.activation_params(-3.0, 12.7, symmetric=True)
    assert params.axis is None
    assert params.scale == np.float32(12.7) / np.float32(127)
    assert params.zero_point == 0 and params.zero_point.dtype == np.int8


def test_asymmetric_activation_points_to_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        INT8.activation_params(0.0, 1.0, symmetric=False)


@pytest.mark.parametrize(("low", "high"), [(-math.inf, 1.0), (0.0, math.nan), (2.0, 1.0), (0.0, 1e39)])
def test_bad_activation_range_is_rejected(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="range"):
        INT8.activation_params(low, high, symmetric=True)


def test_bad_axis_and_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="axis"):
        INT8.weight_params(np.ones((2, 3)), axis=2)
    params = QuantParams(np.ones(3, np.float32), np.zeros(3, np.int8), axis=0)
    with pytest.raises(ValueError, match="does not fit"):
        INT8.quantize(np.ones((1, 3), np.float32), params)


def test_fake_quantize_matches_quantize_then_dequantize() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 96)) * 3).astype(np.float32)
    x.flat[:4] = [np.inf, -np.inf, np.nan, -50.0]
    for amax in (0.0, 0.1, 2.0, 7.5):
        params = INT8.activation_params(-amax, amax, symmetric=True)
        expected = INT8.dequantize(INT8.quantize(x, params), params)
        np.testing.assert_array_equal(INT8.fake_quantize(x, amax), expected)


def test_fake_quantize_scalar_and_float64_input() -> None:
    out = INT8.fake_quantize(np.float64(0.3), 1.0)
    assert out.shape == () and out.dtype == np.float32
    assert out == np.float32(38) * (np.float32(1) / np.float32(127))


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
amaxes = st.floats(2.0**-10, 1e4, width=32)


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=finite), amaxes)
def test_round_trip_error_within_half_step_inside_range(x: np.ndarray, amax: float) -> None:
    x = np.clip(x, -amax, amax)
    params = INT8.activation_params(-amax, amax, symmetric=True)
    err = np.abs(INT8.dequantize(INT8.quantize(x, params), params) - x)
    # float32 arithmetic may add a few ulps on top of the half step
    assert (err <= params.scale / 2 * (1 + 1e-5)).all()


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=finite), amaxes)
def test_fake_quantize_is_idempotent(x: np.ndarray, amax: float) -> None:
    once = INT8.fake_quantize(x, amax)
    np.testing.assert_array_equal(INT8.fake_quantize(once, amax), once)


@FAST
@given(hnp.arrays(np.float32, st.integers(2, 64), elements=finite), amaxes)
def test_quantize_is_monotonic(x: np.ndarray, amax: float) -> None:
    x = np.sort(x)
    q = INT8.quantize(x, INT8.activation_params(-amax, amax, symmetric=True))
    assert (np.diff(q.astype(np.int32)) >= 0).all()


@FAST
@given(
    hnp.arrays(
        np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), elements=finite
    ),
    st.sampled_from([0, 1, 2, -1, -3]),
)
def test_per_channel_equals_per_tensor_per_slice(w: np.ndarray, axis: int) -> None:
    params = INT8.weight_params(w, axis)
    q = INT8.quantize(w, params)
    for c in range(w.shape[axis]):
        one = QuantParams(params.scale[c], params.zero_point[c])
        np.testing.assert_array_equal(np.take(q, c, axis=axis), INT8.quantize(np.take(w, c, axis=axis), one))
        np.testing.assert_array_equal(
            np.take(INT8.dequantize(q, params), c, axis=axis),
            INT8.dequantize(np.take(q, c, axis=axis), one),
        )


@FAST
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 6)),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32),
    )
)
def test_weight_scale_puts_max_on_127(w: np.ndarray) -> None:
    params = INT8.weight_params(w, axis=0)
    q = np.abs(INT8.quantize(w, params).astype(np.int32)).max(axis=1)
    amax = np.abs(w).max(axis=1)
    # channels whose amax is too small for a normal float32 scale fall back to scale 1.0
    tiny = amax / np.float32(INT8_MAX) < np.finfo(np.float32).tiny
    assert (q[~tiny] == INT8_MAX).all()
    assert (q >= 0).all() and INT8_MIN < -INT8_MAX
