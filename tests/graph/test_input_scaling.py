"""Per-input-channel scaling of GEMM inputs (onnxq.graph.input_scaling): every fold case and the Mul
fallback computes the same outputs as the original model in ONNX Runtime (random s in [0.25, 4],
seeded), passes the full checker, and stores exactly W * s in the consumers' weights (numpy).

Cases: LayerNormalization into Q/K/V (three consumers), LayerNormalization without bias into a Gemm
transB=1, RMSNormalization, ORT's SimplifiedLayerNormalization, Mul constants of every broadcast shape,
the Mul/Add chain, a linear layer with bias (MatMul + Add), MatMul and Gemm producers (C absent, scalar,
[N], [1, N]), the inserted Mul for each reason (graph input, other reader, graph output, non-scaling
producer, non-constant Gemm C, Mul/Add chain with a shared Mul output), weights shared with a node
outside the consumers (copied) and between consumers (scaled once), a producer constant shared with
another node (copied), float16 models (fold and Mul), bfloat16 storage, and the reasons of
scaling_problem (apply_input_scale raises them and leaves the model untouched).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from model_builders import IR_VERSION, build, randn, run

from onnxq.graph.input_scaling import InputScaling, apply_input_scale, scaling_problem

K = 16
N = 12
M = 5
SCALE_LOW, SCALE_HIGH = 0.25, 4.0
#: float32 outputs after a rescaling differ from the original only by rounding (a few ulps per term)
FLOAT32_RELATIVE_TOLERANCE = 1e-5
#: float16 has 11 significant bits: every rescaled constant and product rounds once more
FLOAT16_RELATIVE_TOLERANCE = 2e-2


def random_scale(seed: int, k: int = K) -> np.ndarray:
    return np.random.default_rng(seed).uniform(SCALE_LOW, SCALE_HIGH, k).astype(np.float32)


def feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Seeded normal inputs for every graph input (symbolic dimensions read as M)."""
    rng = np.random.default_rng(seed)
    result = {}
    for graph_input in model.graph.input:
        tensor_type = graph_input.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else M for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        result[graph_input.name] = rng.standard_normal(shape).astype(dtype)
    return result


def scale_model(
    original: onnx.ModelProto, activation: str, consumers: Sequence[str], seed: int = 0
) -> tuple[onnx.ModelProto, InputScaling, np.ndarray]:
    """Scale a shape-inferred copy (as the pipeline has it: the checker then also compares the declared
    shapes of intermediate values with the rewritten graph's)."""
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(original))
    scale = random_scale(seed)
    result = apply_input_scale(model, activation, consumers, scale)
    return ir.serde.serialize_model(model), result, scale


def assert_same_outputs(
    original: onnx.ModelProto, scaled: onnx.ModelProto, tolerance: float = FLOAT32_RELATIVE_TOLERANCE
) -> None:
    inputs = feeds(original, seed=1)
    for expected, actual in zip(run(original, inputs), run(scaled, inputs), strict=True):
        expected32, actual32 = expected.astype(np.float32), actual.astype(np.float32)
        peak = float(np.abs(expected32).max())
        np.testing.assert_allclose(actual32, expected32, rtol=tolerance, atol=tolerance * peak)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    found = next(t for t in model.graph.initializer if t.name == name)
    return onnx.numpy_helper.to_array(found)


def node_input(model: onnx.ModelProto, node_name: str, index: int) -> str:
    return next(n for n in model.graph.node if n.name == node_name).input[index]


def assert_weight_rows_scaled(
    original: onnx.ModelProto, scaled: onnx.ModelProto, node: str, scale: np.ndarray, k_axis: int = 0
) -> None:
    """The consumer's stored weight is W * s along K (numpy, same storage type)."""
    before = initializer(original, node_input(original, node, 1))
    after = initializer(scaled, node_input(scaled, node, 1))
    along_k = scale[:, None] if k_axis == 0 else scale[None, :]
    expected = (before.astype(np.float32) * along_k).astype(before.dtype)
    assert after.dtype == before.dtype
    np.testing.assert_array_equal(after, expected)


