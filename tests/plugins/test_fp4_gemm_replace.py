"""replace_fp4_gemms on models quantized by onnxq's nvfp4-w4a16 mode, and the emulation of the plugin node.

Checked: the op list after the rewrite (plugin nodes, no FP4 DQ chains or FP4 initializers left), the
node's domain/attributes from the description file, onnx.checker (full check), the packed weights equal
to the DQ chain's weights bit for bit (MatMul W[K, N] and Gemm transB=1 W[N, K]), Gemm's C as bias, the
float32 path (Cast to float16 around the plugin), skipped GEMMs with their reasons, and numerics: the
replaced model emulated in ONNX Runtime equals onnx.reference with the plugin's reference op, and
equals the unreplaced model's emulation within float16 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxq
from onnxq.emulate import emulate
from onnxq.formats.fp4_e2m1 import FLOAT4_E2M1FN
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN
from onnxq.graph.fp4_weights import insert_nvfp4_weight
from onnxq.plugins import (
    dequantize_fp4_weight,
    emulate_fp4_gemm_plugins,
    fp4_gemm_description,
    replace_fp4_gemms,
)
from onnxq.plugins.fp4_gemm import Fp4GemmPlugin

BATCH, K1, N1, N2 = 4, 64, 96, 32
FP16_EPS = 2.0**-10


def float_model(seed: int = 0) -> onnx.ModelProto:
    """MatMul(x, W1[K, N]) -> Relu -> Gemm(., W2[N2, N1], C, transB=1): both weight layouts, a bias."""
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((K1, N1)).astype(np.float32) * 0.2, "w1"),
        numpy_helper.from_array(rng.standard_normal((N2, N1)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(rng.standard_normal(N2).astype(np.float32), "c2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="gemm2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, K1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, N2])], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def quantized(high_precision: str = "fp16") -> ir.Model:
    result = onnxq.quantize(
        float_model(), mode="nvfp4-w4a16", quantize_lm_head=True, high_precision=high_precision
    )
    return result.model


def run_ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def emulated_output(model: ir.Model, x: np.ndarray) -> np.ndarray:
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    emulate_fp4_gemm_plugins(copy)
    emulate(copy)
    return run_ort(copy, x)


def inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, K1)).astype(np.float32)


def value_of(value: ir.Value | None) -> ir.Value:
    assert value is not None
    return value


def constant(value: ir.Value | None) -> np.ndarray:
    tensor = value_of(value).const_value
    assert tensor is not None
    return tensor.numpy()


def producer(value: ir.Value | None) -> ir.Node:
    node = value_of(value).producer()
    assert node is not None
    return node


def evaluate_reference(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's output under onnx.reference with the plugin's reference op."""
    outputs = ReferenceEvaluator(proto, new_ops=[Fp4GemmPlugin]).run(None, {"x": x})
    assert isinstance(outputs, list)
    return np.asarray(outputs[0])


def chain_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """The float32 weight each NVFP4 DQ chain computes, by the FP4 initializer's name, as [N, K]."""
    weights = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or value_of(node.inputs[0]).dtype != ir.DataType.FLOAT4E2M1:
            continue
        scale_dq = producer(node.inputs[1])
        values = constant(node.inputs[0]).astype(FLOAT4_E2M1FN).astype(np.float32)
        scales = constant(scale_dq.inputs[0]).astype(FLOAT8_E4M3FN).astype(np.float32)
        g = np.float32(constant(scale_dq.inputs[1]).reshape(()))
        axis = node.attributes.get_int("axis", 1)
        weight = values * np.repeat(scales * g, 16, axis=axis)
        weights[value_of(node.inputs[0]).name or ""] = weight.T if axis == 0 else weight
    return weights


