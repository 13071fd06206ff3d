"""TensorRT placement rules (patterns/tensorrt.toml), each checked on a small hand-built graph.

Every test looks at three things: the plan (decision, reason and category per node), the quantized
graph (which inputs read a DequantizeLinear, axes, dtypes, scales) and, where it runs, the numerics
of the quantized model against the float one in ONNX Runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import model_builders
import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx_ir as ir
import pytest
from model_builders import build, randn, run, snr_db
from onnx import TensorProto, numpy_helper

import onnxq
from onnxq.placement.rules import load_rule_set

# ----------------------------------------------------------------------------------------------
# helpers (kept in this file on purpose: every test module is self-contained)

TRT_OPS = {op for rule in load_rule_set("tensorrt").rules for op in rule.op_types}
Q, DQ = "QuantizeLinear", "DequantizeLinear"


def quantize(model: onnx.ModelProto, data: dict[str, np.ndarray] | None, **options):
    # placement is read on float32 graphs; the FP16 rest has its own tests (tests/graph/test_float_conversion.py)
    options.setdefault("high_precision", "fp32")
    result = onnxq.quantize(model, calibration_data=data, **options)
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    return result, Index(proto)


@dataclass
class Index:
    """Look-ups over a quantized ModelProto."""

    proto: onnx.ModelProto
    producers: dict[str, onnx.NodeProto] = field(init=False)
    nodes: dict[str, onnx.NodeProto] = field(init=False)
    initializers: dict[str, onnx.TensorProto] = field(init=False)

    def __post_init__(self) -> None:
        self.producers = {out: n for n in self.proto.graph.node for out in n.output}
        self.nodes = {n.name: n for n in self.proto.graph.node}
        self.initializers = {t.name: t for t in self.proto.graph.initializer}

    @property
    def ops(self) -> list[str]:
        return [n.op_type for n in self.proto.graph.node]

    def producer_op(self, tensor: str) -> str | None:
        node = self.producers.get(tensor)
        return node.op_type if node is not None else None

    def consumers(self, tensor: str) -> list[tuple[onnx.NodeProto, int]]:
        return [(n, i) for n in self.proto.graph.node for i, name in enumerate(n.input) if name == tensor]

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def input_op(self, node: str, index: int) -> str | None:
        """Op type producing input ``index`` of ``node`` (None: graph input or initializer)."""
        return self.producer_op(self.nodes[node].input[index])

    def dq_feeding(self, node: str, index: int) -> onnx.NodeProto:
        producer = self.producers[self.nodes[node].input[index]]
        assert producer.op_type == DQ, f"{node} input {index} is produced by {producer.op_type}"
        return producer

    def reads_dq(self, node: str) -> list[bool]:
        return [self.producer_op(name) == DQ for name in self.nodes[node].input]

    def activation_qdq(self, node: str, index: int) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        """(Q, DQ) pair feeding input ``index`` of ``node``."""
        dequantize = self.dq_feeding(node, index)
        quantize = self.producers[dequantize.input[0]]
        assert quantize.op_type == Q
        return quantize, dequantize


def axis_of(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def decision(result, node: str):
    found = result.plan.decision(node)
    assert found is not None, f"no decision for {node}"
    return found


def assert_no_qdq_on_graph_outputs(index: Index, model: onnx.ModelProto) -> None:
    """Graph outputs keep their float producer; a Q may read one only for a consumer inside the graph."""
    assert [o.name for o in index.proto.graph.output] == [o.name for o in model.graph.output]
    for output in index.proto.graph.output:
        assert index.producer_op(output.name) not in (Q, DQ), output.name
        if any(n.op_type == Q for n, _ in index.consumers(output.name)):
            assert any(output.name in n.input for n in model.graph.node), output.name


def assert_zero_points_are_zero(index: Index, dtype: int = TensorProto.INT8) -> None:
    for node in index.proto.graph.node:
        if node.op_type in (Q, DQ):
            zero_point = index.initializers[node.input[2]]
            assert zero_point.data_type == dtype, node.name
            assert not np.any(numpy_helper.to_array(zero_point).astype(np.float32)), node.name


def assert_every_candidate_decided(result, model: onnx.ModelProto) -> None:
    decided = {d.node: d for d in result.plan.decisions}
    candidates = [n for n in result.model.graph if n.op_type in TRT_OPS]
    assert candidates
    for node in candidates:
        assert node.name in decided, f"{node.op_type} {node.name} has no decision"
        found = decided[node.name]
        assert found.op_type == node.op_type
        assert found.reason.strip(), node.name
        assert found.quantized or found.category.strip(), node.name


# ----------------------------------------------------------------------------------------------
# weighted layers: activation per tensor, weight per output channel, bias float


@dataclass(frozen=True)
class LayerCase:
    node: str
    rule: str
    text: str
    shapes: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]
    axis: int
    channels: int
    bias: str | None


LAYERS = {
    "conv": LayerCase(
        "conv", "rule conv (weighted)",
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
            [relu] y = Relu(c)
        }""",
        {"w": (32, 16, 3, 3), "b": (32,)}, (16, 8, 8), 0, 32, "b",
    ),
    "conv_transpose": LayerCase(
        "deconv", "rule conv_transpose (weighted)",
        """g (float[N, 16, 8, 8] x) => (float[N, 24, 16, 16] y) {
            [deconv] c = ConvTranspose<strides = [2, 2]>(x, w, b)
            [relu] y = Relu(c)
        }""",
        {"w": (16, 24, 2, 2), "b": (24,)}, (16, 8, 8), 1, 24, "b",
    ),
    "gemm_transB1": LayerCase(
        "fc", "rule gemm (weighted)",
        """g (float[N, 32] x) => (float[N, 48] y) {
            [fc] c = Gemm<transB = 1>(x, w, b)
            [relu] y = Relu(c)
        }""",
        {"w": (48, 32), "b": (48,)}, (32,), 0, 48, "b",
    ),
    "gemm_transB0": LayerCase(
        "fc", "rule gemm (weighted)",
        """g (float[N, 32] x) => (float[N, 48] y) {
            [fc] c = Gemm(x, w, b)
            [relu] y = Relu(c)
        }""",
        {"w": (32, 48), "b": (48,)}, (32,), 1, 48, "b",
    ),
    "matmul": LayerCase(
        "mm", "rule matmul (matmul)",
        """g (float[N, 8, 32] x) => (float[N, 8, 48] y) {
            [mm] c = MatMul(x, w)
            [bias] cb = Add(c, b)
            [relu] y = Relu(cb)
        }""",
        {"w": (32, 48), "b": (48,)}, (8, 32), 1, 48, None,
    ),
    "matmul_batched_weight": LayerCase(
        "mm", "rule matmul (matmul)",
        """g (float[N, 4, 8, 32] x) => (float[N, 4, 8, 48] y) {
            [mm] c = MatMul(x, w)
            [relu] y = Relu(c)
        }""",
        {"w": (4, 32, 48)}, (4, 8, 32), 2, 48, None,
    ),
}  # fmt: skip

