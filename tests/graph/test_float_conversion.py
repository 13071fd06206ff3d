"""FP16/BF16 conversion of the float32 part of a model (``onnxq.graph.float_conversion``).

References: the float32 model run in ONNX Runtime (float16 models run there too), numpy for what
float16 does to a value, ``onnx.reference.ReferenceEvaluator`` for bfloat16 (no ORT CPU kernels) and FP4.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx.shape_inference
import onnx_ir as ir
import pytest
from model_builders import (
    IR_VERSION,
    attention_inputs,
    build,
    cnn_inputs,
    masked_attention,
    residual_cnn,
    run,
    snr_db,
)
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxq
from onnxq.errors import OnnxqError
from onnxq.graph import passes
from onnxq.graph.float_conversion import (
    DEFAULT_KEEP_FP32_OPS,
    FP16_RANGE_MARGIN,
    FP16_SAFE_LIMIT,
    ConversionReport,
    convert_float_precision,
)

#: the issue's bar for float16 conversion of a float32 model
MIN_FP16_SNR_DB = 40.0
#: the float16 rest of a quantized model may cost at most this much SNR against its float32 rest
QUANTIZED_MARGIN_DB = 1.0
#: bfloat16 keeps 8 significant bits: about 48 dB per rounding, less after a few layers
MIN_BF16_SNR_DB = 35.0
FP16 = np.finfo(np.float16)


def converted(
    proto: onnx.ModelProto, to: str = "fp16", **options: object
) -> tuple[onnx.ModelProto, ConversionReport]:
    model = ir.serde.deserialize_model(proto)
    report = convert_float_precision(model, to, **options)  # type: ignore[arg-type]
    result = ir.serde.serialize_model(model)
    onnx.checker.check_model(result, full_check=True)
    onnx.shape_inference.infer_shapes(result, check_type=True, strict_mode=True)
    return result, report


def elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed value: inputs, outputs, value_info and initializers."""
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    }
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types


