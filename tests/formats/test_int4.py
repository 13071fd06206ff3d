"""INT4/UINT4 block-wise weights: golden code points and packing order, scale rules, and quantize /
dequantize against an independent numpy loop and ``onnx.reference.ReferenceEvaluator`` at opset 21."""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats import int4
from onnxq.formats.granularity import Granularity

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# every INT4 code: (code, its nibble as stored, two's complement)
INT4_CODE_POINTS = [
    (-8, 0x8), (-7, 0x9), (-6, 0xA), (-5, 0xB), (-4, 0xC), (-3, 0xD), (-2, 0xE), (-1, 0xF),
    (0, 0x0), (1, 0x1), (2, 0x2), (3, 0x3), (4, 0x4), (5, 0x5), (6, 0x6), (7, 0x7),
]  # fmt: skip
# every UINT4 code, and the MatMulNBits nibble that stores the same value as INT4 code - 8
UINT4_CODE_POINTS = [(code, code) for code in range(16)]
# (codes, dtype, packed bytes): element 2i in the low nibble, element 2i+1 in the high one, odd tail 0
PACKING_GOLDEN = [
    ([1, -2, 3], int4.INT4, bytes([0xE1, 0x03])),
    ([-8, 7], int4.INT4, bytes([0x78])),
    ([-1, -1, 0, 0], int4.INT4, bytes([0xFF, 0x00])),
    ([1, 2, 3, 4], int4.UINT4, bytes([0x21, 0x43])),
    ([15, 0, 9], int4.UINT4, bytes([0x0F, 0x09])),
]


