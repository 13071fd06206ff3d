"""Small seeded ONNX models built in code for the tests (no downloads)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10


def build(
    text: str, initializers: dict[str, np.ndarray], opset: int = 17, ir_version: int = IR_VERSION
) -> onnx.ModelProto:
    """A model from ONNX graph text (the header is added here) plus numpy initializers, checked."""
    model = onnx.parser.parse_model(f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>\n{text}')
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def randn(rng: np.random.Generator, *shape: int, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with ONNX Runtime's basic optimizations only: Q/DQ executed as written, the way TensorRT
    computes them (exact integer accumulation). The extended level fuses signed-activation MatMuls into
    MatMulIntegerToFloat, whose AVX2 kernel (no VNNI) saturates and would measure ORT, not the placement.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal energy / error energy), in float64; inf when exact."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum((reference - np.asarray(test, np.float64)) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference**2)) / noise)


def weights(
    rng: np.random.Generator, name: str, shape: Sequence[int], scale: float = 0.1
) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def finish(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_cnn(seed: int = 0, in_channels: int = 16, opset: int = 17) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual block, MaxPool, Conv, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1, name="fc"),
    ]
    initializers = [
        weights(rng, "w1", [32, in_channels, 3, 3]),
        weights(rng, "b1", [32]),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(32)).astype(np.float32), "gamma"),
        weights(rng, "beta", [32]),
        weights(rng, "mean", [32]),
        numpy_helper.from_array((1 + 0.2 * rng.random(32)).astype(np.float32), "var"),
        weights(rng, "w2", [32, 32, 3, 3], 0.05),
        weights(rng, "b2", [32]),
        weights(rng, "w3", [64, 32, 3, 3], 0.05),
        weights(rng, "b3", [64]),
        weights(rng, "fc", [10, 64]),
        weights(rng, "fcb", [10]),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    return finish(graph, opset)


def masked_attention(seed: int = 0, hidden: int = 32, seq: int = 8) -> onnx.ModelProto:
    """One attention block with an exported additive mask: Where(mask, 0, -inf) + scores -> Softmax.

    Also LayerNormalization and an Erf-form GELU FFN, which must stay float.
    """
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: {IR_VERSION}, opset_import: ["" : 17]>
    attention (float[B, {seq}, {hidden}] x, bool[B, 1, 1, {seq}] mask) => (float[B, {seq}, {hidden}] y) {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        q4 = Unsqueeze(q, one_axis)
        k4 = Unsqueeze(k, one_axis)
        v4 = Unsqueeze(v, one_axis)
        kt = Transpose<perm = [0, 1, 3, 2]>(k4)
        scores = MatMul(q4, kt)
        scaled = Mul(scores, inv_sqrt)
        additive = Where(mask, zero, minus_inf)
        masked = Add(scaled, additive)
        probs = Softmax<axis = -1>(masked)
        context4 = MatMul(probs, v4)
        context = Squeeze(context4, one_axis)
        attn = MatMul(context, wo)
        residual = Add(attn, x)
        normed = LayerNormalization<axis = -1>(residual, ln_scale, ln_bias)
        up = MatMul(normed, w_up)
        half_up = Div(up, sqrt2)
        erf = Erf(half_up)
        erf1 = Add(erf, one)
        gelu_a = Mul(up, erf1)
        gelu = Mul(gelu_a, half)
        down = MatMul(gelu, w_down)
        y = Add(down, normed)
    }}
    """
    model = onnx.parser.parse_model(text)
    scalars = {
        "inv_sqrt": 1 / np.sqrt(hidden),
        "zero": 0.0,
        "minus_inf": -np.inf,
        "sqrt2": np.sqrt(2.0),
        "one": 1.0,
        "half": 0.5,
    }
    initializers = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    initializers += [numpy_helper.from_array(np.array([1], np.int64), "one_axis")]
    for name, shape in [("wq", [hidden, hidden]), ("wk", [hidden, hidden]), ("wv", [hidden, hidden]),
                        ("wo", [hidden, hidden]), ("w_up", [hidden, 4 * hidden]), ("w_down", [4 * hidden, hidden])]:  # fmt: skip
        initializers.append(weights(rng, name, shape, 1 / np.sqrt(shape[0])))
    initializers += [
        numpy_helper.from_array(np.ones(hidden, np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_bias"),
    ]
    model.graph.initializer.extend(initializers)
    onnx.checker.check_model(model, full_check=True)
    return model


def attention_inputs(seed: int, samples: int, hidden: int = 32, seq: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, size=samples)
    mask = np.arange(seq)[None, :] < lengths[:, None]
    return {
        "x": rng.standard_normal((samples, seq, hidden)).astype(np.float32),
        "mask": mask.reshape(samples, 1, 1, seq),
    }


def cnn_inputs(seed: int, samples: int, channels: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((samples, channels, 16, 16)).astype(np.float32)}


def constant_weight_cnn_opset11(seed: int = 0) -> onnx.ModelProto:
    """An opset-11 model whose weights are Constant nodes, as old exporters and version converters emit."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal([32, 16, 3, 3]) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal([10, 32 * 8 * 8]) * 0.02).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1), name="w1_const"),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2), name="w2_const"),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Flatten", ["p1"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "old_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    onnx.checker.check_model(model, full_check=True)
    return model
