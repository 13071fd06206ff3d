"""MXFP8: E8M0 block scales by the OCP MX rule, FP8 values, and agreement with onnx.reference (opset 24)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats.e8m0 import FLOAT8_E8M0FNU, e8m0_to_float32
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN
from onnxq.formats.mxfp8 import (
    MXFP8_BLOCK_SIZE,
    MXFP8_MIN_OPSET,
    Mxfp8Tensor,
    ScaleRule,
    dequantize_mxfp8,
    fake_quantize_mxfp8,
    quantize_mxfp8,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


# (block amax, scale, dequantized amax): scale 2**(floor(log2(amax)) - 8); scaled values above 448 clip
GOLDEN = [
    (448.0, 1.0, 448.0),
    (500.0, 1.0, 448.0),  # 500 / 1 saturates to 448: the spec's rule rounds the exponent down
    (512.0, 2.0, 512.0),
    (1.0, 2.0**-8, 1.0),
    (3.0, 2.0**-7, 3.0),
    (0.0, 1.0, 0.0),  # all-zero block: scale 1.0
]


@pytest.mark.parametrize(("amax", "scale", "top"), GOLDEN)
def test_block_scale_golden(amax: float, scale: float, top: float) -> None:
    x = np.zeros((MXFP8_BLOCK_SIZE, 2), np.float32)
    x[5, 1] = amax
    x[0, 1] = amax / 3
    q = quantize_mxfp8(x, axis=0)
    assert q.scales.dtype == FLOAT8_E8M0FNU and q.scales.shape == (1, 2)
    assert e8m0_to_float32(q.scales).tolist() == [[1.0, scale]]  # column 0 is all zero
    deq = dequantize_mxfp8(q)
    assert float(deq[5, 1]) == top
    # amax / 3 is not on the grid: one FP8 rounding (3 mantissa bits) away from it
    assert float(deq[0, 1]) == pytest.approx(amax / 3, rel=2.0**-4)


def test_round_up_rule_never_clips() -> None:
    x = np.zeros((MXFP8_BLOCK_SIZE, 1), np.float32)
    x[0, 0] = 480.0  # the spec's rule (scale 1) clips it to 448; 480 / 2 = 240 is on the E4M3 grid
    q = quantize_mxfp8(x, axis=0, rule="round_up")
    assert float(e8m0_to_float32(q.scales)[0, 0]) == 2.0 and float(dequantize_mxfp8(q)[0, 0]) == 480.0
    with pytest.raises(ValueError, match="unknown MX scale rule"):
        quantize_mxfp8(x, axis=0, rule="nearest")  # type: ignore[arg-type]


def test_partial_last_block_has_its_own_scale() -> None:
    x = np.concatenate([np.full(32, 100.0), np.full(8, 0.01)]).astype(np.float32)
    q = quantize_mxfp8(x, axis=0)
    assert e8m0_to_float32(q.scales).tolist() == [2.0 ** (6 - 8), 2.0 ** (-7 - 8)]


def mxfp8_reference_model(q: Mxfp8Tensor, shape: tuple[int, ...]) -> onnx.ModelProto:
    """QuantizeLinear(x, e8m0 scales) and DequantizeLinear(values, e8m0 scales), opset 24."""
    attrs = {"axis": q.axis, "block_size": q.block_size}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["y"], output_dtype=TensorProto.FLOAT8E4M3FN, **attrs),
        helper.make_node("DequantizeLinear", ["w", "s"], ["deq"], output_dtype=TensorProto.FLOAT, **attrs),
    ]
    graph = helper.make_graph(
        nodes, "mxfp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, shape),
         helper.make_tensor_value_info("deq", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(q.scales, "s"), numpy_helper.from_array(q.values, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MXFP8_MIN_OPSET)])
    model.ir_version = 11
    onnx.checker.check_model(model, full_check=True)
    return model


def test_dequantize_without_output_dtype_is_rejected_by_the_checker() -> None:
    """Why the emitter always writes output_dtype: the output would take the E8M0 scale's type."""
    q = quantize_mxfp8(np.ones((32, 1), np.float32), axis=0)
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["deq"], axis=0, block_size=32)
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("deq", TensorProto.FLOAT, [32, 1])],
        [numpy_helper.from_array(q.scales, "s"), numpy_helper.from_array(q.values, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MXFP8_MIN_OPSET)])
    model.ir_version = 11
    with pytest.raises(onnx.shape_inference.InferenceError, match="float8e8m0"):
        onnx.checker.check_model(model, full_check=True)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1000, 1000, width=32)))
    magnitudes = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([1e-30, 1e-3, 1.0, 1e20])))
    return (x * magnitudes).astype(np.float32), draw(st.integers(-len(shape), len(shape) - 1))


@FAST
@given(tensors(), st.sampled_from(["ocp", "round_up"]))
def test_matches_onnx_reference(case: tuple[np.ndarray, int], rule: ScaleRule) -> None:
    x, axis = case
    q = quantize_mxfp8(x, axis, rule=rule)
    assert q.values.dtype == FLOAT8_E4M3FN
    y, deq = ReferenceEvaluator(mxfp8_reference_model(q, x.shape)).run(None, {"x": x})
    np.testing.assert_array_equal(q.values.view(np.uint8), y.view(np.uint8))
    ours = dequantize_mxfp8(q)
    np.testing.assert_array_equal(ours.view(np.uint32), deq.view(np.uint32))
    np.testing.assert_array_equal(fake_quantize_mxfp8(x, axis, rule), ours)
    # scaled block maxima: in E4M3's top binade [256, 512) by the spec's rule; at most 448 rounding up
    scaled = np.abs(x) / q.granularity.expand(e8m0_to_float32(q.scales), x.shape)
    assert scaled.max(initial=0.0) < (512 if rule == "ocp" else 448.0000001)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_mxfp8(np.array([np.inf], np.float32), axis=0)
    with pytest.raises(ValueError, match="not an integer"):
        quantize_mxfp8(np.ones(32, np.float32), axis=0, block_size=32.0)  # type: ignore[arg-type]
