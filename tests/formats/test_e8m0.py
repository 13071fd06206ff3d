"""E8M0 power-of-two scales: code points and the OCP MX shared-exponent rule."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.formats.e8m0 import (
    E8M0_BIAS,
    E8M0_MAX_EXPONENT,
    E8M0_MIN_EXPONENT,
    E8M0_NAN_CODE,
    FLOAT8_E8M0FNU,
    MIN_NORMAL_EXPONENT,
    ZERO_BLOCK_EXPONENT,
    e8m0_from_exponent,
    e8m0_to_float32,
    floor_log2,
    mx_scale,
    mx_shared_exponent,
    mx_shared_exponent_round_up,
)
from onnxq.formats.fp4_e2m1 import FP4_E2M1_EMAX
from onnxq.formats.mxfp8 import FP8_E4M3_EMAX

FAST = settings(max_examples=80, deadline=None, derandomize=True, database=None)

# code -> value: 2**(code - 127); no sign, no zero, 0xFF is NaN
CODE_POINTS = [
    (0x00, 2.0**-127),  # smallest (a float32 subnormal)
    (0x01, 2.0**-126),  # float32's smallest normal
    (0x76, 2.0**-9),
    (0x7E, 0.5),
    (0x7F, 1.0),
    (0x80, 2.0),
    (0x87, 256.0),
    (0xFD, 2.0**126),
    (0xFE, 2.0**127),  # largest
    (0xFF, math.nan),
]


@pytest.mark.parametrize(("code", "value"), CODE_POINTS)
def test_code_points(code: int, value: float) -> None:
    decoded = float(e8m0_to_float32(np.array([code], np.uint8).view(FLOAT8_E8M0FNU))[0])
    if math.isnan(value):
        assert math.isnan(decoded) and code == E8M0_NAN_CODE
        return
    assert decoded == value
    assert int(e8m0_from_exponent(np.array([code - E8M0_BIAS])).view(np.uint8)[0]) == code
    # ml_dtypes encodes the exact power of two to the same code
    assert int(np.array([value], np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)[0]) == code


def test_named_constants() -> None:
    info = ml_dtypes.finfo(ml_dtypes.float8_e8m0fnu)
    assert float(info.max) == 2.0**E8M0_MAX_EXPONENT and float(info.smallest_normal) == 2.0**E8M0_MIN_EXPONENT
    assert float(np.finfo(np.float32).tiny) == 2.0**MIN_NORMAL_EXPONENT
    assert (FP8_E4M3_EMAX, FP4_E2M1_EMAX) == (8, 2)  # 448 = 1.75 * 2**8, 6 = 1.5 * 2**2


# (amax, emax_elem, shared exponent): floor(log2(amax)) - emax_elem, clamped; 0 for an all-zero block
SHARED_EXPONENT_GOLDEN = [
    (448.0, 8, 0),
    (256.0, 8, 0),
    (511.99997, 8, 0),  # scaled amax 511.99997 saturates to 448 (the spec's rule, no rounding up)
    (512.0, 8, 1),
    (255.99998, 8, -1),
    (1.0, 8, -8),
    (0.75, 8, -9),
    (6.0, 2, 0),
    (8.0, 2, 1),
    (7.99, 2, 0),
    (0.0, 8, ZERO_BLOCK_EXPONENT),
    (1e-45, 8, MIN_NORMAL_EXPONENT),  # float32's smallest subnormal: clamped to a normal scale
    (float(np.finfo(np.float32).max), 8, 127 - 8),
    (float(np.finfo(np.float32).max), 0, E8M0_MAX_EXPONENT),
]


@pytest.mark.parametrize(("amax", "emax", "exponent"), SHARED_EXPONENT_GOLDEN)
def test_shared_exponent_golden(amax: float, emax: int, exponent: int) -> None:
    assert int(mx_shared_exponent(np.float32(amax), emax)) == exponent
    assert float(e8m0_to_float32(mx_scale(np.float32(amax), emax))) == 2.0**exponent


FLOAT32_MAX = float(np.finfo(np.float32).max)
# (amax, element max, exponent): ceil(log2(amax / elem_max)), NVIDIA's MXFP8 recipe
ROUND_UP_GOLDEN = [
    (448.0, 448.0, 0),  # exactly on a power of two: no rounding up
    (448.00003, 448.0, 1),  # the next float32 above
    (224.0, 448.0, -1),
    (224.00002, 448.0, 0),
    (1.0, 448.0, -8),  # 1 / 448 = 2**-8.8
    (6.0, 6.0, 0),
    (0.0, 448.0, ZERO_BLOCK_EXPONENT),
    (1e-45, 448.0, MIN_NORMAL_EXPONENT),
]


@pytest.mark.parametrize(("amax", "elem_max", "exponent"), ROUND_UP_GOLDEN)
def test_round_up_exponent_golden(amax: float, elem_max: float, exponent: int) -> None:
    assert int(mx_shared_exponent_round_up(np.float32(amax), elem_max)) == exponent


positive32 = st.floats(min_value=2.0**-149, max_value=FLOAT32_MAX, width=32, allow_subnormal=True)


@FAST
@given(positive32)
def test_floor_log2_is_exact(amax: float) -> None:
    assert int(floor_log2(np.float32(amax))) == math.floor(math.log2(amax))


@FAST
@given(
    st.floats(min_value=2.0**-100, max_value=FLOAT32_MAX, width=32),
    st.sampled_from([FP8_E4M3_EMAX, FP4_E2M1_EMAX]),
)
def test_scaled_amax_lands_in_the_top_binade(amax: float, emax: int) -> None:
    scaled = np.float32(amax) / e8m0_to_float32(mx_scale(np.float32(amax), emax))
    assert 2.0**emax <= scaled < 2.0 ** (emax + 1)


@FAST
@given(st.floats(min_value=2.0**-100, max_value=FLOAT32_MAX, width=32))
def test_round_up_fits_amax_without_saturation(amax: float) -> None:
    scale = float(2.0 ** int(mx_shared_exponent_round_up(np.float32(amax), 448.0)))
    assert 224.0 < amax / scale <= 448.0


def test_bad_input_is_refused() -> None:
    for amax in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="finite"):
            mx_shared_exponent(np.float32(amax), 8)
    with pytest.raises(ValueError, match="exponents"):
        e8m0_from_exponent(np.array([128]))