WEIGHT_DTYPES = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


def layer_model(case: LayerCase, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return build(case.text, {name: randn(rng, *shape) for name, shape in case.shapes.items()})


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("case_name", list(LAYERS))
def test_weighted_layer_placement(case_name: str, mode: str) -> None:
    case = LAYERS[case_name]
    model = layer_model(case)
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((16, *case.input_shape)).astype(np.float32)}
    result, index = quantize(model, calib, mode=mode)

    found = decision(result, case.node)
    assert (found.quantized, found.reason, found.category) == (True, case.rule, "")
    assert {(u.tensor, u.role, u.input_index, u.axis) for u in found.uses} == {
        ("x", "activation", 0, None),
        ("w", "weight", 1, case.axis),
    }

    # activation: per-tensor Q -> DQ on the original input
    quantize_node, dequantize_node = index.activation_qdq(case.node, 0)
    assert quantize_node.input[0] == "x"
    assert axis_of(quantize_node) is None and axis_of(dequantize_node) is None
    assert index.array(quantize_node.input[1]).shape == ()
    assert list(dequantize_node.input[1:]) == list(quantize_node.input[1:])

    # weight: stored quantized, DequantizeLinear per output channel
    weight_dq = index.dq_feeding(case.node, 1)
    assert axis_of(weight_dq) == case.axis
    stored = index.initializers[weight_dq.input[0]]
    assert stored.data_type == WEIGHT_DTYPES[mode]
    assert tuple(stored.dims) == case.shapes["w"]
    scale = index.array(weight_dq.input[1])
    zero_point = index.initializers[weight_dq.input[2]]
    assert scale.dtype == np.float32 and scale.shape == (case.channels,)
    assert zero_point.data_type == WEIGHT_DTYPES[mode] and tuple(zero_point.dims) == (case.channels,)
    assert "w" not in index.initializers, "the float weight is released"
    assert not any(
        n.op_type == Q and n.input[0] in ("w", weight_dq.output[0]) for n in index.proto.graph.node
    )

    # the dequantized weight is the float weight up to rounding (per channel scale = amax / qmax)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    view = [1] * weight.ndim
    view[case.axis] = case.channels
    dequantized = numpy_helper.to_array(stored).astype(np.float32) * scale.reshape(view)
    amax = np.abs(weight).max(axis=tuple(i for i in range(weight.ndim) if i != case.axis))
    qmax = 127.0 if mode == "int8" else 448.0
    np.testing.assert_allclose(scale, amax / qmax, rtol=1e-6)
    if mode == "int8":
        assert np.all(np.abs(dequantized - weight) <= scale.reshape(view) / 2 + 1e-7)
    else:
        np.testing.assert_allclose(dequantized, weight, rtol=2**-4, atol=float(scale.max()) * 2**-9)

    # bias stays float and is read directly
    if case.bias is not None:
        assert index.nodes[case.node].input[2] == case.bias
        assert index.initializers[case.bias].data_type == TensorProto.FLOAT
        assert index.producer_op(case.bias) is None
    assert_no_qdq_on_graph_outputs(index, model)
    assert_zero_points_are_zero(index, WEIGHT_DTYPES[mode])
    if mode == "fp8":
        assert max(o.version for o in index.proto.opset_import if o.domain in ("", "ai.onnx")) >= 19

    feed = {"x": np.random.default_rng(2).standard_normal((4, *case.input_shape)).astype(np.float32)}
    reference, quantized = run(model, feed)[0], run(index.proto, feed)[0]
    assert snr_db(reference, quantized) > (30 if mode == "int8" else 20)