def evaluate_all(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs as computed by the reference evaluator (numpy semantics for every type)."""
    outputs: Any = ReferenceEvaluator(proto).run(None, feed)
    return [np.asarray(o) for o in outputs]


def evaluate(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return evaluate_all(proto, feed)[0]


def casts_after_dequantize(proto: onnx.ModelProto) -> list[str]:
    producers = {output: node for node in proto.graph.node for output in node.output}
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "Cast"
        and n.input[0] in producers
        and producers[n.input[0]].op_type == "DequantizeLinear"
    ]


def minus_1e9_attention() -> onnx.ModelProto:
    """The attention block with the mask constant most exporters write: -1e9 instead of -inf."""
    proto = masked_attention()
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name == "minus_inf":
            proto.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(np.array(-1e9, np.float32), "minus_inf")
            )
    return proto


def folded_cnn() -> onnx.ModelProto:
    model = ir.serde.deserialize_model(residual_cnn())
    assert passes.fold_batch_norm(model) == 1
    passes.clean_up(model)  # drops the BatchNorm parameters
    return ir.serde.serialize_model(model)


# --- float32 models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build_model", "inputs"),
    [(masked_attention, attention_inputs), (folded_cnn, cnn_inputs)],
    ids=["transformer", "cnn-bn-folded"],
)
def test_fp16_keeps_snr_halves_weights_and_io_types(build_model, inputs) -> None:
    proto = build_model()
    half, report = converted(proto)
    feed = inputs(3, 8)
    reference, result = run(proto, feed)[0], run(half, feed)[0]
    assert snr_db(reference, result) >= MIN_FP16_SNR_DB
    assert result.dtype == np.float32  # graph inputs and outputs keep their types
    assert {v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]} <= {
        TensorProto.FLOAT,
        TensorProto.BOOL,
    }
    float32_bytes = sum(
        numpy_helper.to_array(t).nbytes for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT
    )
    assert report.weight_bytes_before == float32_bytes
    assert report.weight_bytes_after * 2 == float32_bytes
    assert not any(t.data_type == TensorProto.FLOAT for t in half.graph.initializer)
    assert report.casts_inserted == 2  # one after the float input, one before the output
    assert report.kept_fp32 == {}


def test_minus_1e9_mask_is_clamped_not_turned_into_inf() -> None:
    proto = minus_1e9_attention()
    assert np.float16(np.float32(-1e9)) == -np.inf  # what a plain astype would have written
    half, report = converted(proto)
    constant = next(t for t in half.graph.initializer if t.name == "minus_inf")
    assert numpy_helper.to_array(constant) == np.float16(FP16.min * FP16_RANGE_MARGIN)
    assert report.clamped_values == {"minus_inf": 1}
    feed = attention_inputs(4, 8)
    reference = run(proto, feed)[0]
    assert snr_db(reference, run(half, feed)[0]) >= MIN_FP16_SNR_DB
    # a fully masked sample: -inf would give NaN (-inf - -inf); the clamped value stays finite and,
    # computed as written (numpy float16), uniform like float32's -1e9. ORT's float16 Softmax gives
    # that row a non-uniform answer of its own, so the row is compared with the reference evaluator.
    feed["mask"][0] = False
    reference = run(proto, feed)[0]
    assert np.isfinite(run(half, feed)[0]).all()
    assert snr_db(reference, evaluate(half, feed)) >= MIN_FP16_SNR_DB


def test_minus_inf_mask_stays_minus_inf() -> None:
    half, report = converted(masked_attention())
    constant = next(t for t in half.graph.initializer if t.name == "minus_inf")
    assert numpy_helper.to_array(constant) == -np.inf
    assert report.clamped_values == {}


def test_tensor_ranges_force_fp32_islands_with_casts_at_their_edges() -> None:
    proto = masked_attention()
    feed = attention_inputs(5, 8)
    half, report = converted(proto, tensor_ranges={"up": 2 * FP16_SAFE_LIMIT, "down": 1.0})
    kept = {name: reason for name, reason in report.kept_fp32.items() if "tensor up" in reason}
    types = elem_types(half)
    # the MatMul producing `up` and its readers (Div, Mul) stay float32; `up` itself is float32
    assert len(kept) == 3, report.kept_fp32
    assert types["up"] == TensorProto.FLOAT
    assert types["normed"] == TensorProto.FLOAT16 and types["down"] == TensorProto.FLOAT16
    assert report.casts_inserted > 2
    assert snr_db(run(proto, feed)[0], run(half, feed)[0]) >= MIN_FP16_SNR_DB


def test_ranges_below_the_limit_keep_nothing() -> None:
    _, report = converted(masked_attention(), tensor_ranges={"up": FP16_SAFE_LIMIT / 2})
    assert report.kept_fp32 == {}


OVERFLOW = """g (float[N, 256] logits, float[N, 256] x) => (float[N] y, float[N] z) {
    [exp] e = Exp(logits)
    [sum] y = ReduceSum<keepdims = 0>(e, axes)
    [square] s = Pow(x, two)
    [norm] z = ReduceSum<keepdims = 0>(s, axes)
}"""


def test_default_keep_ops_prevent_overflow_that_plain_fp16_has() -> None:
    """Logits up to 12 (exp 1.6e5) and values up to 300 (squares 9e4) overflow float16; with the
    default list those ops stay float32 and the result matches float32."""
    proto = build(OVERFLOW, {"axes": np.array([1], np.int64), "two": np.array(2, np.float32)})
    rng = np.random.default_rng(0)
    feed = {"logits": rng.uniform(-20, 12, (4, 256)).astype(np.float32)}
    feed["x"] = rng.uniform(-300, 300, (4, 256)).astype(np.float32)
    reference = run(proto, feed)
    kept, report = converted(proto)
    assert {"exp", "sum", "square", "norm"} <= set(report.kept_fp32)
    assert all(snr_db(r, k) >= MIN_FP16_SNR_DB for r, k in zip(reference, run(kept, feed)))
    # ORT's CPU build runs Exp/ReduceSum/Pow in float32 behind inserted Casts, so float16 as written
    # is computed by the reference evaluator (numpy float16)
    naive, _ = converted(proto, keep_ops=())
    assert all(np.isinf(o).any() for o in evaluate_all(naive, feed))


SOFTMAX = """g (float[N, 512] x) => (float[N, 512] y) {
    [softmax] y = Softmax<axis = -1>(x)
}"""


def test_softmax_is_safe_in_fp16_with_masked_columns() -> None:
    """Why Softmax is not in the default list: computed in float16 as written (numpy), 512 columns of
    logits with std 4, a quarter of them -inf, stays far above the 40 dB bar and has no NaN."""
    proto = build(SOFTMAX, {})
    half, report = converted(proto)
    assert report.kept_fp32 == {}
    logits = (np.random.default_rng(9).standard_normal((16, 512)) * 4).astype(np.float32)
    logits[:, ::4] = -np.inf
    result = evaluate(half, {"x": logits})
    assert result.dtype == np.float32 and not np.isnan(result).any()
    assert snr_db(run(proto, {"x": logits})[0], result) >= MIN_FP16_SNR_DB


def test_every_default_kept_op_has_a_reason_and_a_schema() -> None:
    for op, reason in DEFAULT_KEEP_FP32_OPS.items():
        assert len(reason) > 20, op
        assert onnx.defs.has(op), op


def test_user_keep_nodes_and_unknown_names() -> None:
    _half, report = converted(masked_attention(), keep_nodes=["node_12"])  # NameFixPass names: node_<index>
    assert report.kept_fp32 == {"node_12": "kept float32 as asked (--keep-fp32-nodes)"}
    with pytest.raises(OnnxqError, match="keep-fp32-nodes"):
        converted(masked_attention(), keep_nodes=["no_such_node"])


def test_low_precision_io() -> None:
    proto = masked_attention()
    half, report = converted(proto, low_precision_io=True)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert report.casts_inserted == 0
    feed = attention_inputs(6, 8)
    result = run(half, {"x": feed["x"].astype(np.float16), "mask": feed["mask"]})[0]
    assert result.dtype == np.float16
    assert snr_db(run(proto, feed)[0], result) >= MIN_FP16_SNR_DB


TYPED_BY_ATTRIBUTE = """g (int64[3] n, float[3, 3] x) => (float[3, 3] y) {
    [cast] f = Cast<to = 1>(n)
    [fill] c = ConstantOfShape<value = float[1] {2.5}>(shape)
    [eye] i = EyeLike<dtype = 1>(x)
    s = Add(f, c)
    t = Mul(i, x)
    y = Add(s, t)
}"""


def test_type_attributes_follow_the_conversion() -> None:
    proto = build(TYPED_BY_ATTRIBUTE, {"shape": np.array([3, 3], np.int64)})
    half, _ = converted(proto)
    nodes = {n.name: n for n in half.graph.node}
    assert onnx.helper.get_node_attr_value(nodes["cast"], "to") == TensorProto.FLOAT16
    assert onnx.helper.get_node_attr_value(nodes["eye"], "dtype") == TensorProto.FLOAT16
    assert onnx.helper.get_node_attr_value(nodes["fill"], "value").data_type == TensorProto.FLOAT16
    feed: dict[str, np.ndarray] = {
        "n": np.array([1, -2, 3], np.int64),
        "x": np.arange(9, dtype=np.float32).reshape(3, 3),
    }
    expected = feed["n"][None, :].astype(np.float32) + 2.5 + np.eye(3, dtype=np.float32) * feed["x"]
    np.testing.assert_array_equal(run(half, feed)[0], expected)


SHAPE_ARITHMETIC = """g (float[N, W] x) => (float[N, V] y) {
    [shape] n = Shape(x)
    [width] w = Gather<axis = 0>(n, one)
    [to_float] f = Cast<to = 1>(w)
    [scaled] g = Mul(f, factor)
    [to_int] i = Cast<to = 7>(g)
    [sizes] s = Concat<axis = 0>(batch, i)
    [grow] y = Expand(x, s)
}"""


def test_float_arithmetic_on_integers_stays_exact() -> None:
    """Width 1 expanded to width 3001: in float16, 3001 would become 3000 and the output shape change."""
    proto = build(
        SHAPE_ARITHMETIC,
        {
            "one": np.array([1], np.int64),
            "factor": np.array([3001.0], np.float32),
            "batch": np.array([2], np.int64),
        },
    )
    half, report = converted(proto)
    assert float(np.float16(3001)) == 3000.0
    assert {name for name, reason in report.kept_fp32.items() if "integers" in reason} == {
        "to_float",
        "scaled",
        "to_int",
    }
    feed = {"x": np.random.default_rng(4).standard_normal((2, 1)).astype(np.float32)}
    result = run(half, feed)[0]
    assert result.shape == (2, 3001)
    np.testing.assert_array_equal(result, run(proto, feed)[0].astype(np.float16).astype(np.float32))


def test_mask_arithmetic_without_a_cast_back_is_converted() -> None:
    """Cast(bool mask) -> Sub -> Mul(-1e9) feeds the scores, not a Cast to integers: converted, and
    the -1e9 constant clamped."""
    text = """g (float[N, 4] scores, bool[N, 4] mask) => (float[N, 4] y) {
        m = Cast<to = 1>(mask)
        inverted = Sub(one, m)
        additive = Mul(inverted, big)
        masked = Add(scores, additive)
        y = Softmax<axis = -1>(masked)
    }"""
    proto = build(text, {"one": np.array(1.0, np.float32), "big": np.array(-1e9, np.float32)})
    half, report = converted(proto)
    assert report.kept_fp32 == {} and report.clamped_values == {"big": 1}
    feed = {
        "scores": np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32),
        "mask": np.array([[1, 1, 0, 0]] * 3, bool),
    }
    assert snr_db(run(proto, feed)[0], run(half, feed)[0]) >= MIN_FP16_SNR_DB


SUBGRAPH = """g (bool c, float[4] x) => (float[4] y) {
    h = Mul(x, w)
    y = If(c) <then_branch = t () => (float[4] a) { a = Add(h, w) },
                 else_branch = e () => (float[4] b) { b = Sub(h, w) }>
}"""


def test_values_read_by_subgraphs_reach_them_in_float32() -> None:
    proto = build(SUBGRAPH, {"w": np.array([1.5, -2.0, 0.25, 3.0], np.float32)})
    half, report = converted(proto)
    assert "bodies stay float32" in next(iter(report.kept_fp32.values()))
    x = np.array([1, 2, 3, 4], np.float32)
    for condition in (True, False):
        feed = {"c": np.array(condition), "x": x}
        np.testing.assert_allclose(run(half, feed)[0], run(proto, feed)[0], rtol=1e-3)


CONV = """g (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y) {
    [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
    [relu] y = Relu(c)
}"""


def test_bf16_checker_passes_ops_without_bf16_stay_float32() -> None:
    """Conv has no bfloat16 before opset 22: kept with the schema as reason."""
    rng = np.random.default_rng(7)
    proto = build(CONV, {"w": (rng.standard_normal((8, 4, 3, 3)) * 0.2).astype(np.float32)})
    result, report = converted(proto, "bf16")
    assert "no bfloat16" in report.kept_fp32["conv"]
    assert elem_types(result)["y"] == TensorProto.FLOAT
    attention = masked_attention()
    bf16, report = converted(attention, "bf16")
    assert report.kept_fp32 == {}
    assert any(t.data_type == TensorProto.BFLOAT16 for t in bf16.graph.initializer)
    feed = attention_inputs(8, 4)
    computed = evaluate(bf16, feed)
    assert snr_db(run(attention, feed)[0], np.asarray(computed, np.float32)) >= MIN_BF16_SNR_DB


def test_fp32_is_a_no_op_and_unknown_precision_is_a_programming_error() -> None:
    model = ir.serde.deserialize_model(masked_attention())
    assert convert_float_precision(model, "fp32") == ConversionReport()
    with pytest.raises(ValueError):
        convert_float_precision(model, "fp8")


# --- quantized models -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize(
    ("build_model", "inputs"),
    [(masked_attention, attention_inputs), (residual_cnn, cnn_inputs)],
    ids=["transformer", "cnn"],
)
def test_quantized_fp16_rest_matches_fp32_rest(mode: str, build_model, inputs) -> None:
    proto = build_model()
    quantized = onnxq.quantize(
        proto, mode=mode, calibration_data=inputs(1, 16), target="tensorrt", high_precision="fp32"
    )
    fp32_rest = ir.serde.serialize_model(quantized.model)
    half, report = converted(fp32_rest)
    assert casts_after_dequantize(half) == []
    assert report.kept_fp32 == {}
    initializers = {t.name: t for t in half.graph.initializer}
    for node in half.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert initializers[node.input[1]].data_type == TensorProto.FLOAT16, node.name
    quantized_weights = {
        t.name: t.raw_data for t in fp32_rest.graph.initializer if t.name.endswith("_quantized")
    }
    assert quantized_weights and all(initializers[n].raw_data == raw for n, raw in quantized_weights.items())
    assert half.opset_import[0].version >= 19
    assert report.weight_bytes_after * 2 == report.weight_bytes_before
    feed = inputs(2, 8)
    reference = run(proto, feed)[0]
    before, after = snr_db(reference, run(fp32_rest, feed)[0]), snr_db(reference, run(half, feed)[0])
    assert after >= before - QUANTIZED_MARGIN_DB, (before, after)


@pytest.mark.parametrize(("target", "rest_type"), [("tensorrt", TensorProto.FLOAT16), ("ort", TensorProto.FLOAT)])
def test_default_rest_is_fp16_for_tensorrt_and_fp32_for_ort(target: str, rest_type: int) -> None:
    proto = residual_cnn()
    quantized = onnxq.quantize(proto, calibration_data=cnn_inputs(1, 16), target=target)
    saved_model = ir.serde.serialize_model(quantized.model)
    float_initializers = {
        t.data_type for t in saved_model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    }
    assert float_initializers == {rest_type}
    # graph inputs and outputs keep their float32 types either way
    assert {v.type.tensor_type.elem_type for v in [*saved_model.graph.input, *saved_model.graph.output]} == {
        TensorProto.FLOAT
    }
    assert (quantized.conversion is not None) == (rest_type == TensorProto.FLOAT16)


def test_nvfp4_chain_feeds_the_gemm_in_fp16() -> None:
    """Two chained DQs (FP8 block scales x global scale, then FP4 weights): both output float16."""
    proto = masked_attention()
    quantized = onnxq.quantize(proto, mode="nvfp4-w4a16", target="tensorrt")
    fp32_rest = ir.serde.serialize_model(quantized.model)
    half, _report = converted(fp32_rest)
    assert casts_after_dequantize(half) == []
    dequantized = [n.output[0] for n in half.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantized and all(
        elem_types(half).get(v, TensorProto.FLOAT16) == TensorProto.FLOAT16 for v in dequantized
    )
    feed = attention_inputs(2, 4)
    reference = run(proto, feed)[0]
    before = snr_db(reference, evaluate(fp32_rest, feed))
    after = snr_db(reference, evaluate(half, feed))
    assert after >= before - QUANTIZED_MARGIN_DB, (before, after)


SMALL_SCALE_DQ = """g (float[N, 4] x) => (float[N, 2] y) {
    [dq] w = DequantizeLinear<axis = 1>(wq, scale)
    [mm] y = MatMul(x, w)
}"""


def test_scale_subnormal_in_fp16_keeps_its_dequantize_float32() -> None:
    scale = np.array([1e-7, 3e-7], np.float32)  # every channel small: the largest weight itself moves
    relative_error = abs(float(np.float16(scale[1])) - 3e-7) / 3e-7
    assert relative_error > FP16.eps  # the reason it must stay float32
    proto = build(SMALL_SCALE_DQ, {"wq": np.array([[100, -70]] * 4, np.int8), "scale": scale}, opset=19)
    half, report = converted(proto)
    assert "subnormal" in report.kept_fp32["dq"]
    assert elem_types(half)["scale"] == TensorProto.FLOAT
    feed = {"x": np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(half, feed)[0], run(proto, feed)[0], rtol=2e-3, atol=1e-9)


def test_dead_channel_with_a_subnormal_scale_converts() -> None:
    """A channel whose weights are far below the tensor's largest (BatchNorm-folded dead channel):
    flushing its scale changes nothing a float16 layer resolves, so the DQ feeds the GEMM in fp16."""
    scale = np.array([1e-24, 0.02], np.float32)
    assert float(np.float16(scale[0])) == 0.0  # the scale flushes to zero
    proto = build(SMALL_SCALE_DQ, {"wq": np.array([[100, -7]] * 4, np.int8), "scale": scale}, opset=19)
    half, report = converted(proto)
    assert "dq" not in report.kept_fp32
    assert elem_types(half)["scale"] == TensorProto.FLOAT16
    assert casts_after_dequantize(half) == []
    feed = {"x": np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)}
    reference = run(proto, feed)[0]
    # the dead column was 1e-22: within float16 rounding of the live one
    np.testing.assert_allclose(run(half, feed)[0], reference, rtol=2e-3, atol=1e-3 * np.abs(reference).max())


def test_dequantize_follows_a_consumer_kept_float32() -> None:
    proto = build(
        SMALL_SCALE_DQ,
        {"wq": np.array([[100, -7]] * 4, np.int8), "scale": np.array([0.01, 0.02], np.float32)},
        opset=19,
    )
    half, report = converted(proto, keep_nodes=["mm"])
    assert "follows its consumers" in report.kept_fp32["dq"]
    assert casts_after_dequantize(half) == []


def test_qdq_below_opset_19_is_upgraded() -> None:
    proto = build(
        SMALL_SCALE_DQ,
        {"wq": np.array([[100, -7]] * 4, np.int8), "scale": np.array([0.01, 0.02], np.float32)},
        opset=13,
    )
    half, report = converted(proto)
    assert report.opset_upgraded_to == 19 and half.opset_import[0].version == 19
    assert elem_types(half)["scale"] == TensorProto.FLOAT16
    assert math.isclose(float(run(half, {"x": np.eye(4, dtype=np.float32)})[0][0, 0]), 1.0, rel_tol=1e-3)


def test_bfloat16_scales_round_like_ml_dtypes() -> None:
    scale = np.array([0.0123, 0.02], np.float32)
    proto = build(SMALL_SCALE_DQ, {"wq": np.array([[100, -7]] * 4, np.int8), "scale": scale}, opset=19)
    result, _ = converted(proto, "bf16")
    stored = next(t for t in result.graph.initializer if t.name == "scale")
    assert stored.data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(
        numpy_helper.to_array(stored).astype(np.float32), scale.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_ir_version_is_kept() -> None:
    half, _ = converted(masked_attention())
    assert half.ir_version == IR_VERSION


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_unquantized_tensor_beyond_fp16_keeps_float32_in_a_quantized_model(mode: str) -> None:
    """A tensor calibration does not quantize (a depthwise conv read only by a Transpose) is measured
    too: beyond float16's range it stays float32, and the output stays finite."""
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,16,1,1] x) => (float[N,16,1,1] t, float[N,16,1,1] c2) {
          d = Conv <group: int = 16, kernel_shape: ints = [1, 1]> (x, w)
          t = Transpose <perm: ints = [0, 1, 3, 2]> (d)
          c2 = Conv <kernel_shape: ints = [1, 1]> (x, w2)
        }"""
    )
    rng = np.random.default_rng(7)
    big = (rng.standard_normal((16, 1, 1, 1)) * 2000).astype(np.float32)
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(big, "w"),
            numpy_helper.from_array(rng.standard_normal((16, 16, 1, 1)).astype(np.float32), "w2"),
        ]
    )
    x = (rng.standard_normal((4, 16, 1, 1)) * 40).astype(np.float32)
    result = onnxq.quantize(proto, mode=mode, calibration_data={"x": x})
    assert result.conversion is not None
    producer = {n.outputs[0].name: n.name for n in result.model.graph}["d"]
    assert "beyond the float16 limit" in result.conversion.kept_fp32[producer]
    outputs = run(ir.serde.serialize_model(result.model), {"x": x})
    assert all(np.isfinite(o).all() for o in outputs)