def dequantize_model(dtype: int, shape: tuple[int, ...], attributes: dict[str, int]) -> onnx.ModelProto:
    """y = DequantizeLinear(x, scale, zero_point) at opset 21, every tensor an input."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "scale", "zp"], ["y"], **attributes)],
        "dq",
        [
            helper.make_tensor_value_info("x", dtype, shape),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("zp", dtype, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize(("code", "nibble"), INT4_CODE_POINTS)
def test_int4_code_points(code: int, nibble: int) -> None:
    array = np.array([code], int4.INT4)
    assert numpy_helper.from_array(array).raw_data == bytes([nibble])
    assert int4.pack_nibbles(array).tobytes() == bytes([nibble])
    assert int4.unpack_nibbles(np.array([nibble], np.uint8), 1, int4.INT4).tolist() == [code]
    # DequantizeLinear of the code with scale 0.5: the code's value, as ONNX defines it
    model = dequantize_model(TensorProto.INT4, (1,), {})
    feed = {"x": array, "scale": np.float32(0.5), "zp": np.array(0, int4.INT4)}
    (y,) = ReferenceEvaluator(model).run(None, feed)
    assert y.tolist() == [code * 0.5]


@pytest.mark.parametrize(("code", "nibble"), UINT4_CODE_POINTS)
def test_uint4_code_points_and_matmulnbits_shift(code: int, nibble: int) -> None:
    array = np.array([code], int4.UINT4)
    assert numpy_helper.from_array(array).raw_data == bytes([nibble])
    assert int4.pack_nibbles(array).tobytes() == bytes([nibble])
    model = dequantize_model(TensorProto.UINT4, (1,), {})
    feed = {
        "x": array,
        "scale": np.float32(0.5),
        "zp": np.array(int4.MATMULNBITS_DEFAULT_ZERO_POINT, int4.UINT4),
    }
    (y,) = ReferenceEvaluator(model).run(None, feed)
    assert y.tolist() == [(code - 8) * 0.5]  # the INT4 code - 8, stored + 8 by MatMulNBits


@pytest.mark.parametrize(("codes", "dtype", "packed"), PACKING_GOLDEN)
def test_packing_order(codes: list[int], dtype: np.dtype, packed: bytes) -> None:
    array = np.array(codes, dtype)
    assert numpy_helper.from_array(array).raw_data == packed
    assert int4.pack_nibbles(array).tobytes() == packed
    assert int4.unpack_nibbles(np.frombuffer(packed, np.uint8), len(codes), dtype).tolist() == codes


def test_odd_tail_fill_is_the_high_nibble() -> None:
    assert int4.pack_nibbles(np.array([3], int4.UINT4), fill=8).tobytes() == bytes([0x83])
    assert int4.pack_nibbles(np.array([[1, 2, 3]], int4.UINT4), fill=8).tolist() == [[0x21, 0x83]]


# (x, scale, zero point, dtype, expected code): round half to even, add the zero point, saturate
QUANTIZE_GOLDEN = [
    (0.0, 1.0, 0, int4.INT4, 0),
    (0.5, 1.0, 0, int4.INT4, 0),
    (1.5, 1.0, 0, int4.INT4, 2),
    (2.5, 1.0, 0, int4.INT4, 2),
    (-0.5, 1.0, 0, int4.INT4, 0),
    (-1.5, 1.0, 0, int4.INT4, -2),
    (-2.5, 1.0, 0, int4.INT4, -2),
    (6.5, 1.0, 0, int4.INT4, 6),
    (7.4, 1.0, 0, int4.INT4, 7),
    (7.5, 1.0, 0, int4.INT4, 7),  # rounds to 8, saturates
    (-7.5, 1.0, 0, int4.INT4, -8),
    (-8.5, 1.0, 0, int4.INT4, -8),
    (1e30, 1.0, 0, int4.INT4, 7),
    (math.inf, 1.0, 0, int4.INT4, 7),
    (-math.inf, 1.0, 0, int4.INT4, -8),
    (math.nan, 1.0, 0, int4.INT4, -8),
    (0.75, 0.5, 0, int4.INT4, 2),
    (1.0, 1 / 7, 0, int4.INT4, 7),
    (0.0, 1.0, 8, int4.UINT4, 8),
    (0.5, 1.0, 8, int4.UINT4, 8),
    (1.5, 1.0, 8, int4.UINT4, 10),
    (-8.0, 1.0, 8, int4.UINT4, 0),
    (-9.0, 1.0, 8, int4.UINT4, 0),
    (7.5, 1.0, 8, int4.UINT4, 15),  # 8 + 8 = 16 saturates
    (2.5, 1.0, 3, int4.UINT4, 5),
    (-math.inf, 1.0, 3, int4.UINT4, 0),
    (math.nan, 1.0, 3, int4.UINT4, 0),
]


@pytest.mark.parametrize(("x", "scale", "zp", "dtype", "code"), QUANTIZE_GOLDEN)
def test_quantize_golden(x: float, scale: float, zp: int, dtype: np.dtype, code: int) -> None:
    params = int4.BlockParams(np.array([scale], np.float32), np.array([zp], dtype), Granularity.block(0, 1))
    q = int4.quantize(np.array([x], np.float32), params)
    assert q.dtype == dtype
    assert q.tolist() == [code]
    assert int4.dequantize(q, params).tolist() == [np.float32((code - zp) * np.float32(scale))]


def test_scale_formulas() -> None:
    assert int4.int4_scale(7.0) == 1.0
    assert int4.int4_scale(np.float32(3.5)) == np.float32(0.5)
    assert int4.int4_scale(0.0) == 1.0  # all-zero block: any positive scale, never 0
    assert int4.uint4_scale(np.float32(-1.0), np.float32(0.5)) == np.float32(1.5) / np.float32(15)
    assert int4.uint4_scale(np.float32(0.0), np.float32(0.0)) == 1.0
    scale = int4.uint4_scale(np.float32(-1.0), np.float32(0.5))
    assert int4.uint4_zero_point(np.float32(-1.0), scale) == 10  # what MatMul4BitsQuantizer computes
    assert int4.uint4_zero_point(np.float32(0.0), np.float32(1.0)) == 0


def test_symmetric_params_put_the_block_amax_on_code_7() -> None:
    # K = 200 with blocks of 128: the second block has 72 rows and its own amax
    rng = np.random.default_rng(70)
    w = rng.standard_normal((200, 3)).astype(np.float32)
    params = int4.weight_params(w, axis=0, block_size=128)
    assert params.scale.shape == (2, 3) and params.zero_point.dtype == int4.INT4
    np.testing.assert_array_equal(params.scale[1], np.abs(w[128:]).max(axis=0) / np.float32(7))
    q = int4.quantize(w, params).astype(np.int8)
    assert q.max() == 7 and q.min() >= -7  # -8 stays unused on the symmetric grid
    for block in (q[:128], q[128:]):
        np.testing.assert_array_equal(np.abs(block).max(axis=0), 7)


def test_zero_point_params_make_zero_exact_and_span_the_range() -> None:
    w = np.array([[-1.0], [0.5], [0.25], [2.0], [3.0], [1.0]], np.float32)  # blocks of 3: [-1, .5], [0, 3]
    params = int4.weight_params(w, axis=0, block_size=3, zero_point=True)
    np.testing.assert_array_equal(params.scale, [[np.float32(1.5) / 15], [np.float32(3.0) / 15]])
    assert params.zero_point.dtype == int4.UINT4 and params.zero_point.tolist() == [[10], [0]]
    q = int4.quantize(w, params)
    zero = int4.quantize(np.zeros_like(w), params)
    assert int4.dequantize(zero, params).tolist() == [[0.0]] * 6
    assert q.astype(np.int16).min() == 0 and q.astype(np.int16).max() == 15


@pytest.mark.parametrize("zero_point", [False, True])
def test_all_zero_blocks_get_a_positive_scale_without_warnings(zero_point: bool) -> None:
    w = np.zeros((200, 4), np.float32)
    w[:128, 0] = 1.0  # one non-zero block; the others all zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = int4.weight_params(w, 0, 128, zero_point)
        out = int4.dequantize(int4.quantize(w, params), params)
    assert (params.scale > 0).all() and np.isfinite(params.scale).all()
    np.testing.assert_array_equal(out, w)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_is_rejected(value: float) -> None:
    w = np.ones((4, 2), np.float32)
    w[1, 1] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        int4.weight_params(w, 0, 2)


@pytest.mark.parametrize("block_size", [0, -128, 1.5, "128"])
def test_bad_block_size_is_rejected(block_size: object) -> None:
    with pytest.raises(ValueError, match="block size"):
        int4.weight_params(np.ones((4, 2), np.float32), 0, block_size)  # type: ignore[arg-type]


def reference_quantize(w: np.ndarray, block_size: int, zero_point: bool) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy reference along axis 0: (codes as int, dequantized float32), block by block."""
    codes = np.zeros(w.shape, np.int64)
    out = np.zeros(w.shape, np.float32)
    for start in range(0, w.shape[0], block_size):
        block = w[start : start + block_size]
        if zero_point:
            low, high = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
            scale = (high - low) / np.float32(15)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            zp = np.clip(np.rint(-low / scale), 0, 15)
            c = np.clip(np.rint(block / scale) + zp, 0, 15)
        else:
            scale = np.abs(block).max(axis=0) / np.float32(7)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            zp = np.zeros_like(scale)
            c = np.clip(np.rint(block / scale), -8, 7)
        codes[start : start + block_size] = c
        out[start : start + block_size] = ((c - zp) * scale).astype(np.float32)
    return codes, out


