"""The FP4 GEMM plugin's numpy reference against an independent computation.

Independent: nibbles split with bit operations, FP4 codes decoded through ml_dtypes' float4_e2m1fn,
FP8 scales through float8_e4m3fn, the product in float64. Also: golden cases built from known codes,
the packing layout (low nibble first, row by row), the bias, bfloat16, uint8 scale bit patterns, the
op under onnx.reference.ReferenceEvaluator, and refusals of malformed shapes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats.nvfp4 import quantize_nvfp4
from onnxq.plugins import fp4_gemm_description, fp4_gemm_reference, pack_fp4_weight
from onnxq.plugins.fp4_gemm import Fp4GemmPlugin, dequantize_fp4_weight

BLOCK = 16
FP4_VALUES = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
FP16_ULP = 2.0**-10
BF16_ULP = 2.0**-7


def random_weight(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(w_packed [N, K/2], FP8 scales [N, K/16], global scale) from random codes and scales."""
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scales = rng.uniform(0.01, 400, size=(n, k // BLOCK)).astype(ml_dtypes.float8_e4m3fn)
    return packed, scales, np.float32(rng.uniform(1e-4, 1e-2))


def independent(
    x: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    g: float | np.floating,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    low, high = packed & 0x0F, packed >> 4
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = low, high
    scale64 = np.repeat(scales.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * float(g), BLOCK, axis=1)
    y = x.astype(np.float64) @ (FP4_VALUES[codes] * scale64).T
    return y if bias is None else y + bias.astype(np.float64)


def assert_close_in_type(actual: np.ndarray, expected64: np.ndarray, ulp: float) -> None:
    """Within 2 ulps of the output type, relative to the output's magnitude (float32 accumulation)."""
    magnitude = np.abs(expected64).max()
    np.testing.assert_allclose(
        actual.astype(np.float64), expected64, rtol=2 * ulp, atol=2 * ulp * magnitude * 1e-2
    )


@pytest.mark.parametrize(("m", "n", "k"), [(1, 8, 16), (5, 24, 64), (16, 40, 256)])
def test_reference_matches_independent_float16(m: int, n: int, k: int) -> None:
    rng = np.random.default_rng(m * 1000 + n + k)
    packed, scales, g = random_weight(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float16)
    y = fp4_gemm_reference(x, packed, scales, g)
    assert y.dtype == np.float16 and y.shape == (m, n)
    assert_close_in_type(y, independent(x, packed, scales, g), FP16_ULP)


def test_bfloat16_bias_and_rank3() -> None:
    rng = np.random.default_rng(3)
    packed, scales, g = random_weight(rng, 12, 32)
    x = rng.standard_normal((2, 3, 32)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(12).astype(ml_dtypes.bfloat16)
    y = fp4_gemm_reference(x, packed, scales, g, bias)
    assert y.dtype == ml_dtypes.bfloat16 and y.shape == (2, 3, 12)
    assert_close_in_type(y, independent(x, packed, scales, g, bias), BF16_ULP)


def test_uint8_scale_bit_patterns_equal_fp8_scales() -> None:
    rng = np.random.default_rng(4)
    packed, scales, g = random_weight(rng, 8, 32)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(
        fp4_gemm_reference(x, packed, scales.view(np.uint8), g), fp4_gemm_reference(x, packed, scales, g)
    )


def test_golden_constant_codes() -> None:
    """Every code 0x2 (1.0) with block scale 2 and global 0.5: each weight is 1, y is the row sum of x."""
    n, k = 4, 48
    packed = np.full((n, k // 2), 0x22, np.uint8)
    scales = np.full((n, k // BLOCK), 2.0, ml_dtypes.float8_e4m3fn)
    x = np.arange(2 * k, dtype=np.float32).reshape(2, k) / k
    y = fp4_gemm_reference(x, packed, scales, np.float32(0.5))
    np.testing.assert_allclose(y, np.repeat(x.sum(axis=1, keepdims=True), n, axis=1), rtol=1e-6)


def test_golden_low_nibble_is_the_even_element() -> None:
    """Byte 0x7A: element 0 is code 0xA (-1.0), element 1 is code 0x7 (6.0)."""
    packed = np.zeros((1, 8), np.uint8)
    packed[0, 0] = 0x7A
    scales = np.ones((1, 1), ml_dtypes.float8_e4m3fn)
    weight = dequantize_fp4_weight(packed, scales, 1.0)
    assert weight[0, 0] == FP4_VALUES[0xA] and weight[0, 1] == FP4_VALUES[0x7]
    assert not weight[0, 2:].any()


def test_weights_equal_onnxq_nvfp4_dequantization() -> None:
    """pack_fp4_weight + dequantize_fp4_weight give bit for bit the two-DQ weights of onnxq's NVFP4."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 64)).astype(np.float32)  # [N, K], blocks along K
    q = quantize_nvfp4(w, axis=1)
    from onnxq.formats.nvfp4 import dequantize_nvfp4

    expected = dequantize_nvfp4(q)
    actual = dequantize_fp4_weight(pack_fp4_weight(q.values), q.block_scales, q.global_scale)
    np.testing.assert_array_equal(actual, expected)


def test_reference_evaluator_runs_the_plugin_node() -> None:
    description = fp4_gemm_description()
    rng = np.random.default_rng(6)
    packed, scales, g = random_weight(rng, 16, 32)
    bias = rng.standard_normal(16).astype(np.float16)
    inits = [
        onnx.numpy_helper.from_array(packed, "w"),
        onnx.numpy_helper.from_array(scales, "s"),
        onnx.numpy_helper.from_array(np.array([g], np.float32), "g"),
        onnx.numpy_helper.from_array(bias, "b"),
    ]
    attributes = description.onnx_attributes({"k": 32, "n": 16})
    node = helper.make_node(
        description.name, ["x", "w", "s", "g", "b"], ["y"], domain=description.onnx_domain
    )
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attributes.items())
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, 16])], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, ir_version=11,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(description.onnx_domain, 1)],
    )  # fmt: skip
    x = rng.standard_normal((3, 32)).astype(np.float16)
    (y,) = ReferenceEvaluator(model, new_ops=[Fp4GemmPlugin]).run(None, {"x": x})
    np.testing.assert_array_equal(y, fp4_gemm_reference(x, packed, scales, g, bias))


@pytest.mark.parametrize(
    ("x_shape", "packed_shape", "scales_shape"),
    [((2, 30), (8, 16), (8, 2)), ((2, 32), (8, 16), (8, 3)), ((2, 24), (8, 12), (8, 1))],
)
def test_malformed_shapes_are_refused(
    x_shape: tuple[int, ...], packed_shape: tuple[int, ...], scales_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError):
        fp4_gemm_reference(
            np.zeros(x_shape, np.float16), np.zeros(packed_shape, np.uint8),
            np.ones(scales_shape, ml_dtypes.float8_e4m3fn), 1.0,
        )  # fmt: skip