def check_folded(original: onnx.ModelProto, activation: str, consumers: Sequence[str]) -> InputScaling:
    """Scale, then: same outputs, full checker, the same op list (nothing inserted), weights W * s."""
    scaled, result, scale = scale_model(original, activation, consumers)
    onnx.checker.check_model(scaled, full_check=True)
    assert op_types(scaled) == op_types(original)
    assert result.folded_into is not None and result.new_input == activation
    assert result.consumers == tuple(consumers)
    for consumer in consumers:
        assert node_input(scaled, consumer, 0) == activation
        assert_weight_rows_scaled(original, scaled, consumer, scale)
    assert_same_outputs(original, scaled)
    return result


# --- folds ----------------------------------------------------------------------------------------


def layer_norm_qkv(dtype: str = "float", np_dtype: type = np.float32) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    weights = {name: randn(rng, K, N).astype(np_dtype) for name in ("wq", "wk", "wv")}
    weights["gamma"] = (1 + randn(rng, K)).astype(np_dtype)
    weights["beta"] = randn(rng, K).astype(np_dtype)
    text = f"""
    g ({dtype}[2, M, {K}] x) => ({dtype}[2, M, {N}] q, {dtype}[2, M, {N}] k, {dtype}[2, M, {N}] v) {{
        [ln] h = LayerNormalization<axis=-1>(x, gamma, beta)
        [q_proj] q = MatMul(h, wq)
        [k_proj] k = MatMul(h, wk)
        [v_proj] v = MatMul(h, wv)
    }}"""
    return build(text, weights)


def test_layer_norm_into_qkv_three_consumers() -> None:
    result = check_folded(layer_norm_qkv(), "h", ["q_proj", "k_proj", "v_proj"])
    assert (result.folded_into, result.how) == ("ln", "LayerNormalization scale and bias")


def test_layer_norm_without_bias_into_gemm_trans_b() -> None:
    rng = np.random.default_rng(4)
    weights = {"gamma": 1 + randn(rng, K), "b": randn(rng, N, K), "c": randn(rng, N)}
    text = f"""
    g (float[M, {K}] x) => (float[M, {N}] y) {{
        [ln] h = LayerNormalization<axis=1>(x, gamma)
        [fc] y = Gemm<transB=1>(h, b, c)
    }}"""
    original = build(text, weights)
    scaled, result, scale = scale_model(original, "h", ["fc"])
    assert result.how == "LayerNormalization scale and bias"
    assert op_types(scaled) == op_types(original)
    assert_weight_rows_scaled(original, scaled, "fc", scale, k_axis=1)
    onnx.checker.check_model(scaled, full_check=True)
    assert_same_outputs(original, scaled)


def test_rms_normalization() -> None:
    rng = np.random.default_rng(5)
    text = f"""
    g (float[M, {K}] x) => (float[M, {N}] y) {{
        [rms] h = RMSNormalization<axis=-1>(x, gamma)
        [fc] y = MatMul(h, w)
    }}"""
    original = build(text, {"gamma": 1 + randn(rng, K), "w": randn(rng, K, N)}, opset=23)
    assert check_folded(original, "h", ["fc"]).how == "RMSNormalization scale and bias"


