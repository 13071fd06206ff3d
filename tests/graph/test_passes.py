"""Graph clean-up passes (onnxq/graph/passes.py): Constant lifting, BatchNorm folding, opset upgrade,
unique names; each on a small hand-built model, with ONNX Runtime numerics where the math changes."""

from __future__ import annotations

import model_builders
import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx.version_converter
import onnx_ir as ir
import pytest
from model_builders import build, randn, run, snr_db
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.graph import passes

Q, DQ = "QuantizeLinear", "DequantizeLinear"


def default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in proto.graph.node for out in n.output}


def axis_of(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def weight_dq(proto: onnx.ModelProto, node_name: str, index: int = 1) -> onnx.NodeProto:
    node = next(n for n in proto.graph.node if n.name == node_name)
    dequantize = producers(proto)[node.input[index]]
    assert dequantize.op_type == DQ
    return dequantize


def initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


# ----------------------------------------------------------------------------------------------
# Constant nodes -> initializers -> per-channel weights


def constant_weight_model(seed: int = 40) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1, w2 = randn(rng, 32, 16, 3, 3), randn(rng, 32, 32 * 4 * 4, scale=0.03)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1), name="w1_const"),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2), name="w2_const"),
        helper.make_node("Constant", [], ["half"], value_float=0.5, name="half_const"),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Flatten", ["p1"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2"], ["g"], transB=1, name="fc"),
        helper.make_node("Mul", ["g", "half"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_lift_constant_nodes_makes_initializers() -> None:
    model = ir.serde.deserialize_model(constant_weight_model())
    assert passes.lift_constant_nodes(model) == 3
    assert [n.op_type for n in model.graph if n.op_type == "Constant"] == []
    assert {"w1", "w2", "half"} <= set(model.graph.initializers)
    assert model.graph.initializers["w1"].const_value.shape == (32, 16, 3, 3)
    conv = next(n for n in model.graph if n.name == "conv1")
    assert conv.inputs[1] is model.graph.initializers["w1"]


def test_constant_that_is_a_graph_output_stays_an_output() -> None:
    model = ir.serde.deserialize_model(
        build(
            """g (float[N, 4] x) => (float[N, 4] y, float[2] k) {
                [kc] k = Constant<value = float[2] {1.0, 2.0}>()
                [relu] y = Relu(x)
            }""",
            {},
        )
    )
    passes.lift_constant_nodes(model)
    assert [o.name for o in model.graph.outputs] == ["y", "k"]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    outputs = run(proto, {"x": np.ones((1, 4), np.float32)})
    np.testing.assert_array_equal(outputs[1], [1.0, 2.0])


def test_constant_node_weights_are_quantized_per_channel() -> None:
    model = constant_weight_model()
    calib = {"x": np.random.default_rng(41).standard_normal((16, 16, 8, 8)).astype(np.float32)}
    result = onnxq.quantize(model, calibration_data=calib)
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert "Constant" not in [n.op_type for n in proto.graph.node]
    for name, tensor, axis in [("conv1", "w1", 0), ("fc", "w2", 0)]:
        found = result.plan.decision(name)
        assert found is not None and found.quantized
        assert (tensor, "weight", 1, axis) in {(u.tensor, u.role, u.input_index, u.axis) for u in found.uses}
        dequantize = weight_dq(proto, name)
        assert axis_of(dequantize) == axis
        assert initializer(proto, dequantize.input[0]).data_type == TensorProto.INT8
        assert numpy_helper.to_array(initializer(proto, dequantize.input[1])).shape == (32,)
    # weights are never calibrated as activations
    assert set(result.plan.activation_tensors()) == {"x", "r1", "flat"}  # r1: MaxPool next to the Gemm
    assert not any(n.op_type == Q and n.input[0] in ("w1", "w2") for n in proto.graph.node)
    feed = {"x": np.random.default_rng(42).standard_normal((4, 16, 8, 8)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(proto, feed)[0]) > 30


# ----------------------------------------------------------------------------------------------
# BatchNormalization folding

CONV_BN = """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {{
    [conv] c = Conv<pads = [1, 1, 1, 1], group = {group}>(x, w{bias})
    [bn] b = BatchNormalization<epsilon = 0.001>(c, gamma, beta, mean, var)
    [relu] y = Relu(b)
}}"""


def conv_bn_model(bias: bool, group: int = 1, seed: int = 43) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "w": randn(rng, 32, 16 // group, 3, 3, scale=0.3),
        "gamma": (1 + 0.3 * rng.standard_normal(32)).astype(np.float32),
        "beta": randn(rng, 32, scale=0.5),
        "mean": randn(rng, 32, scale=0.5),
        "var": (0.5 + rng.random(32)).astype(np.float32),
    }
    if bias:
        inits["cb"] = randn(rng, 32, scale=0.5)
    return build(CONV_BN.format(group=group, bias=", cb" if bias else ""), inits)


@pytest.mark.parametrize(
    ("bias", "group"), [(True, 1), (False, 1), (True, 4)], ids=["bias", "no_bias", "grouped"]
)
def test_fold_batch_norm_matches_float_model(bias: bool, group: int) -> None:
    original = conv_bn_model(bias, group)
    model = ir.serde.deserialize_model(original)
    assert passes.fold_batch_norm(model) == 1
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 3 and conv.inputs[2] is not None and conv.inputs[2].const_value is not None
    assert conv.inputs[1].const_value.shape == (32, 16 // group, 3, 3)
    folded = ir.serde.serialize_model(model)
    onnx.checker.check_model(folded, full_check=True)
    feed = {"x": np.random.default_rng(44).standard_normal((4, 16, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feed)[0], run(original, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "text",
    [
        # the Conv output has a second consumer
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y, float[N, 32, 8, 8] z) {
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
            [bn] y = BatchNormalization(c, gamma, beta, mean, var)
            [relu] z = Relu(c)
        }""",
        # the BatchNorm parameters are computed at run time
        """g (float[N, 16, 8, 8] x, float[32] gamma) => (float[N, 32, 8, 8] y) {
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
            [bn] y = BatchNormalization(c, gamma, beta, mean, var)
        }""",
        # the Conv output is itself a graph output
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y, float[N, 32, 8, 8] c) {
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
            [bn] y = BatchNormalization(c, gamma, beta, mean, var)
        }""",
    ],
    ids=["shared_conv_output", "runtime_gamma", "conv_output_is_graph_output"],
)
def test_fold_batch_norm_leaves_unfoldable_pairs(text: str) -> None:
    rng = np.random.default_rng(45)
    inits = {"w": randn(rng, 32, 16, 3, 3), "beta": randn(rng, 32), "mean": randn(rng, 32)}
    inits["var"] = (0.5 + rng.random(32)).astype(np.float32)
    if "float[32] gamma" not in text:
        inits["gamma"] = (1 + 0.1 * rng.standard_normal(32)).astype(np.float32)
    model = ir.serde.deserialize_model(build(text, inits))
    assert passes.fold_batch_norm(model) == 0
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 1


def test_fold_batch_norm_keeps_graph_output_names() -> None:
    rng = np.random.default_rng(46)
    original = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
            [bn] y = BatchNormalization(c, gamma, beta, mean, var)
        }""",
        {
            "w": randn(rng, 32, 16, 3, 3),
            "gamma": (1 + 0.1 * rng.standard_normal(32)).astype(np.float32),
            "beta": randn(rng, 32),
            "mean": randn(rng, 32),
            "var": (0.5 + rng.random(32)).astype(np.float32),
        },
    )
    model = ir.serde.deserialize_model(original)
    assert passes.fold_batch_norm(model) == 1
    assert [o.name for o in model.graph.outputs] == ["y"]


# ----------------------------------------------------------------------------------------------
# opset upgrade

OLD_CNN = """g (float[N, 16, 8, 8] x) => (float[N, 10] y) {
    [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    [relu1] r1 = Relu(c1)
    [pool] p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r1)
    [conv2] c2 = Conv<pads = [1, 1, 1, 1]>(p, w2)
    [relu2] r2 = Relu(c2)
    [flatten] f = Flatten(r2)
    [fc] g = Gemm<transB = 1>(f, w3, b3)
    [squeeze_in] g3 = Unsqueeze<axes = [1]>(g)
    [squeeze] g2 = Squeeze<axes = [1]>(g3)
    [softmax] y = Softmax<axis = 1>(g2)
}"""


def old_cnn(opset: int, ir_version: int, seed: int = 47) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "w1": randn(rng, 32, 16, 3, 3),
        "b1": randn(rng, 32),
        "w2": randn(rng, 32, 32, 3, 3, scale=0.05),
        "w3": randn(rng, 10, 32 * 4 * 4, scale=0.1),
        "b3": randn(rng, 10),
    }
    return build(OLD_CNN, inits, opset, ir_version)


@pytest.mark.parametrize(("opset", "ir_version"), [(11, 6), (12, 7), (11, 10)])
def test_old_opset_models_are_upgraded_and_quantized(opset: int, ir_version: int) -> None:
    model = old_cnn(opset, ir_version)
    calib = {"x": np.random.default_rng(48).standard_normal((16, 16, 8, 8)).astype(np.float32)}
    result = onnxq.quantize(model, calibration_data=calib)
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert default_opset(proto) >= 13
    ops = [n.op_type for n in proto.graph.node]
    assert "Constant" not in ops
    squeeze = next(n for n in proto.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2 and not squeeze.attribute, "Squeeze-13 takes axes as an input"
    for conv in ("conv1", "conv2"):
        dequantize = weight_dq(proto, conv)
        assert axis_of(dequantize) == 0
        assert numpy_helper.to_array(initializer(proto, dequantize.input[1])).shape == (32,)
    assert result.plan.decision("pool").quantized
    feed = {"x": np.random.default_rng(49).standard_normal((4, 16, 8, 8)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(proto, feed)[0]) > 30


def test_builder_constant_weight_cnn_opset11() -> None:
    model = model_builders.constant_weight_cnn_opset11(seed=50)
    result = onnxq.quantize(model, calibration_data=model_builders.cnn_inputs(1, 16))
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert default_opset(proto) >= 13
    assert axis_of(weight_dq(proto, "conv1")) == 0
    feed = model_builders.cnn_inputs(2, 4)
    assert snr_db(run(model, feed)[0], run(proto, feed)[0]) > 30


def test_upgrade_opset_is_a_no_op_at_or_above_target() -> None:
    model = ir.serde.deserialize_model(old_cnn(12, 10))
    assert passes.upgrade_opset(model, 11) is False
    assert passes.upgrade_opset(model, 12) is False
    assert passes.default_opset(model) == 12


def test_upgrade_opset_with_unchanged_schemas_only_bumps_the_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv, AveragePool and GlobalAveragePool have the same schema at opsets 11 and 13."""
    rng = np.random.default_rng(51)
    original = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 1, 1] y) {
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
            [pool] p = AveragePool<kernel_shape = [2, 2], strides = [2, 2]>(c)
            [gap] y = GlobalAveragePool(p)
        }""",
        {"w": randn(rng, 32, 16, 3, 3)},
        opset=11,
    )
    model = ir.serde.deserialize_model(original)
    graph, weight = model.graph, model.graph.initializers["w"].const_value

    def refuse(*args, **kwargs):
        raise AssertionError("the version converter must not run")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    assert passes.upgrade_opset(model, 13) is True
    assert passes.default_opset(model) == 13
    assert model.graph is graph and model.graph.initializers["w"].const_value is weight
    upgraded = ir.serde.serialize_model(model)
    onnx.checker.check_model(upgraded, full_check=True)
    feed = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(upgraded, feed)[0], run(original, feed)[0])


def test_upgrade_opset_with_changed_schema_uses_the_version_converter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = build(
        """g (float[N, 1, 8] x) => (float[N, 8] y) {
            [sq] s = Squeeze<axes = [1]>(x)
            [sm] y = Softmax<axis = 1>(s)
        }""",
        {},
        opset=11,
        ir_version=7,
    )
    calls = []
    convert = onnx.version_converter.convert_version

    def spy(proto, target):
        calls.append(target)
        return convert(proto, target)

    monkeypatch.setattr(onnx.version_converter, "convert_version", spy)
    model = ir.serde.deserialize_model(original)
    assert passes.upgrade_opset(model, 13) is True
    assert calls == [13]
    assert passes.default_opset(model) == 13
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze")
    assert len(squeeze.inputs) == 2 and squeeze.inputs[1].const_value is not None
    assert "axes" not in squeeze.attributes
    assert "Constant" not in [n.op_type for n in model.graph]
    upgraded = ir.serde.serialize_model(model)
    onnx.checker.check_model(upgraded, full_check=True)
    feed = {"x": np.random.default_rng(52).standard_normal((3, 1, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(upgraded, feed)[0], run(original, feed)[0], rtol=1e-6)


def test_the_version_converter_never_sees_float_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights held in memory are swapped for placeholders around the converter and put back by name."""
    weight = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    original = build(
        """g (float[N, 1, 64] x) => (float[N, 64] y) {
            [sq] s = Squeeze<axes = [1]>(x)
            [mm] y = MatMul(s, w)
        }""",
        {"w": weight},
        opset=11,
        ir_version=7,
    )
    seen: list[int] = []
    convert = onnx.version_converter.convert_version

    def spy(proto, target):
        seen.append(proto.ByteSize())
        return convert(proto, target)

    monkeypatch.setattr(onnx.version_converter, "convert_version", spy)
    model = ir.serde.deserialize_model(original)
    assert passes.upgrade_opset(model, 13) is True
    assert seen and seen[0] < weight.nbytes  # the 16 KB weight stayed out of the proto
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), weight)
    feed = {"x": np.random.default_rng(4).standard_normal((2, 1, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run(ir.serde.serialize_model(model), feed)[0], run(original, feed)[0])


def test_upgrade_opset_failure_is_an_onnxq_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(proto, target):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    model = ir.serde.deserialize_model(old_cnn(11, 10))
    with pytest.raises(OnnxqError, match=r"cannot upgrade the model from opset 11 to 13 \(ops .*Squeeze"):
        passes.upgrade_opset(model, 13)


# ----------------------------------------------------------------------------------------------
# unique_name


def names_graph() -> ir.Graph:
    model = build(
        """g (float[N, 4] x) => (float[N, 4] y) {
            [relu] r = Relu(x)
            [add] y = Add(r, bias)
        }""",
        {"bias": np.zeros(4, np.float32)},
    )
    return ir.serde.deserialize_model(model).graph


def test_unique_name_is_deterministic_and_avoids_every_name() -> None:
    graph = names_graph()
    assert passes.unique_name(graph, "fresh") == "fresh"
    assert passes.unique_name(graph, "fresh") == "fresh_1"
    assert passes.unique_name(graph, "fresh") == "fresh_2"
    assert passes.unique_name(graph, "x") == "x_1"  # graph input
    assert passes.unique_name(graph, "bias") == "bias_1"  # initializer
    assert passes.unique_name(graph, "r") == "r_1"  # node output
    assert passes.unique_name(graph, "y") == "y_1"  # graph output
    assert passes.unique_name(graph, "relu") == "relu_1"  # node name
    # the same calls on a fresh copy give the same names
    other = names_graph()
    assert [passes.unique_name(other, n) for n in ("fresh", "fresh", "x")] == ["fresh", "fresh_1", "x_1"]


def test_unique_name_skips_suffixed_names_already_taken() -> None:
    graph = names_graph()
    relu = next(n for n in graph if n.op_type == "Relu")
    relu.outputs[0].name = "x_1"
    graph.meta.pop("onnxq_names", None)
    assert passes.unique_name(graph, "x") == "x_2"


def test_unique_name_sees_values_added_after_the_first_call_once_forgotten() -> None:
    """The contract: a pass calls forget_names first, then names what it adds through unique_name."""
    graph = names_graph()
    passes.unique_name(graph, "first")
    relu = ir.node("Relu", [graph.inputs[0]], name="late_relu")
    relu.outputs[0].name = "late"
    graph.append(relu)
    passes.forget_names(graph)
    assert passes.unique_name(graph, "late") != "late"
    assert passes.unique_name(graph, "late_relu") != "late_relu"


def test_values_by_name_lists_inputs_initializers_and_outputs() -> None:
    graph = names_graph()
    assert set(passes.values_by_name(graph)) == {"x", "bias", "r", "y"}