def test_matmul_bias_add_stays_float() -> None:
    model = layer_model(LAYERS["matmul"])
    calib = {"x": np.random.default_rng(1).standard_normal((8, 8, 32)).astype(np.float32)}
    result, index = quantize(model, calib)
    found = decision(result, "bias")
    assert (found.quantized, found.reason, found.category) == (
        False,
        "constant operand (bias add)",
        "bias add",
    )
    assert index.reads_dq("bias") == [False, False]
    assert index.nodes["bias"].input[1] == "b" and index.initializers["b"].data_type == TensorProto.FLOAT


def test_grouped_conv_transpose_weight_is_per_tensor() -> None:
    """Output channels of different groups interleave on axis 1: one scale for the whole weight."""
    rng = np.random.default_rng(3)
    model = build(
        """g (float[N, 32, 8, 8] x) => (float[N, 32, 16, 16] y) {
            [deconv] y = ConvTranspose<strides = [2, 2], group = 2>(x, w)
        }""",
        {"w": randn(rng, 32, 16, 2, 2)},
    )
    calib = {"x": rng.standard_normal((8, 32, 8, 8)).astype(np.float32)}
    result, index = quantize(model, calib)
    assert decision(result, "deconv").quantized
    weight_dq = index.dq_feeding("deconv", 1)
    assert axis_of(weight_dq) is None
    assert index.array(weight_dq.input[1]).shape == ()
    feed = {"x": rng.standard_normal((2, 32, 8, 8)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 30


# ----------------------------------------------------------------------------------------------
# BatchNormalization folding (end to end; the pass itself is tested in tests/graph/test_passes.py)


def test_batch_norm_is_folded_before_placement() -> None:
    model = model_builders.residual_cnn(seed=4)
    result, index = quantize(model, model_builders.cnn_inputs(1, 16))
    assert "BatchNormalization" not in index.ops
    weights = [u for u in decision(result, "conv1").uses if u.role == "weight"]
    assert len(weights) == 1 and weights[0].tensor != "w1" and weights[0].axis == 0  # the folded weight
    conv1 = index.nodes["conv1"]
    # the folded weight is the one quantized, and the folded bias stays float
    weight_dq = index.dq_feeding("conv1", 1)
    assert axis_of(weight_dq) == 0
    assert index.initializers[weight_dq.input[0]].data_type == TensorProto.INT8
    assert index.producer_op(conv1.input[2]) is None
    assert index.initializers[conv1.input[2]].data_type == TensorProto.FLOAT
    assert conv1.output[0] in [n.input[0] for n in index.proto.graph.node if n.name == "relu1"]
    feed = model_builders.cnn_inputs(9, 4)
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 30


# ----------------------------------------------------------------------------------------------
# residual Add: the skip input is quantized, the Conv branch is fused by TensorRT

RESIDUAL = """g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {{
    [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    [relu1] r1 = Relu(c1)
    [conv2] c2 = Conv<pads = [1, 1, 1, 1]>(r1, w2, b2)
    [add] a = Add({lhs}, {rhs})
    [relu2] y = Relu(a)
}}"""


def residual_model(lhs: str, rhs: str, seed: int = 5) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "w1": randn(rng, 16, 16, 3, 3),
        "b1": randn(rng, 16),
        "w2": randn(rng, 16, 16, 3, 3),
        "b2": randn(rng, 16),
    }
    return build(RESIDUAL.format(lhs=lhs, rhs=rhs), inits)


@pytest.mark.parametrize(("lhs", "rhs", "skip_index"), [("c2", "r1", 1), ("r1", "c2", 0)])
def test_residual_add_quantizes_the_skip_input(lhs: str, rhs: str, skip_index: int) -> None:
    model = residual_model(lhs, rhs)
    calib = {"x": np.random.default_rng(6).standard_normal((16, 16, 8, 8)).astype(np.float32)}
    result, index = quantize(model, calib)
    found = decision(result, "add")
    assert (found.quantized, found.reason) == (True, "rule residual_add (residual_add)")
    assert [(u.tensor, u.input_index) for u in found.uses] == [("r1", skip_index)]

    reads = index.reads_dq("add")
    assert reads[skip_index] and not reads[1 - skip_index]
    assert index.input_op("add", 1 - skip_index) == "Conv"  # the branch comes straight from conv2
    quantize_node, _ = index.activation_qdq("add", skip_index)
    assert quantize_node.input[0] == "r1"
    # conv2 reads r1 through the same Q/DQ (one tensor, one pair)
    assert index.nodes["conv2"].input[0] == index.nodes["add"].input[skip_index]
    assert_no_qdq_on_graph_outputs(index, model)
    feed = {"x": np.random.default_rng(7).standard_normal((4, 16, 8, 8)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 30


def test_residual_add_of_two_convs_fuses_the_later_one() -> None:
    rng = np.random.default_rng(8)
    model = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {
            [convA] a = Conv<pads = [1, 1, 1, 1]>(x, wa)
            [convB] b = Conv<pads = [1, 1, 1, 1]>(x, wb)
            [add] y = Add(b, a)
        }""",
        {"wa": randn(rng, 16, 16, 3, 3), "wb": randn(rng, 16, 16, 3, 3)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)})
    assert [(u.tensor, u.input_index) for u in decision(result, "add").uses] == [("a", 1)]
    assert index.reads_dq("add") == [False, True]


@pytest.mark.parametrize(
    ("text", "reason", "category"),
    [
        ("[add] y = Add(c1, bias)", "constant operand (bias add)", "bias add"),
        ("[add] y = Add(r1, x)", "no Conv producer to fuse the Add into", "no residual fusion"),
    ],
)
def test_add_without_residual_fusion_stays_float(text: str, reason: str, category: str) -> None:
    rng = np.random.default_rng(9)
    model = build(
        f"""g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {{
            [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
            [relu1] r1 = Relu(c1)
            {text}
        }}""",
        {"w1": randn(rng, 16, 16, 3, 3), "bias": randn(rng, 1, 16, 1, 1)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)})
    found = decision(result, "add")
    assert (found.quantized, found.reason, found.category) == (False, reason, category)
    assert not any(index.reads_dq("add"))


# ----------------------------------------------------------------------------------------------
# precision-sensitive ops stay float: GELU, LayerNormalization, Softmax

KEEP_FLOAT = "precision-sensitive op (normalization, GELU, Softmax) stays in float"
#: Div, Pow, Sqrt, ReduceMean: the reason names the node, not a purpose it may not have
ARITHMETIC = "{}: elementwise arithmetic and reductions stay in float"
ARITHMETIC_OPS = ("Div", "Pow", "Sqrt", "ReduceMean")

GELU_ERF = """g (float[N, 8, 32] x) => (float[N, 8, 32] y) {
    [up] h = MatMul(x, w1)
    [div] hd = Div(h, sqrt2)
    [erf] e = Erf(hd)
    [add1] e1 = Add(e, one)
    [mul1] g1 = Mul(h, e1)
    [mul2] g = Mul(g1, half)
    [down] y = MatMul(g, w2)
}"""

GELU_OP = """g (float[N, 8, 32] x) => (float[N, 8, 32] y) {
    [up] h = MatMul(x, w1)
    [gelu] g = Gelu(h)
    [down] y = MatMul(g, w2)
}"""

LAYER_NORM_OP = """g (float[N, 8, 32] x) => (float[N, 8, 32] y) {
    [ln] n = LayerNormalization<axis = -1>(x, gamma, beta)
    [down] y = MatMul(n, w2)
}"""

LAYER_NORM_DECOMPOSED = """g (float[N, 8, 32] x) => (float[N, 8, 32] y) {
    [mean] mu = ReduceMean<axes = [-1]>(x)
    [sub] d = Sub(x, mu)
    [pow] d2 = Pow(d, two)
    [var] v = ReduceMean<axes = [-1]>(d2)
    [add_eps] ve = Add(v, eps)
    [sqrt] s = Sqrt(ve)
    [div] n0 = Div(d, s)
    [scale] n1 = Mul(n0, gamma)
    [shift] n = Add(n1, beta)
    [down] y0 = MatMul(n, w2)
    [side] y1 = MatMul(x, w1)
    [sum] y = Add(y0, y1)
}"""

SOFTMAX = """g (float[N, 8, 32] x) => (float[N, 8, 32] y) {
    [up] h = MatMul(x, w1)
    [softmax] p = Softmax<axis = -1>(h)
    [down] y = MatMul(p, w2)
}"""


@pytest.mark.parametrize(
    ("text", "opset", "float_nodes", "decided"),
    [
        (GELU_ERF, 17, ["div", "erf", "add1", "mul1", "mul2"], {"div": "kept float", "erf": "kept float"}),
        (GELU_OP, 20, ["gelu"], {"gelu": "kept float"}),
        (LAYER_NORM_OP, 17, ["ln"], {"ln": "kept float"}),
        (
            LAYER_NORM_DECOMPOSED,
            17,
            ["mean", "sub", "pow", "var", "add_eps", "sqrt", "div", "scale", "shift"],
            {"mean": "kept float", "var": "kept float", "pow": "kept float", "sqrt": "kept float",
             "div": "kept float", "add_eps": "bias add", "shift": "bias add"},
        ),
        (SOFTMAX, 17, ["softmax"], {"softmax": "kept float"}),
    ],
    ids=["gelu_erf", "gelu_op20", "layernorm_op", "layernorm_decomposed", "softmax"],
)  # fmt: skip
def test_precision_sensitive_ops_stay_float(
    text: str, opset: int, float_nodes: list[str], decided: dict
) -> None:
    rng = np.random.default_rng(10)
    inits = {
        "w1": randn(rng, 32, 32, scale=0.2),
        "w2": randn(rng, 32, 32, scale=0.2),
        "gamma": (1 + 0.1 * rng.standard_normal(32)).astype(np.float32),
        "beta": randn(rng, 32),
        "sqrt2": np.array(math.sqrt(2), np.float32),
        "one": np.array(1, np.float32),
        "half": np.array(0.5, np.float32),
        "two": np.array(2, np.float32),
        "eps": np.array(1e-5, np.float32),
    }
    used = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    model = build(text, {k: v for k, v in inits.items() if k in used}, opset)
    result, index = quantize(model, {"x": rng.standard_normal((16, 8, 32)).astype(np.float32)})

    for node, category in decided.items():
        found = decision(result, node)
        assert (found.quantized, found.category) == (False, category), node
        if category == "kept float" and found.op_type in ARITHMETIC_OPS:
            assert found.reason.startswith(found.op_type), node
            assert found.reason.endswith(ARITHMETIC.format("")[1:]), node
        elif category == "kept float":
            assert found.reason == KEEP_FLOAT
    for node in float_nodes:
        assert not any(index.reads_dq(node)), f"{node} reads a DequantizeLinear"
    if "sqrt2" in used:  # GELU's Div by sqrt(2) says so
        assert decision(result, "div").reason == ARITHMETIC.format(f"Div by constant {math.sqrt(2):g}")
    # the MatMul after the float block still runs in INT8
    assert decision(result, "down").quantized
    assert index.reads_dq("down") == [True, True]
    assert_no_qdq_on_graph_outputs(index, model)
    feed = {"x": rng.standard_normal((4, 8, 32)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 25


# ----------------------------------------------------------------------------------------------
# pooling: quantized only next to a quantized neighbour

POOLS = {
    "MaxPool": "MaxPool<kernel_shape = [2, 2], strides = [2, 2]>",
    "AveragePool": "AveragePool<kernel_shape = [2, 2], strides = [2, 2]>",
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_pool_between_quantized_convs_is_quantized(pool: str) -> None:
    rng = np.random.default_rng(11)
    model = build(
        f"""g (float[N, 16, 8, 8] x) => (float[N, 32, 4, 4] y) {{
            [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
            [relu1] r1 = Relu(c1)
            [pool] p = {POOLS[pool]}(r1)
            [conv2] y = Conv<pads = [1, 1, 1, 1]>(p, w2)
        }}""",
        {"w1": randn(rng, 16, 16, 3, 3), "w2": randn(rng, 32, 16, 3, 3)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((16, 16, 8, 8)).astype(np.float32)})
    found = decision(result, "pool")
    assert (found.quantized, found.reason, found.category) == (True, "rule pooling (neighbour)", "")
    assert [(u.tensor, u.input_index) for u in found.uses] == [("r1", 0)]
    assert index.activation_qdq("pool", 0)[0].input[0] == "r1"
    assert index.activation_qdq("conv2", 0)[0].input[0] == "p"
    feed = {"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 30


def test_global_average_pool_before_flatten_and_gemm_is_quantized() -> None:
    rng = np.random.default_rng(12)
    model = build(
        """g (float[N, 32, 4, 4] x) => (float[N, 16] y) {
            [gap] p = GlobalAveragePool(x)
            [flatten] f = Flatten(p)
            [fc] y = Gemm<transB = 1>(f, w, b)
        }""",
        {"w": randn(rng, 16, 32), "b": randn(rng, 16)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((16, 32, 4, 4)).astype(np.float32)})
    assert decision(result, "fc").quantized
    found = decision(result, "gap")
    assert (found.quantized, found.category) == (True, "")
    assert index.reads_dq("gap") == [True]
    assert index.reads_dq("flatten") == [False]


def test_quantized_tensor_that_is_a_graph_output_stays_float_there() -> None:
    rng = np.random.default_rng(24)
    model = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] r, float[N, 16, 8, 8] y) {
            [relu] r = Relu(x)
            [conv] y = Conv<pads = [1, 1, 1, 1]>(r, w)
        }""",
        {"w": randn(rng, 16, 16, 3, 3)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)})
    assert ("r", 0) in {(u.tensor, u.input_index) for u in decision(result, "conv").uses}
    assert [o.name for o in index.proto.graph.output] == ["r", "y"]
    assert index.producer_op("r") == "Relu"
    assert index.activation_qdq("conv", 0)[0].input[0] == "r"
    assert_no_qdq_on_graph_outputs(index, model)
    feed = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(index.proto, feed)[0], run(model, feed)[0])


def test_pool_sharing_its_input_with_a_quantized_conv_is_quantized() -> None:
    rng = np.random.default_rng(13)
    model = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y, float[N, 16, 4, 4] z) {
            [relu] r = Relu(x)
            [conv] y = Conv<pads = [1, 1, 1, 1]>(r, w)
            [pool] z = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r)
        }""",
        {"w": randn(rng, 16, 16, 3, 3)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((16, 16, 8, 8)).astype(np.float32)})
    assert decision(result, "pool").quantized
    assert index.reads_dq("pool") == [True]
    assert index.nodes["pool"].input[0] == index.nodes["conv"].input[0]


@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool", "GlobalAveragePool"])
def test_pool_without_quantized_neighbour_stays_float(pool: str) -> None:
    rng = np.random.default_rng(14)
    out = "[N, 8, 1, 1]" if pool == "GlobalAveragePool" else "[N, 8, 4, 4]"
    model = build(
        f"""g (float[N, 8, 8, 8] x) => (float{out} y) {{
            [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w)
            [relu] r = Relu(c)
            [pool] p = {POOLS.get(pool, pool)}(r)
            [relu2] y = Relu(p)
        }}""",
        {"w": randn(rng, 8, 8, 3, 3)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((8, 8, 8, 8)).astype(np.float32)})
    conv = decision(result, "conv")
    assert (conv.quantized, conv.category) == (False, "few channels")
    found = decision(result, "pool")
    assert (found.quantized, found.reason, found.category) == (
        False,
        "no quantized neighbour",
        "no quantized neighbour",
    )
    assert Q not in index.ops and DQ not in index.ops
    feed = {"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(index.proto, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Concat: inputs and output share one scale


def test_concat_inputs_and_output_share_one_scale() -> None:
    rng = np.random.default_rng(15)
    model = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
            [conv_a] a = Conv<pads = [1, 1, 1, 1]>(x, wa)
            [relu_a] ra = Relu(a)
            [conv_b] b = Conv<pads = [1, 1, 1, 1]>(x, wb)
            [relu_b] rb = Relu(b)
            [concat] cat = Concat<axis = 1>(ra, rb)
            [conv_c] y = Conv<pads = [1, 1, 1, 1]>(cat, wc)
        }""",
        # branch b is ten times larger: without sharing, the scales would differ
        {
            "wa": randn(rng, 16, 16, 3, 3),
            "wb": randn(rng, 16, 16, 3, 3, scale=1.0),
            "wc": randn(rng, 32, 32, 3, 3),
        },
    )
    calib = {"x": rng.standard_normal((16, 16, 8, 8)).astype(np.float32)}
    result, index = quantize(model, calib)

    found = decision(result, "concat")
    assert (found.quantized, found.reason) == (True, "rule concat (shared_scale)")
    assert sorted((u.tensor, u.input_index) for u in found.uses) == [("ra", 0), ("rb", 1)]
    group = result.plan.groups["cat"]
    assert result.plan.groups["ra"] == result.plan.groups["rb"] == group

    scales = []
    for node, i in [("concat", 0), ("concat", 1), ("conv_c", 0)]:
        quantize_node, dequantize_node = index.activation_qdq(node, i)
        scales += [index.array(quantize_node.input[1]), index.array(dequantize_node.input[1])]
    assert all(s.shape == () for s in scales)
    assert len({float(s) for s in scales}) == 1, scales
    # the shared scale covers the larger branch
    assert float(scales[0]) == pytest.approx(result.ranges["rb"].chosen_high / 127, rel=1e-6)
    assert result.ranges["ra"].chosen_high < result.ranges["rb"].chosen_high / 3
    feed = {"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 25


def test_concat_whose_output_is_not_quantized_stays_float() -> None:
    model = build(
        """g (float[N, 16, 8, 8] x, float[N, 16, 8, 8] z) => (float[N, 32, 8, 8] y) {
            [concat] y = Concat<axis = 1>(x, z)
        }""",
        {},
    )
    result, index = quantize(model, None)
    found = decision(result, "concat")
    assert (found.quantized, found.reason, found.category) == (
        False,
        "output not quantized downstream",
        "no quantized neighbour",
    )
    assert index.ops == ["Concat"]


# ----------------------------------------------------------------------------------------------
# attention: the two BMMs, the -inf mask path


def attention(**options):
    model = model_builders.masked_attention(seed=17)
    return model, *quantize(model, model_builders.attention_inputs(1, 16), **options)


def test_attention_bmms_are_quantized() -> None:
    model, result, index = attention()
    bmms = [
        d
        for d in result.plan.decisions
        if d.op_type == "MatMul" and all(u.role == "activation" for u in d.uses)
    ]
    bmms = [d for d in bmms if len(d.uses) == 2]
    assert {tuple(u.tensor for u in d.uses) for d in bmms} == {("q4", "kt"), ("probs", "v4")}
    for found in bmms:
        assert (found.quantized, found.reason) == (True, "rule matmul (matmul)")
        assert index.reads_dq(found.node) == [True, True]
    # the Softmax output is quantized over its known range [0, 1]
    probs_q = next(n for n in index.proto.graph.node if n.op_type == Q and n.input[0] == "probs")
    assert float(index.array(probs_q.input[1])) <= 1 / 127 + 1e-9
    feed = model_builders.attention_inputs(2, 4)
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 18


def test_attention_bmms_left_out_with_quantize_bmm_false() -> None:
    model, result, index = attention(quantize_bmm=False)
    skipped = [d for d in result.plan.decisions if d.category == "bmm disabled"]
    assert len(skipped) == 2
    for found in skipped:
        assert found.op_type == "MatMul" and not found.quantized
        assert found.reason == "activation x activation MatMul (attention BMM) left out by option"
        assert not any(index.reads_dq(found.node))
    # the weight MatMuls are still quantized
    weight_matmuls = [d for d in result.plan.decisions if d.op_type == "MatMul" and d.quantized]
    assert len(weight_matmuls) == 6
    assert all(any(u.role == "weight" for u in d.uses) for d in weight_matmuls)
    assert not any(
        n.op_type == Q and n.input[0] in ("probs", "q4", "kt", "v4") for n in index.proto.graph.node
    )
    feed = model_builders.attention_inputs(2, 4)
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 18


def test_infinite_mask_path_gets_no_qdq() -> None:
    _, result, index = attention()
    assert set(result.plan.nonfinite) >= {"minus_inf", "additive", "masked"}
    assert "probs" not in result.plan.nonfinite  # Softmax output is finite again
    for tensor in ("minus_inf", "additive", "masked"):
        assert not result.plan.is_quantized(tensor)
        assert all(n.op_type not in (Q, DQ) for n, _ in index.consumers(tensor)), tensor
    mask_add = next(n for n in index.proto.graph.node if n.op_type == "Add" and "additive" in n.input)
    softmax = next(n for n in index.proto.graph.node if n.op_type == "Softmax")
    assert not any(index.reads_dq(mask_add.name)) and not any(index.reads_dq(softmax.name))
    assert not decision(result, mask_add.name).quantized
    # no scale anywhere is inf or NaN
    for node in index.proto.graph.node:
        if node.op_type in (Q, DQ):
            assert np.isfinite(index.array(node.input[1])).all()


def test_inf_carrying_activation_is_skipped_with_reason() -> None:
    """A weighted op reading a tensor that can carry -inf is left float, with the reason."""
    rng = np.random.default_rng(18)
    model = build(
        """g (float[N, 8, 32] x, bool[N, 8, 32] mask) => (float[N, 8, 32] y) {
            [where] m = Where(mask, x, minus_inf)
            [mm] y = MatMul(m, w)
        }""",
        {"minus_inf": np.array(-np.inf, np.float32), "w": randn(rng, 32, 32)},
    )
    calib = {
        "x": rng.standard_normal((8, 8, 32)).astype(np.float32),
        "mask": rng.random((8, 8, 32)) > 0.2,
    }
    result, index = quantize(model, calib)
    found = decision(result, "mm")
    assert (found.quantized, found.category) == (False, "can carry inf")
    assert found.reason == "input m can carry +/-inf (from minus_inf via Where)"
    assert result.plan.nonfinite["m"] == "from minus_inf via Where"
    assert Q not in index.ops and DQ not in index.ops


def test_tensor_seen_non_finite_in_calibration_is_dropped() -> None:
    """Log(Relu(x)) is -inf wherever x <= 0: not visible statically, caught by calibration."""
    rng = np.random.default_rng(22)
    model = build(
        """g (float[N, 8, 32] x) => (float[N, 8, 32] y) {
            [relu] r = Relu(x)
            [log] l = Log(r)
            [mm] y = MatMul(l, w)
        }""",
        {"w": randn(rng, 32, 32)},
    )
    result, index = quantize(model, {"x": rng.standard_normal((8, 8, 32)).astype(np.float32)})
    found = decision(result, "mm")
    assert (found.quantized, found.category, found.uses) == (False, "can carry inf", [])
    nonfinite = result.ranges["l"].nonfinite
    assert nonfinite > 0
    assert found.reason == f"input l held {nonfinite} non-finite values during calibration"
    assert result.plan.nonfinite["l"] == f"{nonfinite} NaN/inf values seen during calibration"
    assert Q not in index.ops and DQ not in index.ops  # the weight stays float with its node
    assert index.initializers["w"].data_type == TensorProto.FLOAT


# ----------------------------------------------------------------------------------------------
# skips with reasons: GEMV, tiny GEMM, few channels, non-constant weights


@pytest.mark.parametrize(
    ("text", "inits", "input_shape", "reason", "category"),
    [
        (
            "g (float[1, 32] x) => (float[1, 32] y) { [node] y = MatMul(x, w) }",
            {"w": (32, 32)}, (1, 32), "GEMV (M=1, K=32, N=32): memory bound, no gain", "gemv/tiny",
        ),
        (
            "g (float[N, 8, 32] x) => (float[N, 8, 1] y) { [node] y = MatMul(x, w) }",
            {"w": (32, 1)}, (4, 8, 32), "GEMV (M=?, K=32, N=1): memory bound, no gain", "gemv/tiny",
        ),
        (
            "g (float[1, 32] x) => (float[1, 64] y) { [node] y = Gemm<transB = 1>(x, w) }",
            {"w": (64, 32)}, (1, 32), "GEMV (M=1, K=32, N=64): memory bound, no gain", "gemv/tiny",
        ),
        (
            "g (float[32, 1] x) => (float[1, 64] y) { [node] y = Gemm<transA = 1>(x, w) }",
            {"w": (32, 64)}, (32, 1), "GEMV (M=1, K=32, N=64): memory bound, no gain", "gemv/tiny",
        ),
        (
            "g (float[N, 8, 8] x) => (float[N, 8, 64] y) { [node] y = MatMul(x, w) }",
            {"w": (8, 64)}, (4, 8, 8), "tiny GEMM (K=8, N=64 < 16)", "gemv/tiny",
        ),
        (
            "g (float[N, 8, 64] x) => (float[N, 8, 8] y) { [node] y = MatMul(x, w) }",
            {"w": (64, 8)}, (4, 8, 64), "tiny GEMM (K=64, N=8 < 16)", "gemv/tiny",
        ),
        (
            "g (float[N, 64] x) => (float[N, 10] y) { [node] y = Gemm<transB = 1>(x, w) }",
            {"w": (10, 64)}, (4, 64), "tiny GEMM (K=64, N=10 < 16)", "gemv/tiny",
        ),
        (
            "g (float[N, 32] x) => (float[N] y) { [node] y = MatMul(x, w) }",
            {"w": (32,)}, (4, 32), "matrix-vector product (1-D weight)", "gemv/tiny",
        ),
        (
            "g (float[N, 3, 8, 8] x) => (float[N, 32, 8, 8] y) { [node] y = Conv<pads = [1, 1, 1, 1]>(x, w) }",
            {"w": (32, 3, 3, 3)}, (4, 3, 8, 8), "3->32 channels (< 16)", "few channels",
        ),
        (
            "g (float[N, 32, 8, 8] x) => (float[N, 8, 8, 8] y) { [node] y = Conv<pads = [1, 1, 1, 1]>(x, w) }",
            {"w": (8, 32, 3, 3)}, (4, 32, 8, 8), "32->8 channels (< 16)", "few channels",
        ),
        (
            "g (float[N, 8, 8, 8] x) => (float[N, 32, 16, 16] y) { [node] y = ConvTranspose<strides = [2, 2]>(x, w) }",
            {"w": (8, 32, 2, 2)}, (4, 8, 8, 8), "8->32 channels (< 16)", "few channels",
        ),
        (
            "g (float[32, N] x) => (float[32, N] y) { [node] y = MatMul(w, x) }",
            {"w": (32, 32)}, (32, 4), "first input is a constant", "constant activation",
        ),
        (
            "g (int32[N, 32] x) => (int32[N, 32] y) { [node] y = MatMul(x, w) }",
            {"w": (32, 32)}, (4, 32), "input x is INT32, not float", "not float",
        ),
    ],
    ids=["gemv_m1", "gemv_n1", "gemm_m1", "gemm_transA_m1", "tiny_k", "tiny_n", "gemm_tiny_n", "matmul_1d",
         "conv_3_in", "conv_8_out", "deconv_8_in", "constant_a", "int_matmul"],
)  # fmt: skip
def test_skipped_layers_have_reasons(text, inits, input_shape, reason, category) -> None:
    rng = np.random.default_rng(19)
    dtype = np.int32 if text.startswith("g (int32") else np.float32
    model = build(text, {name: randn(rng, *shape).astype(dtype) for name, shape in inits.items()})
    result, index = quantize(model, {"x": rng.standard_normal(input_shape).astype(dtype)})
    found = decision(result, "node")
    assert (found.quantized, found.reason, found.category, found.uses) == (False, reason, category, [])
    assert Q not in index.ops and DQ not in index.ops
    assert result.plan.activation_tensors() == []


@pytest.mark.parametrize(
    "text",
    [
        "g (float[N, 16, 8, 8] x, float[32, 16, 3, 3] w) => (float[N, 32, 8, 8] y) { [node] y = Conv<pads = [1, 1, 1, 1]>(x, w) }",
        "g (float[N, 32] x, float[64, 32] w) => (float[N, 64] y) { [node] y = Gemm<transB = 1>(x, w) }",
        """g (float[N, 32] x, float[64, 32] w0) => (float[N, 64] y) {
            [relu] w = Relu(w0)
            [node] y = Gemm<transB = 1>(x, w)
        }""",
    ],
    ids=["conv_weight_input", "gemm_weight_input", "gemm_computed_weight"],
)
def test_non_constant_weight_is_skipped(text: str) -> None:
    model = build(text, {})
    result, index = quantize(model, None)
    found = decision(result, "node")
    assert (found.quantized, found.reason, found.category) == (
        False,
        "weight is not a constant (computed at run time)",
        "non-constant weight",
    )
    assert Q not in index.ops and DQ not in index.ops


def test_initializer_that_is_also_a_graph_input() -> None:
    rng = np.random.default_rng(23)
    model = build(
        """g (float[N, 16, 8, 8] x, float[32, 16, 3, 3] w) => (float[N, 32, 8, 8] y) {
            [node] y = Conv<pads = [1, 1, 1, 1]>(x, w)
        }""",
        {"w": randn(rng, 32, 16, 3, 3)},
    )
    feed = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    run(model, feed)  # the float model runs without feeding w
    _, index = quantize(model, {"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)})
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 30


# ----------------------------------------------------------------------------------------------
# user filters, and decisions for every candidate on whole models


def test_op_types_filter_excludes_other_ops() -> None:
    model = model_builders.residual_cnn(seed=20)
    result, index = quantize(model, model_builders.cnn_inputs(1, 16), op_types=["Conv"])
    for found in result.plan.decisions:
        if found.op_type == "Conv":
            assert found.quantized
        else:
            assert (found.quantized, found.category) == (False, "excluded by user"), found.node
            assert found.reason == f"{found.op_type} not in --op-types"
    assert not any(index.reads_dq("add1")) and not any(index.reads_dq("pool1"))
    assert all(index.reads_dq(conv)[:2] == [True, True] for conv in ("conv1", "conv2", "conv3"))


def test_exclude_nodes_filter_matches_names() -> None:
    model = model_builders.residual_cnn(seed=20)
    result, index = quantize(model, model_builders.cnn_inputs(1, 16), exclude_nodes="^conv[23]$")
    for name in ("conv2", "conv3"):
        found = decision(result, name)
        assert (found.quantized, found.category) == (False, "excluded by user")
        assert found.reason == "name matches --exclude-nodes '^conv[23]$'"
        assert not any(index.reads_dq(name))
        weight = index.nodes[name].input[1]
        assert index.initializers[weight].data_type == TensorProto.FLOAT
    assert decision(result, "conv1").quantized
    assert index.reads_dq("conv1")[:2] == [True, True]


@pytest.mark.parametrize(
    ("builder", "data"),
    [
        (model_builders.residual_cnn, lambda: model_builders.cnn_inputs(1, 16)),
        (model_builders.masked_attention, lambda: model_builders.attention_inputs(1, 16)),
    ],
    ids=["cnn", "attention"],
)
def test_every_candidate_has_a_decision(builder, data) -> None:
    model = builder()
    result, index = quantize(model, data())
    assert_every_candidate_decided(result, model)
    assert len({d.node for d in result.plan.decisions}) == len(result.plan.decisions)
    assert_no_qdq_on_graph_outputs(index, model)
    assert_zero_points_are_zero(index)
    # every Q/DQ scale is a positive finite float32
    for node in index.proto.graph.node:
        if node.op_type in (Q, DQ):
            scale = index.array(node.input[1])
            assert scale.dtype == np.float32 and np.all(scale > 0) and np.isfinite(scale).all()


def test_residual_cnn_numerics() -> None:
    model = model_builders.residual_cnn(seed=21)
    result, index = quantize(model, model_builders.cnn_inputs(1, 32))
    quantized, _ = result.plan.counts()
    assert quantized == {"Conv": 3, "Add": 1, "MaxPool": 1}
    feed = model_builders.cnn_inputs(2, 8)
    assert snr_db(run(model, feed)[0], run(index.proto, feed)[0]) > 30