def test_simplified_layer_normalization_of_onnx_runtime() -> None:
    """ORT's contrib op (default domain): ORT runs it, the ONNX checker does not know it."""
    rng = np.random.default_rng(6)
    text = f"""<ir_version: {IR_VERSION}, opset_import: ["" : 17]>
    g (float[M, {K}] x) => (float[M, {N}] y) {{
        [rms] h = SimplifiedLayerNormalization<axis=-1>(x, gamma)
        [fc] y = MatMul(h, w)
    }}"""
    original = onnx.parser.parse_model(text)
    for name, array in {"gamma": 1 + randn(rng, K), "w": randn(rng, K, N)}.items():
        original.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    scaled, result, scale = scale_model(original, "h", ["fc"])
    assert result.how == "SimplifiedLayerNormalization scale and bias"
    assert op_types(scaled) == op_types(original)
    assert_weight_rows_scaled(original, scaled, "fc", scale)
    assert_same_outputs(original, scaled)


@pytest.mark.parametrize("shape", [(), (1,), (K,), (1, 1, K), (2, 1, 1), (2, 1, K)])
@pytest.mark.parametrize("constant_first", [False, True])
def test_mul_constant(shape: tuple[int, ...], constant_first: bool) -> None:
    rng = np.random.default_rng(7)
    operands = "c, r" if constant_first else "r, c"
    text = f"""
    g (float[2, M, {K}] x) => (float[2, M, {N}] y) {{
        [relu] r = Relu(x)
        [scale] h = Mul({operands})
        [fc] y = MatMul(h, w)
    }}"""
    original = build(text, {"c": (1 + randn(rng, *shape)).astype(np.float32), "w": randn(rng, K, N)})
    result = check_folded(original, "h", ["fc"])
    assert (result.folded_into, result.how) == ("scale", "Mul constant")


def test_mul_add_chain() -> None:
    """A decomposed LayerNorm's affine: Add(Mul(x, gamma), beta)."""
    rng = np.random.default_rng(8)
    text = f"""
    g (float[M, {K}] x) => (float[M, {N}] y) {{
        [relu] r = Relu(x)
        [affine_mul] t = Mul(r, gamma)
        [affine_add] h = Add(beta, t)
        [fc] y = MatMul(h, w)
    }}"""
    original = build(text, {"gamma": 1 + randn(rng, K), "beta": randn(rng, 1, K), "w": randn(rng, K, N)})
    result = check_folded(original, "h", ["fc"])
    assert (result.folded_into, result.how) == ("affine_add", "Mul/Add chain")


def test_linear_layer_with_bias() -> None:
    rng = np.random.default_rng(9)
    text = f"""
    g (float[M, 8] x) => (float[M, {N}] y) {{
        [fc1] t = MatMul(x, w1)
        [fc1_bias] h = Add(t, b1)
        [fc2] y = MatMul(h, w2)
    }}"""
    original = build(text, {"w1": randn(rng, 8, K), "b1": randn(rng, K), "w2": randn(rng, K, N)})
    result = check_folded(original, "h", ["fc2"])
    assert (result.folded_into, result.how) == ("fc1_bias", "MatMul output columns and Add constant")


def test_matmul_producer() -> None:
    rng = np.random.default_rng(10)
    text = f"""
    g (float[2, M, 8] x) => (float[2, M, {N}] y) {{
        [fc1] h = MatMul(x, w1)
        [fc2] y = MatMul(h, w2)
    }}"""
    original = build(text, {"w1": randn(rng, 8, K), "w2": randn(rng, K, N)})
    assert check_folded(original, "h", ["fc2"]).how == "MatMul output columns"


