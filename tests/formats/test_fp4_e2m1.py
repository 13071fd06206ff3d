"""FP4 E2M1: every code point, ties-to-even saturating rounding, and the nibble packing order."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats.fp4_e2m1 import (
    FLOAT4_E2M1FN,
    FP4_E2M1_EMAX,
    FP4_E2M1_MAX,
    FP4_E2M1_MIN_SUBNORMAL,
    FP4_E2M1_VALUES,
    fp4_codes,
    fp4_from_codes,
    pack_fp4,
    saturate_to_fp4,
    unpack_fp4,
)

# derandomize: the same examples on every run; no example database written into the repository
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)

# bit pattern -> value: sign | 2 exponent bits (bias 1) | 1 mantissa bit; exponent 00 is subnormal
CODE_POINTS = [
    (0b0000, 0.0),
    (0b0001, 0.5),  # the only subnormal: 0.1b * 2**0
    (0b0010, 1.0),
    (0b0011, 1.5),
    (0b0100, 2.0),
    (0b0101, 3.0),
    (0b0110, 4.0),
    (0b0111, 6.0),  # largest: 1.1b * 2**2
    (0b1000, -0.0),
    (0b1001, -0.5),
    (0b1010, -1.0),
    (0b1011, -1.5),
    (0b1100, -2.0),
    (0b1101, -3.0),
    (0b1110, -4.0),
    (0b1111, -6.0),
]


def same_float(a: float, b: float) -> bool:
    return a == b and math.copysign(1, a) == math.copysign(1, b)


@pytest.mark.parametrize(("bits", "value"), CODE_POINTS)
def test_code_points(bits: int, value: float) -> None:
    decoded = float(fp4_from_codes(np.array([bits], np.uint8)).astype(np.float32)[0])
    assert same_float(decoded, value)
    assert same_float(FP4_E2M1_VALUES[bits], value)
    # ml_dtypes agrees, and encoding the value gives back the same bits
    assert same_float(
        float(np.array([bits], np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)[0]), value
    )
    assert int(fp4_codes(saturate_to_fp4(np.array([value], np.float32)))[0]) == bits


def test_named_constants() -> None:
    info = ml_dtypes.finfo(ml_dtypes.float4_e2m1fn)
    assert float(info.max) == FP4_E2M1_MAX == 6.0
    assert float(info.smallest_subnormal) == FP4_E2M1_MIN_SUBNORMAL == 0.5
    assert 2.0**FP4_E2M1_EMAX <= FP4_E2M1_MAX < 2.0 ** (FP4_E2M1_EMAX + 1)
    assert len(CODE_POINTS) == 16 and sorted(b for b, _ in CODE_POINTS) == list(range(16))


# (x, expected): round to nearest, ties to the even code, saturate to +/-6
QUANTIZE_GOLDEN = [
    (0.25, 0.0),  # tie 0 / 0.5: code 0 is even
    (0.2500001, 0.5),
    (0.75, 1.0),  # tie 0.5 (code 1) / 1.0 (code 2)
    (1.25, 1.0),  # tie 1.0 (code 2) / 1.5 (code 3)
    (1.75, 2.0),  # tie 1.5 (code 3) / 2.0 (code 4)
    (2.5, 2.0),  # tie 2 (code 4) / 3 (code 5)
    (3.5, 4.0),  # tie 3 (code 5) / 4 (code 6)
    (5.0, 4.0),  # tie 4 (code 6) / 6 (code 7)
    (5.0000005, 6.0),
    (-5.0, -4.0),
    (-0.1, -0.0),
    (6.0, 6.0),
    (6.5, 6.0),  # overflow saturates
    (7.0, 6.0),
    (1e30, 6.0),
    (-1e30, -6.0),
    (math.inf, 6.0),
    (-math.inf, -6.0),
]


@pytest.mark.parametrize(("x", "expected"), QUANTIZE_GOLDEN)
def test_quantize_golden(x: float, expected: float) -> None:
    q = saturate_to_fp4(np.array([x], np.float32))
    assert q.dtype == FLOAT4_E2M1FN
    assert same_float(float(q.astype(np.float32)[0]), expected)


def reference_round(x: np.ndarray) -> np.ndarray:
    """Independent reference: nearest grid value, ties to the even code, by brute force over 16 codes."""
    grid = np.array(FP4_E2M1_VALUES[:8], np.float64)
    mag = np.minimum(np.abs(x.astype(np.float64)), FP4_E2M1_MAX)[..., None]
    distance = np.abs(mag - grid)
    best = distance.min(axis=-1, keepdims=True)
    candidates = np.where(distance == best, np.arange(8), 99)
    # among tied codes, the even one (codes 0..7: an even code has mantissa bit 0)
    code = np.where((candidates % 2 == 0) & (candidates < 99), candidates, 99).min(axis=-1)
    code = np.where(code == 99, candidates.min(axis=-1), code)
    return np.copysign(grid[code], x)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=True)


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=finite32))
def test_rounding_matches_brute_force_and_ml_dtypes(x: np.ndarray) -> None:
    q = saturate_to_fp4(x).astype(np.float32)
    np.testing.assert_array_equal(q, reference_round(x).astype(np.float32))
    np.testing.assert_array_equal(np.signbit(q), np.signbit(x))
    np.testing.assert_array_equal(q, x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def test_rounding_matches_onnx_quantize_linear() -> None:
    """QuantizeLinear(x, 1.0) to FLOAT4E2M1 at opset 23 (saturate=1) on every midpoint and around it.

    ``output_dtype`` rather than a zero point selects the type: onnx.reference adds a given zero point
    (``-0.0 + 0.0 = +0.0``), which would turn -0 into +0.
    """
    grid = np.array(FP4_E2M1_VALUES[:8], np.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    around = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, 10), grid, [7, 1e9, np.inf]])
    x = np.concatenate([around, -around]).astype(np.float32)
    node = helper.make_node(
        "QuantizeLinear", ["x", "s"], ["y"], saturate=1, output_dtype=TensorProto.FLOAT4E2M1
    )
    graph = helper.make_graph(
        [node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT4E2M1, [x.size])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    onnx.checker.check_model(model, full_check=True)
    (expected,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_array_equal(fp4_codes(saturate_to_fp4(x)), fp4_codes(expected))


# values -> packed bytes: element 2i in the low nibble, 2i + 1 in the high nibble
PACKING_GOLDEN = [
    ([1.0, -6.0], [0xF2]),  # 1.0 = 0x2 low, -6 = 0xF high
    ([1.0, -6.0, 0.5], [0xF2, 0x01]),  # odd count: the last high nibble is 0
    ([0.0, 6.0, -0.5, 3.0], [0x70, 0x59]),
    ([-0.0], [0x08]),
]


@pytest.mark.parametrize(("values", "packed"), PACKING_GOLDEN)
def test_packing_golden(values: list[float], packed: list[int]) -> None:
    q = saturate_to_fp4(np.array(values, np.float32))
    assert pack_fp4(q).tolist() == packed
    # the layout ONNX writes: numpy_helper and onnx_ir pack the same way
    assert list(numpy_helper.from_array(q, "w").raw_data) == packed
    assert list(ir.tensor(q).tobytes()) == packed
    np.testing.assert_array_equal(fp4_codes(unpack_fp4(np.array(packed, np.uint8), q.shape)), fp4_codes(q))


@FAST
@given(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7), elements=st.integers(0, 15))
)
def test_pack_round_trip_and_onnx_layout(codes: np.ndarray) -> None:
    q = fp4_from_codes(codes)
    packed = pack_fp4(q)
    assert packed.tobytes() == numpy_helper.from_array(q, "w").raw_data
    np.testing.assert_array_equal(fp4_codes(unpack_fp4(packed, q.shape)), codes)


def test_bad_codes_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="4-bit"):
        fp4_from_codes(np.array([16], np.uint8))
    with pytest.raises(ValueError, match="do not hold"):
        unpack_fp4(np.zeros(2, np.uint8), (5,))