def quantize_linear_model(dtype: int, shape: tuple[int, ...], block_size: int) -> onnx.ModelProto:
    """x -> QuantizeLinear(axis 0, block_size) -> q -> DequantizeLinear -> y at opset 21."""
    attributes = {"axis": 0, "block_size": block_size}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attributes),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attributes),
        ],
        "qdq",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("zp", dtype, None),
        ],
        [
            helper.make_tensor_value_info("q", dtype, shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@FAST
@given(
    k=st.integers(1, 300),
    n=st.integers(1, 6),
    block_size=st.sampled_from([1, 7, 16, 32, 100, 128]),
    zero_point=st.booleans(),
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_quantize_matches_numpy_loop_and_onnx_reference(
    k: int, n: int, block_size: int, zero_point: bool, spread: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * spread).astype(np.float32)
    w[rng.random(w.shape) < 0.1] = 0.0
    params = int4.weight_params(w, 0, block_size, zero_point)
    q = int4.quantize(w, params)
    y = int4.dequantize(q, params)
    codes, expected = reference_quantize(w, block_size, zero_point)
    np.testing.assert_array_equal(q.astype(np.int64), codes)
    np.testing.assert_array_equal(y, expected)
    dtype = TensorProto.UINT4 if zero_point else TensorProto.INT4
    feed = {"x": w, "scale": params.scale, "zp": params.zero_point}
    q_onnx, y_onnx = ReferenceEvaluator(quantize_linear_model(dtype, w.shape, block_size)).run(None, feed)
    np.testing.assert_array_equal(np.asarray(q_onnx).astype(np.int64), codes)
    np.testing.assert_array_equal(y_onnx, y)


@FAST
@given(k=st.integers(1, 70), n=st.integers(1, 5), zero_point=st.booleans(), seed=st.integers(0, 2**16))
def test_unsigned_matmulnbits_codes_hold_the_same_values(k: int, n: int, zero_point: bool, seed: int) -> None:
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    params = int4.weight_params(w, 0, 16, zero_point)
    q = int4.quantize(w, params)
    unsigned, zero = int4.to_unsigned(q, params)
    assert unsigned.dtype == zero.dtype == int4.UINT4
    if not zero_point:
        assert (zero.astype(np.int64) == int4.MATMULNBITS_DEFAULT_ZERO_POINT).all()
    as_unsigned = int4.BlockParams(params.scale, zero, params.granularity)
    np.testing.assert_array_equal(int4.dequantize(unsigned, as_unsigned), int4.dequantize(q, params))
    # padded to whole blocks with each block's zero point: the padding dequantizes to 0.0
    blocks = int4.padded_blocks(unsigned, 0, 16, zero)
    assert blocks.shape == (n, -(-k // 16), 16)
    flat = blocks.reshape(n, -1).astype(np.float32) - np.repeat(zero.T.astype(np.float32), 16, axis=1)
    np.testing.assert_array_equal(flat[:, k:], 0.0)
    np.testing.assert_array_equal(
        flat[:, :k], unsigned.T.astype(np.float32) - np.repeat(zero.T, 16, axis=1)[:, :k].astype(np.float32)
    )


def test_ml_dtypes_int4_is_what_onnx_reads() -> None:
    """The storage dtypes are the ones onnx maps to INT4/UINT4 (so from_array packs them)."""
    assert numpy_helper.from_array(np.zeros(2, ml_dtypes.int4)).data_type == TensorProto.INT4
    assert numpy_helper.from_array(np.zeros(2, ml_dtypes.uint4)).data_type == TensorProto.UINT4


# (block values, expected full-range scale, expected codes): the largest magnitude, signed, over -8
FULL_RANGE_GOLDEN = [
    ([-1.0, 0.5], 0.125, [-8, 4]),
    ([1.0, -0.5], -0.125, [-8, 4]),  # positive extreme: negative scale, so it still lands on -8
    ([1.0, -1.0], 0.125, [7, -8]),  # a tie goes to the negative value; +1 saturates to 7
    ([0.0, 0.0], 1.0, [0, 0]),  # all zero: any positive scale
]


@pytest.mark.parametrize(("values", "scale", "codes"), FULL_RANGE_GOLDEN)
def test_full_range_puts_the_extreme_on_code_minus_8(
    values: list[float], scale: float, codes: list[int]
) -> None:
    w = np.array(values, np.float32).reshape(-1, 1)
    params = int4.weight_params(w, 0, len(values), full_range=True)
    assert params.scale.tolist() == [[scale]]
    assert int4.quantize(w, params).ravel().tolist() == codes


def reference_clipped(w: np.ndarray, block_size: int, zero_point: bool, ratio: np.ndarray) -> np.ndarray:
    """Independent loop: each block's range (amax, or min/max widened to 0) times its ratio, then
    QuantizeLinear/DequantizeLinear as ONNX defines them; dequantized float32."""
    out = np.zeros(w.shape, np.float32)
    for index, start in enumerate(range(0, w.shape[0], block_size)):
        block, r = w[start : start + block_size], ratio[index]
        if zero_point:
            low = np.minimum(block.min(axis=0), 0) * r
            high = np.maximum(block.max(axis=0), 0) * r
            scale = (high - low) / np.float32(15)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            zp = np.clip(np.rint(-low / scale), 0, 15)
            codes = np.clip(np.rint(block / scale) + zp, 0, 15)
        else:
            scale = np.abs(block).max(axis=0) * r / np.float32(7)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            zp = np.zeros_like(scale)
            codes = np.clip(np.rint(block / scale), -8, 7)
        out[start : start + block_size] = ((codes - zp) * scale).astype(np.float32)
    return out


@FAST
@given(
    k=st.integers(1, 200),
    n=st.integers(1, 5),
    block_size=st.sampled_from([1, 16, 32, 128]),
    zero_point=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_clip_ratio_shrinks_the_range_and_saturates_beyond_it(
    k: int, n: int, block_size: int, zero_point: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    blocks = -(-k // block_size)
    ratio = rng.uniform(0.3, 1.0, (blocks, n)).astype(np.float32)
    params = int4.weight_params(w, 0, block_size, zero_point, clip_ratio=ratio)
    y = int4.dequantize(int4.quantize(w, params), params)
    np.testing.assert_array_equal(y, reference_clipped(w, block_size, zero_point, ratio))
    # clipped values saturate: nothing dequantizes beyond the clipped range (INT4 code -8 lies 8/7
    # beyond it; UINT4's rounded zero point shifts the grid by at most one step)
    padded = np.pad(np.abs(w), ((0, blocks * block_size - k), (0, 0)))
    clipped = np.repeat(padded.reshape(blocks, block_size, n).max(axis=1) * ratio, block_size, axis=0)[:k]
    step = params.granularity.expand(params.scale, w.shape)
    limit = clipped + step if zero_point else clipped * np.float32(8 / 7) + step * 1e-6
    assert (np.abs(y) <= limit).all()


@pytest.mark.parametrize("zero_point", [False, True])
def test_clip_ratio_of_ones_is_bit_identical_to_no_clip(zero_point: bool) -> None:
    w = np.random.default_rng(71).standard_normal((200, 6)).astype(np.float32)
    plain = int4.weight_params(w, 0, 64, zero_point)
    ones = int4.weight_params(w, 0, 64, zero_point, clip_ratio=np.ones((4, 6), np.float32))
    np.testing.assert_array_equal(plain.scale, ones.scale)
    np.testing.assert_array_equal(plain.zero_point.astype(np.int8), ones.zero_point.astype(np.int8))


BAD_RATIOS = [np.zeros((2, 3)), np.full((2, 3), 1.5), np.full((2, 3), np.nan), np.ones((3, 2))]


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_bad_clip_ratio_is_rejected(ratio: np.ndarray) -> None:
    with pytest.raises(ValueError, match="clip ratio"):
        int4.weight_params(np.ones((200, 3), np.float32), 0, 128, clip_ratio=ratio)


@pytest.mark.parametrize(
    ("grid", "scales"),
    [
        # blocks of 4 along axis 0: column 0 has extreme -8.0, column 1 has extreme +7.0 (hand computed)
        ("amax/7", [[8.0 / 7, 1.0]]),
        ("amax/8", [[1.0, 7.0 / 8]]),
        ("signed", [[1.0, 1.0]]),
        ("full", [[1.0, -7.0 / 8]]),
    ],
)
def test_symmetric_grids_golden(grid: str, scales: list[list[float]]) -> None:
    w = np.array([[-8.0, 7.0], [1.0, -3.0], [2.0, 0.5], [4.0, -6.0]], dtype=np.float32)
    params = int4.weight_params(w, 0, 4, grid=grid)
    np.testing.assert_allclose(params.scale, np.array(scales, dtype=np.float32), rtol=1e-7)
    restored = int4.dequantize(int4.quantize(w, params), params)
    if grid == "signed":  # both extremes exact, never clipped
        assert restored[0, 0] == -8.0 and restored[0, 1] == 7.0
    with pytest.raises(ValueError, match="unknown INT4 grid"):
        int4.weight_params(w, 0, 4, grid="amax/6")