@pytest.mark.parametrize("bias_shape", [None, (), (K,), (1, K), (M, 1)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_producer(bias_shape: tuple[int, ...] | None, trans_b: int) -> None:
    rng = np.random.default_rng(11)
    weights = {"b1": randn(rng, *((K, 8) if trans_b else (8, K))), "w2": randn(rng, K, N)}
    operands = "x, b1"
    if bias_shape is not None:
        weights["c1"] = randn(rng, *bias_shape)
        operands += ", c1"
    text = f"""
    g (float[{M}, 8] x) => (float[{M}, {N}] y) {{
        [fc1] h = Gemm<transB={trans_b}, alpha=0.5, beta=2.0>({operands})
        [fc2] y = MatMul(h, w2)
    }}"""
    original = build(text, weights)
    result = check_folded(original, "h", ["fc2"])
    assert (result.folded_into, result.how) == ("fc1", "Gemm output columns (and bias)")


# --- the inserted Mul -----------------------------------------------------------------------------

FALLBACKS = {
    "graph input": (
        "g (float[M, {K}] h) => (float[M, {N}] y) { [fc] y = MatMul(h, w) }",
        "h is a graph input",
    ),
    "other reader": (
        """g (float[M, {K}] x) => (float[M, {N}] y, float[M, {K}] z) {
            [ln] h = LayerNormalization(x, gamma)
            [fc] y = MatMul(h, w)
            [residual] z = Add(h, x)
        }""",
        "h is also read by residual",
    ),
    "graph output": (
        """g (float[M, {K}] x) => (float[M, {N}] y, float[M, {K}] h) {
            [ln] h = LayerNormalization(x, gamma)
            [fc] y = MatMul(h, w)
        }""",
        "h is a graph output",
    ),
    "non-scaling producer": (
        "g (float[M, {K}] x) => (float[M, {N}] y) { [relu] h = Relu(x) [fc] y = MatMul(h, w) }",
        "its producer Relu is not a scaling op this pass folds into",
    ),
    "Mul of two activations": (
        """g (float[M, {K}] x) => (float[M, {N}] y) {
            [relu] r = Relu(x)
            [square] h = Mul(r, x)
            [fc] y = MatMul(h, w)
        }""",
        "square has no float constant operand along the last axis",
    ),
    "Gemm bias not constant": (
        """g (float[{M}, {K}] x, float[{K}] c) => (float[{M}, {N}] y) {
            [fc1] h = Gemm(x, w0, c)
            [fc] y = MatMul(h, w)
        }""",
        "fc1 bias C is not a float constant",
    ),
    "chain with a shared Mul output": (
        """g (float[M, {K}] x) => (float[M, {N}] y, float[M, {K}] t) {
            [relu] r = Relu(x)
            [affine_mul] t = Mul(r, gamma)
            [affine_add] h = Add(t, gamma)
            [fc] y = MatMul(h, w)
        }""",
        "affine_add's other operand cannot be scaled: t is a graph output",
    ),
    "Add broadcasting one channel to K": (
        """g (float[M, 1] x) => (float[M, {N}] y) {
            [one_channel] t = Mul(x, two)
            [broadcast_add] h = Add(t, gamma)
            [fc] y = MatMul(h, w)
        }""",
        "broadcast_add's other operand cannot be scaled: t has 1 channels on its last axis, not {K}",
    ),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_inserted_mul(case: str) -> None:
    template, reason = FALLBACKS[case]
    text, reason = (
        t.replace("{K}", str(K)).replace("{N}", str(N)).replace("{M}", str(M)) for t in (template, reason)
    )
    rng = np.random.default_rng(12)
    weights = {
        "gamma": 1 + randn(rng, K),
        "w": randn(rng, K, N),
        "w0": randn(rng, K, K),
        "two": np.float32(2),
    }
    original = build(text, {name: array for name, array in weights.items() if name in text})
    scaled, result, scale = scale_model(original, "h", ["fc"])
    onnx.checker.check_model(scaled, full_check=True)
    assert result.folded_into is None
    assert result.how == f"inserted Mul ({reason})"
    # the original op list, plus exactly one Mul: the inserted one
    assert [n.op_type for n in scaled.graph.node if n.output[0] != result.new_input] == op_types(original)
    assert op_types(scaled).count("Mul") == op_types(original).count("Mul") + 1
    assert result.new_input != "h" and node_input(scaled, "fc", 0) == result.new_input
    mul = next(n for n in scaled.graph.node if n.output[0] == result.new_input)
    assert mul.input[0] == "h"
    np.testing.assert_allclose(initializer(scaled, mul.input[1]), 1 / scale, rtol=1e-7)
    assert_weight_rows_scaled(original, scaled, "fc", scale)
    assert_same_outputs(original, scaled)


def test_other_reader_keeps_the_original_activation() -> None:
    template, _ = FALLBACKS["other reader"]
    text = template.replace("{K}", str(K)).replace("{N}", str(N))
    rng = np.random.default_rng(13)
    original = build(text, {"gamma": 1 + randn(rng, K), "w": randn(rng, K, N)})
    scaled, result, _ = scale_model(original, "h", ["fc"])
    assert node_input(scaled, "residual", 0) == "h"
    np.testing.assert_array_equal(initializer(scaled, "gamma"), initializer(original, "gamma"))
    assert result.new_input != "h"


# --- shared constants -----------------------------------------------------------------------------


def test_weight_shared_with_another_node_is_copied() -> None:
    rng = np.random.default_rng(14)
    text = f"""
    g (float[M, {K}] x, float[M, {K}] other) => (float[M, {N}] y, float[M, {N}] z) {{
        [ln] h = LayerNormalization(x, gamma)
        [fc] y = MatMul(h, w)
        [elsewhere] z = MatMul(other, w)
    }}"""
    original = build(text, {"gamma": 1 + randn(rng, K), "w": randn(rng, K, N)})
    scaled, _, _ = check_folded_with_outputs(original, "h", ["fc"])
    assert node_input(scaled, "elsewhere", 1) == "w"
    assert node_input(scaled, "fc", 1) != "w"
    np.testing.assert_array_equal(initializer(scaled, "w"), initializer(original, "w"))


def test_weight_shared_by_two_consumers_is_scaled_once() -> None:
    rng = np.random.default_rng(15)
    text = f"""
    g (float[M, {K}] x) => (float[M, {N}] y, float[M, {N}] z) {{
        [ln] h = LayerNormalization(x, gamma)
        [fc_a] y = MatMul(h, w)
        [fc_b] z = Gemm(h, w)
    }}"""
    original = build(text, {"gamma": 1 + randn(rng, K), "w": randn(rng, K, N)})
    scaled, _, _ = check_folded_with_outputs(original, "h", ["fc_a", "fc_b"])
    assert node_input(scaled, "fc_a", 1) == node_input(scaled, "fc_b", 1) == "w"  # in place, no copy
    assert len(scaled.graph.initializer) == len(original.graph.initializer)


def test_producer_constant_shared_with_another_node_is_copied() -> None:
    rng = np.random.default_rng(16)
    text = f"""
    g (float[M, {K}] x, float[M, {K}] other) => (float[M, {N}] y, float[M, {K}] z) {{
        [ln] h = LayerNormalization(x, gamma, beta)
        [fc] y = MatMul(h, w)
        [ln_other] z = LayerNormalization(other, gamma, beta)
    }}"""
    original = build(text, {"gamma": 1 + randn(rng, K), "beta": randn(rng, K), "w": randn(rng, K, N)})
    scaled, _, _ = check_folded_with_outputs(original, "h", ["fc"])
    assert node_input(scaled, "ln_other", 1) == "gamma" and node_input(scaled, "ln_other", 2) == "beta"
    assert node_input(scaled, "ln", 1) != "gamma" and node_input(scaled, "ln", 2) != "beta"


def check_folded_with_outputs(
    original: onnx.ModelProto, activation: str, consumers: Sequence[str]
) -> tuple[onnx.ModelProto, InputScaling, np.ndarray]:
    scaled, result, scale = scale_model(original, activation, consumers)
    onnx.checker.check_model(scaled, full_check=True)
    assert op_types(scaled) == op_types(original) and result.folded_into is not None
    for consumer in consumers:
        assert_weight_rows_scaled(original, scaled, consumer, scale)
    assert_same_outputs(original, scaled)
    return scaled, result, scale


# --- float16 / bfloat16 ---------------------------------------------------------------------------


def test_float16_layer_norm_qkv() -> None:
    original = layer_norm_qkv("float16", np.float16)
    scaled, result, scale = scale_model(original, "h", ["q_proj", "k_proj", "v_proj"])
    onnx.checker.check_model(scaled, full_check=True)
    assert result.how == "LayerNormalization scale and bias" and op_types(scaled) == op_types(original)
    for consumer in ("q_proj", "k_proj", "v_proj"):
        assert_weight_rows_scaled(original, scaled, consumer, scale)  # float32 arithmetic, stored float16
    assert initializer(scaled, "gamma").dtype == np.float16
    assert_same_outputs(original, scaled, FLOAT16_RELATIVE_TOLERANCE)


def test_float16_inserted_mul() -> None:
    rng = np.random.default_rng(17)
    text = f"g (float16[M, {K}] h) => (float16[M, {N}] y) {{ [fc] y = MatMul(h, w) }}"
    original = build(text, {"w": randn(rng, K, N).astype(np.float16)})
    scaled, _, scale = scale_model(original, "h", ["fc"])
    onnx.checker.check_model(scaled, full_check=True)
    mul = next(n for n in scaled.graph.node if n.op_type == "Mul")
    inverse = initializer(scaled, mul.input[1])
    assert inverse.dtype == np.float16
    np.testing.assert_array_equal(inverse, (1 / scale).astype(np.float16))
    assert_same_outputs(original, scaled, FLOAT16_RELATIVE_TOLERANCE)


def test_bfloat16_constants_computed_in_float32() -> None:
    """ORT CPU has no bfloat16 MatMul: the stored values are checked against numpy + ml_dtypes."""
    rng = np.random.default_rng(18)
    bf16 = ml_dtypes.bfloat16
    w = randn(rng, K, N).astype(bf16)
    gamma, beta = (1 + randn(rng, K)).astype(bf16), randn(rng, K).astype(bf16)
    text = f"""
    g (bfloat16[M, {K}] x) => (bfloat16[M, {N}] y) {{
        [ln] h = LayerNormalization(x, gamma, beta)
        [fc] y = MatMul(h, w)
    }}"""
    original = build(text, {"w": w, "gamma": gamma, "beta": beta})
    scaled, result, scale = scale_model(original, "h", ["fc"])
    onnx.checker.check_model(scaled, full_check=True)
    assert result.how == "LayerNormalization scale and bias"
    expected = {
        "w": w.astype(np.float32) * scale[:, None],
        "gamma": gamma.astype(np.float32) / scale,
        "beta": beta.astype(np.float32) / scale,
    }
    for name, value in expected.items():
        stored = initializer(scaled, name)
        assert stored.dtype == bf16
        np.testing.assert_array_equal(stored, value.astype(bf16))


# --- problems -------------------------------------------------------------------------------------

PROBLEM_MODEL = f"""
g (float[M, {K}] x, float[{K}, {N}] runtime_w, float[M, {K}] wide) => (float[M, {N}] a, float[M, {N}] b, float[M, {N}] c, float[2, M, {N}] d, float[M, {K}] e, float[M, {N}] f, float[{N}, {N}] g_out, float[M, {N}] h_out) {{
    [ln] h = LayerNormalization(x, gamma)
    [ok] a = MatMul(h, w)
    [not_constant] b = MatMul(h, runtime_w)
    [trans_a] c = Gemm<transA=1>(hk, w)
    [rank3] d = MatMul(h, w3)
    [relu] e = Relu(h)
    [flipped] f = MatMul(wm, w)
    [other_k] g_out = MatMul(wm2, hn)
    [also_ok] h_out = Gemm(h, w)
}}"""


def problem_model() -> ir.Model:
    rng = np.random.default_rng(19)
    weights = {
        "gamma": 1 + randn(rng, K),
        "w": randn(rng, K, N),
        "w3": randn(rng, 2, K, N),
        "hk": randn(rng, K, M),
        "wm": randn(rng, M, K),
        "wm2": randn(rng, N, K),
        "hn": randn(rng, K, N),
    }
    return ir.serde.deserialize_model(build(PROBLEM_MODEL, weights))


PROBLEMS = [
    ("h", ["relu"], None, "relu: Relu is not a MatMul or Gemm"),
    ("h", ["flipped"], None, "flipped: does not read h as input 0"),
    ("h", ["not_constant"], None, "not_constant: its weight (input 1) is not a constant"),
    ("h", ["rank3"], None, "rank3: its weight has rank 3, not 2"),
    ("hk", ["trans_a"], None, "trans_a: Gemm with transA=1 (its K axis is not the activation's last axis)"),
    ("h", ["ok", "missing"], None, "no node named 'missing'"),
    ("h", [], None, "no consumers given"),
    ("h", ["ok", "ok"], None, "a consumer is named more than once"),
    (
        "h",
        ["ok"],
        np.ones(K + 1),
        f"the scale has shape [{K + 1}], the consumers need one value per channel ({K})",
    ),
    (
        "h",
        ["ok", "also_ok"],
        np.ones((1, K)),
        f"the scale has shape [1, {K}], the consumers need one value per channel ({K})",
    ),
    ("h", ["ok"], np.r_[np.ones(K - 1), 0.0], "the scale has values <= 0 (in float32)"),
    ("h", ["ok"], np.r_[np.ones(K - 1), -2.0], "the scale has values <= 0 (in float32)"),
    ("h", ["ok"], np.r_[np.ones(K - 1), np.nan], "the scale has non-finite values (in float32)"),
    ("h", ["ok"], np.r_[np.ones(K - 1), np.inf], "the scale has non-finite values (in float32)"),
    ("h", ["ok"], np.r_[np.ones(K - 1), 1e300], "the scale has non-finite values (in float32)"),
    ("h", ["ok"], np.r_[np.ones(K - 1), 1e-300], "the scale has values <= 0 (in float32)"),
]


@pytest.mark.parametrize(("activation", "consumers", "scale", "reason"), PROBLEMS)
def test_scaling_problem(
    activation: str, consumers: list[str], scale: np.ndarray | None, reason: str
) -> None:
    model = problem_model()
    assert scaling_problem(model, activation, consumers, scale) == reason
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
        apply_input_scale(model, activation, consumers, np.ones(K) if scale is None else scale)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_no_problem_for_valid_consumers() -> None:
    model = problem_model()
    assert scaling_problem(model, "h", ["ok", "also_ok"]) is None
    assert scaling_problem(model, "h", ["ok", "also_ok"], random_scale(20)) is None


def test_consumers_with_different_k() -> None:
    """A valid model cannot have two GEMMs reading one activation with different K; an edited one can."""
    model = problem_model()
    nodes = {node.name: node for node in model.graph}
    nodes["other_k"].replace_input_with(0, nodes["ok"].inputs[0])
    nodes["other_k"].replace_input_with(1, model.graph.initializers["wm2"])  # h [M, K] @ wm2 [N, K]
    expected = f"the consumers' weights have different K ({sorted([K, N])})"
    assert scaling_problem(model, "h", ["ok", "other_k"]) == expected


def test_comparison_detects_a_wrong_rescaling() -> None:
    """The output comparison used above fails when only the weights are scaled (so those tests can fail)."""
    original = layer_norm_qkv()
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    weight = next(t for t in broken.graph.initializer if t.name == "wq")
    scaled = onnx.numpy_helper.to_array(weight) * random_scale(21)[:, None]
    weight.CopyFrom(onnx.numpy_helper.from_array(scaled.astype(np.float32), "wq"))
    with pytest.raises(AssertionError):
        assert_same_outputs(original, broken)
