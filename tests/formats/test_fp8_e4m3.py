"""FP8 E4M3FN: code points, saturating round-half-to-even quantization, parameters and properties."""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.formats.base import QuantParams
from onnxq.formats.fp8_e4m3 import (
    FP8_E4M3_MAX,
    FP8_E4M3_MIN_SUBNORMAL,
    Fp8E4M3Format,
    round_to_fp8_grid,
    saturate_to_fp8,
)

FP8 = Fp8E4M3Format()
E4M3 = ml_dtypes.float8_e4m3fn
# derandomize: the same examples on every run; no example database written into the repository
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# bit pattern -> value (sign | 4 exponent bits, bias 7 | 3 mantissa bits); no infinities, S.1111.111 is NaN
CODE_POINTS = [
    (0x00, 0.0),
    (0x01, 2.0**-9),  # smallest subnormal
    (0x02, 2.0**-8),
    (0x07, 7 * 2.0**-9),  # largest subnormal
    (0x08, 2.0**-6),  # smallest normal
    (0x30, 0.5),
    (0x38, 1.0),
    (0x39, 1.125),
    (0x40, 2.0),
    (0x70, 128.0),
    (0x77, 240.0),
    (0x78, 256.0),
    (0x7D, 416.0),
    (0x7E, 448.0),  # largest finite
    (0x7F, math.nan),
    (0x80, -0.0),
    (0x81, -(2.0**-9)),
    (0xB8, -1.0),
    (0xFE, -448.0),
    (0xFF, math.nan),
]


@pytest.mark.parametrize(("bits", "value"), CODE_POINTS)
def test_code_points(bits: int, value: float) -> None:
    decoded = float(np.array([bits], np.uint8).view(E4M3).astype(np.float32)[0])
    if math.isnan(value):
        assert math.isnan(decoded)
    else:
        assert decoded == value and math.copysign(1, decoded) == math.copysign(1, value)
        # and encoding the value gives back the same bits
        assert int(np.array([value], np.float32).astype(E4M3).view(np.uint8)[0]) == bits


def test_named_constants() -> None:
    assert float(ml_dtypes.finfo(E4M3).max) == FP8_E4M3_MAX == 448.0
    assert float(ml_dtypes.finfo(E4M3).smallest_subnormal) == FP8_E4M3_MIN_SUBNORMAL == 2.0**-9


# (x, scale, expected value): saturate to +/-448, then round half to even onto the E4M3 grid
QUANTIZE_GOLDEN = [
    (0.0, 1.0, 0.0),
    (2.0**-9, 1.0, 2.0**-9),
    (2.0**-10, 1.0, 0.0),  # half the smallest subnormal: tie, even is 0
    (1.0001 * 2.0**-10, 1.0, 2.0**-9),
    (3 * 2.0**-10, 1.0, 2.0**-8),  # 1.5 subnormal steps: tie, even is 2 steps
    (5 * 2.0**-10, 1.0, 2.0**-8),  # 2.5 steps: tie, even is 2 steps
    (7 * 2.0**-10, 1.0, 4 * 2.0**-9),
    (2.0**-11, 1.0, 0.0),
    (-(2.0**-11), 1.0, -0.0),
    (15 * 2.0**-10, 1.0, 2.0**-6),  # 7.5 steps rounds up into the smallest normal
    (2.0**-6, 1.0, 2.0**-6),
    (1.0625, 1.0, 1.0),  # halfway 1.0 / 1.125: even mantissa 000
    (1.1875, 1.0, 1.25),  # halfway 1.125 / 1.25: even mantissa 010
    (-1.1875, 1.0, -1.25),
    (1.07, 1.0, 1.125),
    (432.0, 1.0, 448.0),  # halfway 416 / 448: even mantissa 110
    (448.0, 1.0, 448.0),
    (464.0, 1.0, 448.0),
    (480.0, 1.0, 448.0),  # a bare ml_dtypes cast gives NaN here
    (1e30, 1.0, 448.0),
    (-464.0, 1.0, -448.0),
    (math.inf, 1.0, 448.0),  # saturate=1, as onnx.reference and ONNX Runtime CPU do
    (-math.inf, 1.0, -448.0),
    (896.0, 2.0, 448.0),
    (3.0, 0.5, 6.0),
    (1.0, 1 / 448, 448.0),
    (math.nan, 1.0, math.nan),
]


@pytest.mark.parametrize(("x", "scale", "expected"), QUANTIZE_GOLDEN)
def test_quantize_golden(x: float, scale: float, expected: float) -> None:
    params = QuantParams(np.array(scale, np.float32), np.zeros((), E4M3))
    q = FP8.quantize(np.array([x], np.float32), params)
    assert q.dtype == E4M3
    value = float(q.astype(np.float32)[0])
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == expected and math.copysign(1, value) == math.copysign(1, expected)


