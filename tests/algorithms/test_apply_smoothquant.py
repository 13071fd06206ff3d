"""The SmoothQuant pass over a planned model: exact in float (ONNX Runtime and onnx.reference), s as
numpy computes it from the data, 1/s folded into a LayerNormalization or an explicit Mul, Q/K/V
sharing one s, the plan following renamed tensors, only the GEMMs the plan quantizes, the same bytes
for every calibration batch size, and static INT8 of the smoothed model well above the original's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxq
from onnxq.algorithms import smoothquant as sq
from onnxq.algorithms.apply_smoothquant import SmoothQuantSummary, run_smoothquant
from onnxq.api import formats_for, input_specs
from onnxq.calibration.calibrator import CalibrationSettings
from onnxq.calibration.data import open_calibration_data
from onnxq.graph.passes import infer_shapes
from onnxq.placement.plan import Plan
from onnxq.placement.planner import PlacementOptions, plan_placement
from onnxq.placement.rules import load_rule_set

HIDDEN, SEQ, WIDTH = 32, 8, 24
SAMPLES = 16
OUTLIER_CHANNELS = (3, 17)
OUTLIER_GAIN = 40.0
EPSILON = 1e-5
OPSET, IR_VERSION = 17, 8
FLOAT_RTOL, FLOAT_ATOL = 1e-4, 1e-4


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)


def _gain() -> np.ndarray:
    gain = np.ones(HIDDEN, np.float32)
    gain[list(OUTLIER_CHANNELS)] = OUTLIER_GAIN
    return gain


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[str],
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "sq",
        inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _layer_norm(rng: np.random.Generator) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    gamma = ((1 + 0.1 * rng.standard_normal(HIDDEN)) * _gain()).astype(np.float32)
    beta = (0.1 * rng.standard_normal(HIDDEN) * _gain()).astype(np.float32)
    node = helper.make_node(
        "LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=EPSILON
    )
    return node, [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]


def _sequence_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])


def qkv_model(seed: int = 0) -> onnx.ModelProto:
    """LayerNorm -> Q, K, V MatMuls, nothing else reads the LayerNorm: 1/s folds into it."""
    rng = np.random.default_rng(seed)
    norm, inits = _layer_norm(rng)
    nodes = [norm] + [helper.make_node("MatMul", ["ln", f"w_{r}"], [r], name=f"{r}_proj") for r in "qkv"]
    inits += [_weight(rng, f"w_{r}", (HIDDEN, HIDDEN)) for r in "qkv"]
    return _model(nodes, [_sequence_input()], list("qkv"), inits)


def residual_model(seed: int = 1) -> onnx.ModelProto:
    """LayerNorm -> FFN (MatMul, Relu, MatMul) -> residual Add: explicit Muls (other reader, Relu)."""
    rng = np.random.default_rng(seed)
    norm, inits = _layer_norm(rng)
    nodes = [
        norm,
        helper.make_node("MatMul", ["ln", "w_up"], ["up"], name="up"),
        helper.make_node("Relu", ["up"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w_down"], ["down"], name="down"),
        helper.make_node("Add", ["ln", "down"], ["y"], name="residual"),
    ]
    inits += [_weight(rng, "w_up", (HIDDEN, WIDTH * 2)), _weight(rng, "w_down", (WIDTH * 2, HIDDEN))]
    return _model(nodes, [_sequence_input()], ["y"], inits)


def gemm_model(seed: int = 2) -> onnx.ModelProto:
    """Gemm transB=1 reading a graph input: an explicit Mul, weight columns scaled."""
    rng = np.random.default_rng(seed)
    inits = [
        _weight(rng, "w", (WIDTH, HIDDEN)),
        numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "c"),
    ]
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])
    return _model([node], [x], ["y"], inits)


def inputs(model: onnx.ModelProto, seed: int, samples: int = SAMPLES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    shape = (samples, SEQ, HIDDEN) if rank == 3 else (samples, HIDDEN)
    x = rng.standard_normal(shape).astype(np.float32)
    if rank == 2:
        x *= _gain()  # a graph input with outlier channels of its own
    return {"x": x}


def smooth(
    proto: onnx.ModelProto,
    alpha: sq.Alpha,
    batch_size: int | None = None,
    target: str = "tensorrt",
    exclude: str | None = None,
) -> tuple[ir.Model, Plan, SmoothQuantSummary]:
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    rules = load_rule_set(target)
    plan = plan_placement(model, rules, PlacementOptions(exclude_nodes=exclude))
    data = open_calibration_data(inputs(proto, 10), input_specs(model), batch_size)
    act, wgt = formats_for("int8", rules.activation_symmetric)
    summary = run_smoothquant(
        model, plan, data, CalibrationSettings(), alpha,
        activation_format=act, weight_format=wgt, symmetric=rules.activation_symmetric,
    )  # fmt: skip
    return model, plan, summary


def _constants(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: v.const_value.numpy()
        for name, v in model.graph.initializers.items()
        if v.const_value is not None
    }


def _run_ort(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _numpy_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    normalized = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + EPSILON)
    return normalized * gamma + beta


@pytest.mark.parametrize("build", [qkv_model, residual_model, gemm_model])
@pytest.mark.parametrize("alpha", [0.5, 1.0, "auto"])
def test_smoothed_model_equals_the_original_in_float(build: object, alpha: sq.Alpha) -> None:
    proto = build()  # type: ignore[operator]
    model, _, summary = smooth(proto, alpha)
    assert summary.smoothed, summary.lines()
    smoothed = ir.serde.serialize_model(model)
    onnx.checker.check_model(smoothed, full_check=True)
    feed = inputs(proto, 99)  # held-out data
    for before, after in zip(_run_ort(proto, feed), _run_ort(smoothed, feed)):
        np.testing.assert_allclose(after, before, rtol=FLOAT_RTOL, atol=FLOAT_ATOL * np.abs(before).max())
    for before, after in zip(
        ReferenceEvaluator(proto).run(None, feed), ReferenceEvaluator(smoothed).run(None, feed)
    ):
        np.testing.assert_allclose(after, before, rtol=FLOAT_RTOL, atol=FLOAT_ATOL * np.abs(before).max())


def test_layernorm_absorbs_one_scale_shared_by_q_k_v_as_numpy_computes_it() -> None:
    proto = qkv_model()
    original = _constants(ir.serde.deserialize_model(proto))
    model, _, summary = smooth(proto, 0.5)
    (group,) = summary.groups
    assert group.consumers == ("q_proj", "k_proj", "v_proj")
    assert group.folded_into == "ln" and "LayerNormalization" in group.how
    after = _constants(model)
    x = inputs(proto, 10)["x"]
    act_amax = (
        np.abs(_numpy_layer_norm(x, original["gamma"], original["beta"])).reshape(-1, HIDDEN).max(axis=0)
    )
    w_amax = np.max([np.abs(original[f"w_{r}"]).max(axis=1) for r in "qkv"], axis=0)
    expected = np.sqrt(act_amax) / np.sqrt(w_amax)
    np.testing.assert_allclose(original["gamma"] / after["gamma"], expected, rtol=1e-4)
    np.testing.assert_allclose(original["beta"] / after["beta"], expected, rtol=1e-4)
    for role in "qkv":  # one s for the three weights
        np.testing.assert_allclose(
            after[f"w_{role}"] / original[f"w_{role}"], np.repeat(expected[:, None], HIDDEN, 1), rtol=1e-4
        )
    assert not any(node.op_type == "Mul" for node in model.graph)


def test_explicit_mul_where_the_activation_has_other_readers_and_the_plan_follows() -> None:
    model, plan, summary = smooth(residual_model(), 0.5)
    by_activation = {g.activation: g for g in summary.groups}
    assert set(by_activation) == {"ln", "act"}
    assert by_activation["ln"].folded_into is None and "also read by residual" in by_activation["ln"].how
    assert by_activation["act"].folded_into is None and "Relu" in by_activation["act"].how
    nodes = {node.name: node for node in model.graph}
    for gemm in ("up", "down"):
        read = nodes[gemm].inputs[0]
        assert read is not None and read.producer() is not None and read.producer().op_type == "Mul"  # type: ignore[union-attr]
        decision = plan.decision(gemm)
        assert decision is not None
        assert [u.tensor for u in decision.uses if u.input_index == 0] == [read.name]
    residual_inputs = [v.name for v in nodes["residual"].inputs if v is not None]
    assert residual_inputs == ["ln", "down"]
    assert set(plan.activation_tensors()) <= {
        v.name for node in model.graph for v in node.inputs if v is not None
    }


def test_gemm_on_a_graph_input_gets_one_over_s_from_the_data() -> None:
    proto = gemm_model()
    original = _constants(ir.serde.deserialize_model(proto))
    model, _, summary = smooth(proto, 0.75)
    (group,) = summary.groups
    assert group.folded_into is None and "graph input" in group.how
    x = inputs(proto, 10)["x"]
    expected = np.abs(x).max(axis=0) ** 0.75 / np.abs(original["w"]).max(axis=0) ** 0.25
    (mul,) = [node for node in model.graph if node.op_type == "Mul"]
    inverse = mul.inputs[1]
    assert inverse is not None and inverse.const_value is not None
    np.testing.assert_allclose(inverse.const_value.numpy(), 1 / expected, rtol=1e-5)
    np.testing.assert_allclose(_constants(model)["w"], original["w"] * expected[None, :], rtol=1e-5)
    np.testing.assert_array_equal(_constants(model)["c"], original["c"])  # the bias is after the product


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_same_bytes_whatever_the_calibration_batch_size(alpha: sq.Alpha) -> None:
    written = []
    for batch in (1, SAMPLES):
        model, _, summary = smooth(residual_model(), alpha, batch_size=batch)
        written.append((ir.serde.serialize_model(model).SerializeToString(), summary.lines()[1:]))
    assert written[0] == written[1]


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_auto_reports_its_alpha_and_never_a_worse_error(target: str) -> None:
    _, _, summary = smooth(residual_model(), "auto", target=target)
    for group in summary.groups:
        assert group.error is not None and group.error_unsmoothed is not None
        assert group.error <= group.error_unsmoothed
        if group.alpha is not None:
            assert group.alpha in sq.ALPHA_GRID and f"alpha {group.alpha:g}" in group.line()


def test_only_gemms_the_plan_quantizes_are_smoothed() -> None:
    proto = residual_model()
    model, _, summary = smooth(proto, 0.5, exclude="^down$")
    assert [g.activation for g in summary.groups] == ["ln"]
    np.testing.assert_array_equal(
        _constants(model)["w_down"], _constants(ir.serde.deserialize_model(proto))["w_down"]
    )


def test_summary_lines_name_alpha_and_where_one_over_s_went() -> None:
    _, _, summary = smooth(residual_model(), 0.5)
    lines = summary.lines()
    assert len(lines) == len(summary.groups) + 1
    assert "2 of 2 activation groups smoothed, 2 with an explicit Mul" in lines[0]
    assert all("alpha 0.5" in line and "inserted Mul" in line for line in lines[1:])


def _snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - test) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_static_int8_of_the_smoothed_model_beats_the_original(target: str) -> None:
    proto = qkv_model()
    calibration = inputs(proto, 10)
    feed = inputs(proto, 99)
    reference = _run_ort(proto, feed)
    plain = onnxq.quantize(proto, mode="int8", calibration_data=calibration, target=target).model
    smoothed, _, _ = smooth(proto, 0.5, target=target)
    quantized = onnxq.quantize(smoothed, mode="int8", calibration_data=calibration, target=target).model
    snr = [
        min(_snr_db(r, o) for r, o in zip(reference, _run_ort(ir.serde.serialize_model(m), feed)))
        for m in (plain, quantized)
    ]
    assert snr[1] > snr[0] + 6.0, snr
