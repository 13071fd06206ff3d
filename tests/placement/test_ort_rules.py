"""ONNX Runtime CPU placement rules (patterns/ort.toml): uint8 activations, int8 per-channel weights,
Q on Conv outputs after the Relu, and the QLinear kernels ONNX Runtime's optimizer then fuses."""

from __future__ import annotations

from pathlib import Path

import model_builders
import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from model_builders import build, randn, snr_db
from onnx import TensorProto, numpy_helper

import onnxq

Q, DQ = "QuantizeLinear", "DequantizeLinear"


def quantize_ort(model: onnx.ModelProto, data, **options) -> tuple[onnxq.api.QuantizeResult, onnx.ModelProto]:
    result = onnxq.quantize(model, calibration_data=data, target="ort", **options)
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    return result, proto


def session(model: onnx.ModelProto, dump: Path | None = None) -> ort.InferenceSession:
    """A CPU session at the extended level (the QDQ fusions), optionally dumping the optimized graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in proto.graph.node for out in n.output}


def initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def quantize_node_of(proto: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in proto.graph.node if n.op_type == Q and n.input[0] == tensor), None)


def zero_point_of(proto: onnx.ModelProto, tensor: str) -> tuple[int, int]:
    """(dtype, value) of the zero point of the Q node reading ``tensor``."""
    node = quantize_node_of(proto, tensor)
    assert node is not None, f"{tensor} is not quantized"
    zero_point = initializer(proto, node.input[2])
    return zero_point.data_type, int(numpy_helper.to_array(zero_point))


def axis_of(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


# ----------------------------------------------------------------------------------------------

CONV_CHAIN = """g (float[N, 8, 8, 8] x) => (float[N, 16] y) {
    [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    [relu1] r1 = Relu(c1)
    [conv2] c2 = Conv<pads = [1, 1, 1, 1]>(r1, w2, b2)
    [relu2] r2 = Relu(c2)
    [gap] p = GlobalAveragePool(r2)
    [flatten] f = Flatten(p)
    [fc] y = Gemm<transB = 1>(f, w3, b3)
}"""


@pytest.fixture(scope="module")
def conv_chain() -> tuple[onnx.ModelProto, onnxq.api.QuantizeResult, onnx.ModelProto]:
    rng = np.random.default_rng(30)
    inits = {
        "w1": randn(rng, 16, 8, 3, 3, scale=0.2),
        "b1": randn(rng, 16),
        "w2": randn(rng, 32, 16, 3, 3),
        "b2": randn(rng, 32),
        "w3": randn(rng, 16, 32, scale=0.3),
        "b3": randn(rng, 16),
    }
    model = build(CONV_CHAIN, inits)
    calib = {"x": rng.standard_normal((32, 8, 8, 8)).astype(np.float32)}
    return (model, *quantize_ort(model, calib))


def test_conv_output_is_quantized_after_the_relu(conv_chain) -> None:
    _, result, proto = conv_chain
    by_output = producers(proto)
    for conv, relu, out in [("conv1", "r1", "c1"), ("conv2", "r2", "c2")]:
        found = result.plan.decision(conv)
        assert found is not None and found.quantized and found.reason == "rule conv (weighted)"
        assert (relu, "activation", None) in {(u.tensor, u.role, u.input_index) for u in found.uses}
        assert quantize_node_of(proto, relu) is not None  # Q right after the Relu
        assert quantize_node_of(proto, out) is None  # not between Conv and Relu
        relu_node = next(n for n in proto.graph.node if n.output[0] == relu)
        assert by_output[relu_node.input[0]].op_type == "Conv"


def test_uint8_activations_with_zero_point_zero_after_relu(conv_chain) -> None:
    _, result, proto = conv_chain
    assert result.plan.target == "ort"
    for tensor in ("r1", "r2"):
        assert zero_point_of(proto, tensor) == (TensorProto.UINT8, 0)
    dtype, zero_point = zero_point_of(proto, "x")  # the graph input has negative values
    assert dtype == TensorProto.UINT8 and 100 < zero_point < 156
    # every activation Q/DQ is uint8, per tensor
    for node in proto.graph.node:
        if node.op_type == Q:
            assert initializer(proto, node.input[2]).data_type == TensorProto.UINT8
            assert axis_of(node) is None


def test_int8_per_channel_weights(conv_chain) -> None:
    _, _, proto = conv_chain
    by_output = producers(proto)
    expected = {"conv1": (0, 16), "conv2": (0, 32), "fc": (0, 16)}
    for name, (axis, channels) in expected.items():
        node = next(n for n in proto.graph.node if n.name == name)
        weight_dq = by_output[node.input[1]]
        assert weight_dq.op_type == DQ and axis_of(weight_dq) == axis
        assert initializer(proto, weight_dq.input[0]).data_type == TensorProto.INT8
        zero_point = initializer(proto, weight_dq.input[2])
        assert zero_point.data_type == TensorProto.INT8
        assert numpy_helper.to_array(zero_point).tolist() == [0] * channels
        assert numpy_helper.to_array(initializer(proto, weight_dq.input[1])).shape == (channels,)
        # the bias stays a float initializer
        assert node.input[2] not in by_output
        assert initializer(proto, node.input[2]).data_type == TensorProto.FLOAT


def test_graph_output_is_not_quantized(conv_chain) -> None:
    _, _, proto = conv_chain
    by_output = producers(proto)
    assert by_output["y"].op_type == "Gemm"
    assert quantize_node_of(proto, "y") is None


def test_relu_output_that_is_a_graph_output_is_not_quantized() -> None:
    rng = np.random.default_rng(35)
    model = build(
        """g (float[N, 8, 8, 8] x) => (float[N, 16, 8, 8] r, float[N, 16, 8, 8] y) {
            [conv1] c = Conv<pads = [1, 1, 1, 1]>(x, w1)
            [relu1] r = Relu(c)
            [conv2] y = Conv<pads = [1, 1, 1, 1]>(r, w2)
        }""",
        {"w1": randn(rng, 16, 8, 3, 3, scale=0.2), "w2": randn(rng, 16, 16, 3, 3)},
    )
    result, proto = quantize_ort(model, {"x": rng.standard_normal((8, 8, 8, 8)).astype(np.float32)})
    conv1 = result.plan.decision("conv1")
    assert conv1 is not None and conv1.quantized
    assert {u.tensor for u in conv1.uses} == {"x", "w1"}  # no output use: r is a graph output
    conv2 = result.plan.decision("conv2")
    assert conv2 is not None and ("r", 0) in {(u.tensor, u.input_index) for u in conv2.uses}
    by_output = producers(proto)
    assert [o.name for o in proto.graph.output] == ["r", "y"]
    assert by_output["r"].op_type == "Relu" and by_output["y"].op_type == "Conv"
    conv2_node = next(n for n in proto.graph.node if n.name == "conv2")
    assert by_output[conv2_node.input[0]].op_type == DQ
    assert zero_point_of(proto, "r") == (TensorProto.UINT8, 0)


def test_onnxruntime_fuses_qlinear_conv(conv_chain, tmp_path: Path) -> None:
    model, _, proto = conv_chain
    dump = tmp_path / "optimized.onnx"
    quantized = session(proto, dump)
    optimized = [n.op_type for n in onnx.load(str(dump)).graph.node]
    assert optimized.count("QLinearConv") == 2, optimized
    assert "Conv" not in optimized
    assert "Relu" not in optimized, "zero point 0 after Relu lets ONNX Runtime drop the Relu"
    feed = {"x": np.random.default_rng(31).standard_normal((4, 8, 8, 8)).astype(np.float32)}
    reference = session(model).run(None, feed)[0]
    assert snr_db(reference, quantized.run(None, feed)[0]) > 30


def test_residual_cnn_fuses_and_keeps_accuracy(tmp_path: Path) -> None:
    model = model_builders.residual_cnn(seed=32)
    result, proto = quantize_ort(model, model_builders.cnn_inputs(1, 32))
    add = result.plan.decision("add1")
    assert add is not None and add.quantized and add.reason == "rule add (all_inputs)"
    assert sorted((u.tensor, u.input_index) for u in add.uses) == [("c2", 0), ("r1", 1)]
    # conv2 has no Relu after it: its own output is quantized
    assert zero_point_of(proto, "c2")[0] == TensorProto.UINT8
    for tensor in ("r1", "r2", "r3"):
        assert zero_point_of(proto, tensor) == (TensorProto.UINT8, 0)
    dump = tmp_path / "optimized.onnx"
    quantized = session(proto, dump)
    optimized = [n.op_type for n in onnx.load(str(dump)).graph.node]
    assert optimized.count("QLinearConv") == 3 and "QLinearAdd" in optimized, optimized
    feed = model_builders.cnn_inputs(2, 8)
    reference = session(model).run(None, feed)[0]
    assert snr_db(reference, quantized.run(None, feed)[0]) > 30


def test_small_matmul_is_quantized_for_ort_but_not_for_tensorrt() -> None:
    """min_gemm_dim = 1 for ONNX Runtime: MatMulIntegerToFloat pays off at any size."""
    rng = np.random.default_rng(33)
    model = build(
        "g (float[N, 4, 8] x) => (float[N, 4, 32] y) { [mm] y = MatMul(x, w) }",
        {"w": randn(rng, 8, 32, scale=0.3)},
    )
    calib = {"x": rng.standard_normal((16, 4, 8)).astype(np.float32)}
    result, proto = quantize_ort(model, calib)
    found = result.plan.decision("mm")
    assert found is not None and found.quantized and found.reason == "rule matmul (matmul)"
    assert [n.op_type for n in proto.graph.node].count(DQ) == 2
    trt = onnxq.quantize(model, calibration_data=calib, target="tensorrt")
    skipped = trt.plan.decision("mm")
    assert skipped is not None and not skipped.quantized and skipped.category == "gemv/tiny"
    feed = {"x": rng.standard_normal((4, 4, 8)).astype(np.float32)}
    assert snr_db(session(model).run(None, feed)[0], session(proto).run(None, feed)[0]) > 30


def test_ort_add_with_infinite_mask_stays_float() -> None:
    model = model_builders.masked_attention(seed=34)
    result, proto = quantize_ort(model, model_builders.attention_inputs(1, 16))
    mask_add = next(n for n in proto.graph.node if n.op_type == "Add" and "additive" in n.input)
    found = result.plan.decision(mask_add.name)
    assert found is not None and (found.quantized, found.category) == (False, "can carry inf")
    assert found.reason.startswith("input additive can carry +/-inf")
    by_output = producers(proto)
    assert all(by_output.get(name) is None or by_output[name].op_type != DQ for name in mask_add.input)
    for tensor in ("minus_inf", "additive", "masked"):
        assert quantize_node_of(proto, tensor) is None
    # the residual Add (attention output + x) is an ordinary QLinearAdd candidate
    residual = next(n for n in proto.graph.node if n.output[0] == "residual")
    decided = result.plan.decision(residual.name)
    assert decided is not None and decided.quantized
    feed = model_builders.attention_inputs(2, 4)
    assert snr_db(session(model).run(None, feed)[0], session(proto).run(None, feed)[0]) > 18
