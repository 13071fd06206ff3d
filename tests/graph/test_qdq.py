"""Q/DQ insertion (onnxq/graph/qdq.py) on hand-built graphs and hand-written plans."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx_ir as ir
import pytest
from model_builders import build, randn, run, snr_db
from onnx import TensorProto

import onnxq
from onnxq.formats import get_format
from onnxq.formats.base import QuantParams
from onnxq.graph import passes, qdq
from onnxq.graph.qdq import insert_qdq
from onnxq.placement.plan import QuantizedTensor

Q, DQ = "QuantizeLinear", "DequantizeLinear"
INT8, UINT8, FP8 = get_format("int8"), get_format("uint8"), get_format("fp8")


def weight(name: str, axis: int | None, *consumers: tuple[str, int]) -> QuantizedTensor:
    return QuantizedTensor(name, "weight", axis, frozenset(consumers), False, None)


def activation(name: str, *consumers: tuple[str, int], all_consumers: bool = False) -> QuantizedTensor:
    return QuantizedTensor(name, "activation", None, frozenset(consumers), all_consumers, None)


def params(fmt, scale: float = 0.05, zero_point: int = 0) -> QuantParams:
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, fmt.numpy_dtype))


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def finish(model: ir.Model) -> onnx.ModelProto:
    """What onnxq.quantize does after insertion (topological sort), then the full checker."""
    passes.clean_up(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


SHARED_WEIGHT = """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] a, float[N, 32, 8, 8] b) {
    [conv_a] a = Conv<pads = [1, 1, 1, 1]>(x, w)
    [conv_b] b = Conv<pads = [1, 1, 1, 1]>(x, w)
}"""


def shared_weight_model(seed: int = 60) -> onnx.ModelProto:
    return build(SHARED_WEIGHT, {"w": randn(np.random.default_rng(seed), 32, 16, 3, 3)})


# ----------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize(
    ("fmt", "dtype", "opset"),
    [(INT8, ir.DataType.INT8, 17), (FP8, ir.DataType.FLOAT8E4M3FN, 19)],
    ids=["int8", "fp8"],
)
def test_weight_is_stored_quantized_in_the_format_dtype(fmt, dtype, opset: int) -> None:
    rng = np.random.default_rng(61)
    w = randn(rng, 32, 16, 3, 3)
    original = build(
        "g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) { [conv] y = Conv<pads = [1, 1, 1, 1]>(x, w) }",
        {"w": w},
        opset,
    )
    model = ir.serde.deserialize_model(original)
    stats = insert_qdq(model, [weight("w", 0, ("conv", 1))], {}, fmt, fmt)

    assert (stats.weights, stats.activations) == (1, 0)
    assert (stats.weight_bytes_before, stats.weight_bytes_after) == (w.size * 4, w.size)
    assert "w" not in model.graph.initializers, "the float weight is released"
    dequantize = node(model, "conv").inputs[1].producer()
    assert dequantize is not None and dequantize.op_type == DQ
    assert dequantize.attributes.get_int("axis") == 0
    stored, scale, zero_point = (v.const_value for v in dequantize.inputs)
    assert stored.dtype == dtype and stored.shape == (32, 16, 3, 3)
    assert scale.dtype == ir.DataType.FLOAT and scale.shape == (32,)
    assert zero_point.dtype == dtype and zero_point.shape == (32,)
    expected = fmt.weight_params(w, 0)
    np.testing.assert_array_equal(scale.numpy(), expected.scale)
    np.testing.assert_array_equal(stored.numpy().view(np.uint8), fmt.quantize(w, expected).view(np.uint8))
    assert not np.any(zero_point.numpy().astype(np.float32))
    assert dequantize.outputs[0].dtype == ir.DataType.FLOAT and dequantize.outputs[0].shape == (32, 16, 3, 3)

    proto = finish(model)
    assert [n.op_type for n in proto.graph.node] == [DQ, "Conv"]
    feed = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    assert snr_db(run(original, feed)[0], run(proto, feed)[0]) > (35 if fmt is INT8 else 25)


def test_float16_weight_keeps_a_float16_scale() -> None:
    rng = np.random.default_rng(62)
    original = build(
        "g (float16[N, 16, 8, 8] x) => (float16[N, 32, 8, 8] y) { [conv] y = Conv<pads = [1, 1, 1, 1]>(x, w) }",
        {"w": randn(rng, 32, 16, 3, 3).astype(np.float16)},
        opset=19,
    )
    model = ir.serde.deserialize_model(original)
    insert_qdq(model, [weight("w", 0, ("conv", 1))], {}, INT8, INT8)
    dequantize = node(model, "conv").inputs[1].producer()
    assert dequantize.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    assert dequantize.outputs[0].dtype == ir.DataType.FLOAT16
    proto = finish(model)
    feed = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float16)}
    assert snr_db(run(original, feed)[0], run(proto, feed)[0]) > 30


def test_shared_weight_keeps_float_for_the_unquantized_consumer() -> None:
    original = shared_weight_model()
    model = ir.serde.deserialize_model(original)
    insert_qdq(model, [weight("w", 0, ("conv_a", 1))], {}, INT8, INT8)
    assert node(model, "conv_a").inputs[1].producer().op_type == DQ
    float_weight = node(model, "conv_b").inputs[1]
    assert float_weight.name == "w" and float_weight.producer() is None
    assert model.graph.initializers["w"] is float_weight
    assert float_weight.const_value.dtype == ir.DataType.FLOAT
    proto = finish(model)
    feed = {"x": np.random.default_rng(63).standard_normal((2, 16, 8, 8)).astype(np.float32)}
    reference, quantized = run(original, feed), run(proto, feed)
    np.testing.assert_array_equal(quantized[1], reference[1])  # conv_b is untouched
    assert 35 < snr_db(reference[0], quantized[0]) < math.inf


def test_shared_weight_with_excluded_consumer_end_to_end() -> None:
    original = shared_weight_model()
    rng = np.random.default_rng(64)
    result = onnxq.quantize(
        original,
        calibration_data={"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)},
        exclude_nodes="conv_b",
        high_precision="fp32",
    )
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    conv_a, conv_b = (next(n for n in proto.graph.node if n.name == name) for name in ("conv_a", "conv_b"))
    producers = {out: n for n in proto.graph.node for out in n.output}
    assert producers[conv_a.input[1]].op_type == DQ and producers[conv_a.input[0]].op_type == DQ
    assert conv_b.input[0] == "x" and conv_b.input[1] == "w"
    float_w = next(t for t in proto.graph.initializer if t.name == "w")
    assert float_w.data_type == TensorProto.FLOAT
    feed = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    reference, quantized = run(original, feed), run(proto, feed)
    np.testing.assert_array_equal(quantized[1], reference[1])
    assert snr_db(reference[0], quantized[0]) > 30


def test_shared_weight_quantized_for_both_consumers_has_one_dequantize() -> None:
    model = ir.serde.deserialize_model(shared_weight_model())
    stats = insert_qdq(model, [weight("w", 0, ("conv_a", 1), ("conv_b", 1))], {}, INT8, INT8)
    assert stats.weights == 1
    assert node(model, "conv_a").inputs[1] is node(model, "conv_b").inputs[1]
    assert "w" not in model.graph.initializers
    proto = finish(model)
    assert [n.op_type for n in proto.graph.node].count(DQ) == 1


def test_shared_weight_gets_each_consumers_output_channel_axis() -> None:
    rng = np.random.default_rng(65)
    original = build(
        """g (float[N, 32] x) => (float[N, 32] y, float[N, 32] z) {
            [mm] y = MatMul(x, w)
            [fc] z = Gemm<transB = 1>(x, w)
        }""",
        {"w": randn(rng, 32, 32)},
    )
    result = onnxq.quantize(original, calibration_data={"x": rng.standard_normal((8, 32)).astype(np.float32)})
    uses = {(u.node, u.axis) for d in result.plan.decisions for u in d.uses if u.tensor == "w"}
    assert uses == {("mm", 1), ("fc", 0)}  # the plan itself is right
    proto = ir.serde.serialize_model(result.model)
    producers = {out: n for n in proto.graph.node for out in n.output}
    axes = {}
    for name in ("mm", "fc"):
        consumer = next(n for n in proto.graph.node if n.name == name)
        dequantize = producers[consumer.input[1]]
        axes[name] = next((a.i for a in dequantize.attribute if a.name == "axis"), None)
    assert axes == {"mm": 1, "fc": 0}


# ----------------------------------------------------------------------------------------------
# activations

ACTIVATION_CONSUMERS = """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] a, float[N, 16, 8, 8] r, float[N, 16, 8, 8] s) {
    [conv] a = Conv<pads = [1, 1, 1, 1]>(x, w)
    [relu] r = Relu(x)
    [add] s = Add(x, x)
}"""


def test_activation_qdq_replaces_only_the_planned_inputs() -> None:
    original = build(ACTIVATION_CONSUMERS, {"w": randn(np.random.default_rng(66), 32, 16, 3, 3)})
    model = ir.serde.deserialize_model(original)
    x = model.graph.inputs[0]
    stats = insert_qdq(model, [activation("x", ("conv", 0), ("add", 1))], {"x": params(INT8)}, INT8, INT8)
    assert stats.activations == 1
    dequantized = node(model, "conv").inputs[0]
    assert dequantized.producer().op_type == DQ
    assert dequantized.producer().inputs[0].producer().op_type == Q
    assert node(model, "add").inputs[1] is dequantized
    assert node(model, "add").inputs[0] is x
    assert node(model, "relu").inputs[0] is x
    assert model.graph.inputs[0] is x and x.name == "x"
    assert sorted(use.node.op_type for use in x.uses()) == sorted([Q, "Relu", "Add"])
    proto = finish(model)
    feed = {"x": np.random.default_rng(67).standard_normal((2, 16, 8, 8)).astype(np.float32)}
    reference, quantized = run(original, feed), run(proto, feed)
    np.testing.assert_array_equal(quantized[1], reference[1])  # Relu reads float x
    assert not np.array_equal(quantized[2], reference[2])  # Add reads one quantized x
    fake = INT8.dequantize(INT8.quantize(feed["x"], params(INT8)), params(INT8))
    np.testing.assert_allclose(quantized[2], feed["x"] + fake, rtol=1e-6)


def test_all_consumers_activation_leaves_the_graph_output_float() -> None:
    original = build(
        """g (float[N, 16] x) => (float[N, 16] r, float[N, 16] y) {
            [relu] r = Relu(x)
            [neg] n = Neg(r)
            [add] y = Add(n, r)
        }""",
        {},
    )
    model = ir.serde.deserialize_model(original)
    r = node(model, "relu").outputs[0]
    insert_qdq(model, [activation("r", all_consumers=True)], {"r": params(UINT8, 0.01)}, UINT8, INT8)
    assert node(model, "neg").inputs[0].producer().op_type == DQ
    assert node(model, "add").inputs[1] is node(model, "neg").inputs[0]
    assert model.graph.outputs[0] is r and r.producer().op_type == "Relu"
    proto = finish(model)
    assert [n.op_type for n in proto.graph.node] == ["Relu", Q, DQ, "Neg", "Add"]


def test_activation_without_parameters_is_left_float() -> None:
    original = build(ACTIVATION_CONSUMERS, {"w": randn(np.random.default_rng(68), 32, 16, 3, 3)})
    model = ir.serde.deserialize_model(original)
    stats = insert_qdq(model, [activation("x", ("conv", 0))], {}, INT8, INT8)
    assert stats.activations == 0
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Add"]


@pytest.mark.parametrize(
    ("fmt", "dtype", "zero_point"),
    [(INT8, ir.DataType.INT8, 0), (UINT8, ir.DataType.UINT8, 128), (FP8, ir.DataType.FLOAT8E4M3FN, 0)],
    ids=["int8", "uint8", "fp8"],
)
def test_activation_qdq_types(fmt, dtype, zero_point: int) -> None:
    model = ir.serde.deserialize_model(
        build("g (float[N, 16] x) => (float[N, 16] y) { [relu] y = Relu(x) }", {}, opset=19)
    )
    insert_qdq(model, [activation("x", ("relu", 0))], {"x": params(fmt, 0.02, zero_point)}, fmt, INT8)
    dequantize = node(model, "relu").inputs[0].producer()
    quantize = dequantize.inputs[0].producer()
    assert quantize.inputs[1] is dequantize.inputs[1] and quantize.inputs[2] is dequantize.inputs[2]
    scale, zp = quantize.inputs[1].const_value, quantize.inputs[2].const_value
    assert scale.dtype == ir.DataType.FLOAT and scale.shape == () and float(scale.numpy()) == np.float32(0.02)
    assert zp.dtype == dtype and zp.shape == () and float(zp.numpy().astype(np.float32)) == zero_point
    assert quantize.outputs[0].dtype == dtype
    assert "axis" not in quantize.attributes and "axis" not in dequantize.attributes
    proto = finish(model)
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    p = params(fmt, 0.02, zero_point)
    np.testing.assert_allclose(run(proto, {"x": x})[0], np.maximum(fmt.dequantize(fmt.quantize(x, p), p), 0))


# ----------------------------------------------------------------------------------------------
# float16 / bfloat16 tensors


def fp16_conv(opset: int, w: np.ndarray) -> onnx.ModelProto:
    return build(
        "g (float16[N, 16, 8, 8] x) => (float16[N, 32, 8, 8] y) { [conv] y = Conv<pads = [1, 1, 1, 1]>(x, w) }",
        {"w": w},
        opset,
    )


def test_float16_tensor_below_opset_19_is_refused_not_written_invalid() -> None:
    w = randn(np.random.default_rng(90), 32, 16, 3, 3).astype(np.float16)
    model = ir.serde.deserialize_model(fp16_conv(17, w))
    with pytest.raises(ValueError, match="opset 19"):
        insert_qdq(model, [activation("x", ("conv", 0))], {"x": params(INT8)}, INT8, INT8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }", 0),
        ("g (float16[N, 4] x) => (float16[N, 4] y) { y = Relu(x) }", 19),
        ("g (bfloat16[N, 4] x) => (bfloat16[N, 4] y) { y = Relu(x) }", 19),
        # float in and out, float16 inside (a Cast whose output type is not inferred yet)
        (
            "g (float[N, 4] x) => (float[N, 4] y) { h = Cast<to = 10>(x)\n r = Relu(h)\n y = Cast<to = 1>(r) }",
            19,
        ),
        ("g (float[N, 4] x) => (float[N, 4] y) { c = Constant<value = float16[1] {1}>()\n y = Relu(x) }", 19),
        ("g (float[N, 4] x) => (float[N, 4] y) { h = Cast<to = 999>(x)\n y = Relu(x) }", 0),
    ],
    ids=["float32", "float16", "bfloat16", "cast-inside", "constant-inside", "unknown-cast-code"],
)
def test_required_opset_follows_the_float_types(text: str, expected: int) -> None:
    model = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : 17]>\n{text}')
    assert qdq.required_opset(ir.serde.deserialize_model(model)) == expected


def test_float16_scale_is_clamped_to_the_normal_range() -> None:
    # 1e-6 / 127 underflows to 0 in float16 (and 1e-3 / 127 is subnormal): x / 0 would be inf
    scale = qdq.scale_in_type(np.array([1e-6 / 127, 1e-3 / 127, 0.5, 1e6], np.float32), np.dtype(np.float16))
    smallest_normal = np.finfo(np.float16).smallest_normal
    assert scale.dtype == np.float16
    assert np.all(scale >= smallest_normal) and np.all(np.isfinite(scale))
    assert scale[2] == np.float16(0.5)
    untouched = np.array([1e-30, 3.0], np.float32)
    np.testing.assert_array_equal(qdq.scale_in_type(untouched, np.dtype(np.float32)), untouched)


def test_float16_weight_codes_match_the_stored_float16_scale() -> None:
    rng = np.random.default_rng(91)
    w = randn(rng, 32, 16, 3, 3)
    w[3] *= 1e-5  # a channel whose float32 scale (about 3e-8) has no float16 normal counterpart
    w = w.astype(np.float16)
    model = ir.serde.deserialize_model(fp16_conv(19, w))
    insert_qdq(model, [weight("w", 0, ("conv", 1))], {}, INT8, INT8)
    dequantize = node(model, "conv").inputs[1].producer()
    stored, scale, _ = (v.const_value.numpy() for v in dequantize.inputs)
    assert scale.dtype == np.float16 and np.all(scale >= np.finfo(np.float16).smallest_normal)
    restored = stored.astype(np.float32) * scale.astype(np.float32).reshape(-1, 1, 1, 1)
    # every code is the stored-scale rounding of its weight: error at most half a step of that scale
    step = scale.astype(np.float32).reshape(-1, 1, 1, 1)
    assert np.all(np.abs(restored - w.astype(np.float32)) <= step / 2 + 1e-7)
    finish(model)


def test_bfloat16_weight_and_activation_get_bfloat16_scales() -> None:
    """ONNX Runtime's CPU provider runs no bfloat16 Q/DQ, so the checker is the judge here."""
    rng = np.random.default_rng(92)
    original = build(
        "g (bfloat16[N, 64] x) => (bfloat16[N, 64] y) { [mm] y = MatMul(x, m) }",
        {"m": randn(rng, 64, 64).astype(ml_dtypes.bfloat16)},
        opset=19,
    )
    model = ir.serde.deserialize_model(original)
    insert_qdq(
        model, [weight("m", 1, ("mm", 1)), activation("x", ("mm", 0))], {"x": params(INT8)}, INT8, INT8
    )
    proto = finish(model)
    initializers = {t.name: t.data_type for t in proto.graph.initializer}
    scales = {initializers[n.input[1]] for n in proto.graph.node if n.op_type in (Q, DQ)}
    assert scales == {TensorProto.BFLOAT16}