def test_rewrite_op_list_attributes_and_checker() -> None:
    model = quantized()
    description = fp4_gemm_description()
    summary = replace_fp4_gemms(model)
    assert set(summary.replaced) == {"mm1", "gemm2"} and not summary.skipped
    plugins = [n for n in model.graph if n.op_type == description.name]
    assert len(plugins) == 2
    assert not [n for n in model.graph if n.op_type in ("DequantizeLinear", "MatMul", "Gemm")]
    assert not [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT4E2M1]
    for node in plugins:
        assert node.domain == description.onnx_domain
        assert node.attributes.get_string("plugin_version") == description.version
        assert node.attributes.get_int("block_size") == description.block_size
        assert value_of(node.inputs[1]).dtype == ir.DataType.UINT8
        assert value_of(node.inputs[2]).dtype == ir.DataType.FLOAT8E4M3FN
        k, n = node.attributes.get_int("k"), node.attributes.get_int("n")
        assert n is not None and k is not None and constant(node.inputs[1]).shape == (n, k // 2)
        assert value_of(node.inputs[0]).dtype == node.outputs[0].dtype == ir.DataType.FLOAT16
    assert len(plugins[0].inputs) == 4 and len(plugins[1].inputs) == 5  # Gemm's C became the bias
    assert model.opset_imports[description.onnx_domain] == description.onnx_domain_version
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_packed_weights_equal_the_dq_chains() -> None:
    model = quantized()
    expected = chain_weights(model)
    replace_fp4_gemms(model)
    found = 0
    for node in model.graph:
        if node.op_type != fp4_gemm_description().name:
            continue
        actual = dequantize_fp4_weight(*(constant(node.inputs[i]) for i in (1, 2, 3)))
        name = (value_of(node.inputs[1]).name or "").removesuffix("_packed")
        np.testing.assert_array_equal(actual, expected[name])
        found += 1
    assert found == len(expected) == 2


def test_emulation_equals_reference_evaluator_and_the_unreplaced_model() -> None:
    model = quantized()
    x = inputs()
    unreplaced = emulated_output(model, x)
    replace_fp4_gemms(model)
    replaced = emulated_output(model, x)
    reference = evaluate_reference(ir.serde.serialize_model(model), x)
    scale = np.abs(unreplaced).max()
    # the same float32 numbers, one float16 rounding each: a few float16 ulps of the output's range
    np.testing.assert_allclose(replaced, reference, rtol=2 * FP16_EPS, atol=2 * FP16_EPS * scale)
    np.testing.assert_allclose(replaced, unreplaced, rtol=4 * FP16_EPS, atol=4 * FP16_EPS * scale)


def test_float32_activations_go_through_float16_casts() -> None:
    model = quantized("fp32")
    x = inputs(2)
    unreplaced = emulated_output(model, x)
    summary = replace_fp4_gemms(model)
    assert summary.float32_casts == 2
    plugins = [n for n in model.graph if n.op_type == fp4_gemm_description().name]
    assert all(producer(n.inputs[0]).op_type == "Cast" for n in plugins)
    assert all([use.node.op_type for use in n.outputs[0].uses()] == ["Cast"] for n in plugins)
    replaced = emulated_output(model, x)
    assert replaced.dtype == np.float32
    scale = np.abs(unreplaced).max()
    np.testing.assert_allclose(replaced, unreplaced, rtol=8 * FP16_EPS, atol=8 * FP16_EPS * scale)


def test_gemm_alpha_is_left_alone_with_a_reason() -> None:
    model = quantized()
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    gemm.attributes["alpha"] = ir.AttrFloat32("alpha", 2.0)
    summary = replace_fp4_gemms(model)
    assert set(summary.replaced) == {"mm1"}
    assert "alpha" in summary.skipped["gemm2"]
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == 2  # gemm2's chain stays


def test_model_without_fp4_weights_is_unchanged() -> None:
    model = ir.serde.deserialize_model(float_model())
    before = [n.op_type for n in model.graph]
    summary = replace_fp4_gemms(model)
    assert not summary.replaced and [n.op_type for n in model.graph] == before
    assert fp4_gemm_description().onnx_domain not in model.opset_imports


@pytest.mark.parametrize("with_bias", [False, True])
def test_emulating_a_plugin_node_alone(with_bias: bool) -> None:
    """A hand-written plugin node: the emulation in ONNX Runtime equals the numpy reference."""
    description = fp4_gemm_description()
    rng = np.random.default_rng(7)
    n, k = 24, 48
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scales = rng.uniform(0.5, 4, size=(n, k // 16)).astype(FLOAT8_E4M3FN)
    initializers = [
        numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s"),
        numpy_helper.from_array(np.array([0.01], np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float16), "b"),
    ]  # fmt: skip
    names = ["x", "w", "s", "g", "b"] if with_bias else ["x", "w", "s", "g"]
    node = helper.make_node(description.name, names, ["y"], domain=description.onnx_domain)
    attributes = description.onnx_attributes({"k": k, "n": n})
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attributes.items())
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, n])], initializers,
    )  # fmt: skip
    proto = helper.make_model(
        graph,
        ir_version=11,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(description.onnx_domain, 1)],
    )
    model = ir.serde.deserialize_model(proto)
    assert emulate_fp4_gemm_plugins(model) == 1
    assert description.onnx_domain not in model.opset_imports
    x = rng.standard_normal((3, k)).astype(np.float16)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    actual = session.run(None, {"x": x})[0]
    expected = evaluate_reference(proto, x)
    scale = np.abs(expected.astype(np.float32)).max()
    np.testing.assert_allclose(
        actual.astype(np.float32), expected.astype(np.float32), rtol=FP16_EPS, atol=FP16_EPS * scale
    )


def shared_weight_model() -> ir.Model:
    """x[batch, 3, K] feeds MatMul(x, W), z[5, K] feeds Gemm(z, W, transB=0):
    one float16 weight W[K, N] shared by both, given its NVFP4 chain by onnxq's emitter."""
    rng = np.random.default_rng(8)
    k, n = 32, 24
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float16), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Gemm", ["z", "w"], ["v"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes, "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 3, k]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT16, [5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 3, n]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT16, [5, n])],
        [weight],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    model = ir.serde.deserialize_model(proto)
    insert_nvfp4_weight(model.graph, model.graph.initializers["w"])
    return model


def test_shared_weight_rank3_and_gemm_trans_b_0() -> None:
    model = shared_weight_model()
    rng = np.random.default_rng(9)
    feed = {
        "x": rng.standard_normal((2, 3, 32)).astype(np.float16),
        "z": rng.standard_normal((5, 32)).astype(np.float16),
    }
    before = ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, feed)
    summary = replace_fp4_gemms(model)
    assert set(summary.replaced) == {"mm", "gemm"}
    plugins = [n for n in model.graph if n.op_type == fp4_gemm_description().name]
    assert plugins[0].inputs[1] is plugins[1].inputs[1]  # one packed weight for both GEMMs
    assert [n.op_type for n in model.graph] == [fp4_gemm_description().name] * 2
    after = ReferenceEvaluator(ir.serde.serialize_model(model), new_ops=[Fp4GemmPlugin]).run(None, feed)
    assert isinstance(before, list) and isinstance(after, list)
    for expected, actual in zip(before, after):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        scale = np.abs(expected.astype(np.float32)).max()
        np.testing.assert_allclose(
            actual.astype(np.float32),
            expected.astype(np.float32),
            rtol=4 * FP16_EPS,
            atol=4 * FP16_EPS * scale,
        )