def test_nan_quantizes_without_warnings() -> None:
    params = FP8.activation_params(-1.0, 1.0, symmetric=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(FP8.quantize(np.array([np.nan], np.float32), params).astype(np.float32)).all()
        assert np.isnan(FP8.fake_quantize(np.array([np.nan], np.float32), 1.0)).all()


def test_dequantize_golden() -> None:
    params = QuantParams(np.array(0.5, np.float32), np.zeros((), E4M3))
    q = np.array([0x7E, 0x01, 0xB8, 0x00], np.uint8).view(E4M3)
    out = FP8.dequantize(q, params)
    assert out.dtype == np.float32
    assert out.tolist() == [224.0, 2.0**-10, -0.5, 0.0]


def test_weight_params_per_channel() -> None:
    w = np.array([[1.0, -448.0], [0.0, 0.0], [2.0, 3.5]], np.float32)
    params = FP8.weight_params(w, axis=-2)
    assert params.axis == 0
    assert params.zero_point.dtype == E4M3 and params.zero_point.shape == (3,)
    np.testing.assert_array_equal(params.scale, np.array([1.0, 1.0, 3.5 / 448], np.float32))
    assert FP8.quantize(w, params).astype(np.float32).tolist() == [[1.0, -448.0], [0.0, 0.0], [256.0, 448.0]]


def test_activation_params_and_refusals() -> None:
    params = FP8.activation_params(-896.0, 10.0, symmetric=True)
    assert params.scale == 2.0 and params.zero_point.dtype == E4M3 and params.axis is None
    with pytest.raises(ValueError, match="symmetric"):
        FP8.activation_params(0.0, 1.0, symmetric=False)
    with pytest.raises(ValueError, match="range"):
        FP8.activation_params(-math.inf, 1.0, symmetric=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        FP8.weight_params(np.array([np.nan, 1.0]), axis=None)


def test_nonzero_zero_point_is_refused() -> None:
    params = QuantParams(np.array(1.0, np.float32), np.array(1.0, E4M3))
    with pytest.raises(ValueError, match="zero point"):
        FP8.quantize(np.ones(2, np.float32), params)


def every_float32_near_the_grid() -> np.ndarray:
    """Every upper-16-bit pattern, each with low bits that hit ties, just-above-ties and sticky cases."""
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    return (upper[:, None] | lows[None, :]).view(np.float32).ravel()


def test_rounding_table_equals_ml_dtypes_cast_exhaustively() -> None:
    v = every_float32_near_the_grid()
    expected = saturate_to_fp8(v.copy()).astype(np.float32)
    np.testing.assert_array_equal(round_to_fp8_grid(v), expected)


def test_fake_quantize_matches_quantize_then_dequantize() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [every_float32_near_the_grid()[::7], (rng.standard_normal(5000) * 30).astype(np.float32)]
    )
    for amax in (0.0, 1.0, 448.0, 1e-3, 600.0):
        params = FP8.activation_params(-amax, amax, symmetric=True)
        expected = FP8.dequantize(FP8.quantize(x, params), params)
        np.testing.assert_array_equal(FP8.fake_quantize(x, amax), expected)


def test_fake_quantize_scalar_input() -> None:
    out = FP8.fake_quantize(np.float32(3.3), 448.0)
    assert out.shape == () and out == 3.25


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
amaxes = st.floats(2.0**-10, 1e4, width=32)


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=finite), amaxes)
def test_round_trip_relative_error_inside_range(x: np.ndarray, amax: float) -> None:
    x = np.clip(x, -amax, amax)
    params = FP8.activation_params(-amax, amax, symmetric=True)
    err = np.abs(FP8.dequantize(FP8.quantize(x, params), params) - x)
    # half an ulp of 3 mantissa bits (2**-4 relative) for normals, half a subnormal step below
    bound = np.maximum(np.abs(x) * 2.0**-4, params.scale * 2.0**-10) * (1 + 1e-5)
    assert (err <= bound).all()


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=finite), amaxes)
def test_fake_quantize_is_idempotent(x: np.ndarray, amax: float) -> None:
    once = FP8.fake_quantize(x, amax)
    np.testing.assert_array_equal(FP8.fake_quantize(once, amax), once)


@FAST
@given(hnp.arrays(np.float32, st.integers(2, 64), elements=finite), amaxes)
def test_quantize_is_monotonic(x: np.ndarray, amax: float) -> None:
    q = FP8.quantize(np.sort(x), FP8.activation_params(-amax, amax, symmetric=True)).astype(np.float32)
    assert (np.diff(q) >= 0).all()


@FAST
@given(
    hnp.arrays(
        np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), elements=finite
    ),
    st.sampled_from([0, 1, 2, -1]),
)
def test_per_channel_equals_per_tensor_per_slice(w: np.ndarray, axis: int) -> None:
    params = FP8.weight_params(w, axis)
    q = FP8.quantize(w, params).astype(np.float32)
    for c in range(w.shape[axis]):
        one = QuantParams(params.scale[c], params.zero_point[c])
        expected = FP8.quantize(np.take(w, c, axis=axis), one).astype(np.float32)
        np.testing.assert_array_equal(np.take(q, c, axis=axis), expected)


@FAST
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 6)),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32),
    )
)
def test_weight_scale_puts_max_on_448(w: np.ndarray) -> None:
    params = FP8.weight_params(w, axis=1)
    q = np.abs(FP8.quantize(w, params).astype(np.float32)).max(axis=0)
    amax = np.abs(w).max(axis=0)
    # channels whose amax is too small for a normal float32 scale fall back to scale 1.0
    usable = amax / np.float32(FP8_E4M3_MAX) >= np.finfo(np.float32).tiny
    assert (q[usable] == FP8_E4M3_MAX).all()
