"""NVFP4 / MXFP8 activations in TensorRT's trt-domain form, run by onnx.reference with onnxq's trt ops."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.formats.mxfp8 import fake_quantize_mxfp8, quantize_mxfp8
from onnxq.formats.nvfp4 import fake_quantize_nvfp4, quantize_nvfp4
from onnxq.graph.dynamic_quantize import (
    TRT_DOMAIN,
    dynamic_quantize_problem,
    insert_mxfp8_activation,
    insert_nvfp4_activation,
)
from onnxq.reference_ops import quantize_fp4_dynamic, reference_evaluator

K, N = 64, 8


def matmul_model(x_shape: list[int | str], elem: int = TensorProto.FLOAT, opset: int = 23) -> ir.Model:
    """y = x @ W plus a second consumer z = Relu(x) (must keep reading the float x); IR 11."""
    k = x_shape[-1]
    assert isinstance(k, int)
    weight = np.random.default_rng(1).standard_normal((k, N)).astype(helper.tensor_dtype_to_np_dtype(elem))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        "mm",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [
            helper.make_tensor_value_info("y", elem, [*x_shape[:-1], N]),
            helper.make_tensor_value_info("z", elem, x_shape),
        ],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11
    return ir.serde.deserialize_model(model)


def matmul_of(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "MatMul")


def quantize_input(model: ir.Model, fmt: str, amax: float = 4.0) -> ir.Value:
    x = model.graph.inputs[0]
    if fmt == "nvfp4":
        return insert_nvfp4_activation(model.graph, x, [(matmul_of(model), 0)], amax)
    return insert_mxfp8_activation(model.graph, x, [(matmul_of(model), 0)])


def checked(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_reference(model: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """ReferenceEvaluator with onnxq's trt ops on input ``x``: the outputs (or ``names``) as arrays."""
    return [np.asarray(v) for v in reference_evaluator(model).run(names, {"x": x})]


def activations(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian values with an all-zero block, a tiny block and values far beyond amax 4."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :32] = 0.0
    flat[-1, 32:] *= np.float32(1e-4)
    flat[1, 5] = 40.0
    flat[1, 40] = -1e4
    return x


@pytest.mark.parametrize("x_shape", [["M", K], ["B", "T", K]])
def test_nvfp4_activation_form_and_reference_numbers(x_shape: list[int | str]) -> None:
    model = matmul_model(x_shape)
    result = quantize_input(model, "nvfp4")
    proto = checked(model)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert ops[:3] == [
        (TRT_DOMAIN, "TRT_FP4DynamicQuantize"),
        ("", "DequantizeLinear"),
        ("", "DequantizeLinear"),
    ]
    quantizer = proto.graph.node[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in quantizer.attribute}
    assert attributes == {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN}
    assert {o.domain: o.version for o in proto.opset_import}[TRT_DOMAIN] == 1
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    assert types[quantizer.output[0]] == TensorProto.FLOAT4E2M1
    assert types[quantizer.output[1]] == TensorProto.FLOAT8E4M3FN
    # only the MatMul reads x'; the Relu keeps the float x
    assert matmul_of(model).inputs[0] is result
    assert next(n for n in model.graph if n.op_type == "Relu").inputs[0] is model.graph.inputs[0]

    shape = (16, K) if len(x_shape) == 2 else (2, 8, K)
    x = activations(shape)
    y, z = run_reference(proto, x)
    expected_x = fake_quantize_nvfp4(x, -1, amax=4.0)  # the formats module, independently of the graph
    weight = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W"))
    np.testing.assert_allclose(y, expected_x @ weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z, np.maximum(x, 0))


def test_nvfp4_reference_op_matches_formats_codes() -> None:
    x = activations((8, K), seed=3)
    global_scale = np.float32(4.0) / np.float32(6 * 448)
    values, block_scales = quantize_fp4_dynamic(x, global_scale)
    expected = quantize_nvfp4(x, -1, amax=4.0)
    np.testing.assert_array_equal(values.view(np.uint8), expected.values.view(np.uint8))
    np.testing.assert_array_equal(block_scales.view(np.uint8), expected.block_scales.view(np.uint8))
    assert values.dtype == ml_dtypes.float4_e2m1fn and block_scales.shape == (8, K // 16)


@pytest.mark.parametrize("x_shape", [["M", K], ["B", "T", K]])
def test_mxfp8_activation_form_and_reference_numbers(x_shape: list[int | str]) -> None:
    model = matmul_model(x_shape, opset=24)
    quantize_input(model, "mxfp8")
    proto = checked(model)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert ops[:2] == [(TRT_DOMAIN, "TRT_MXFP8DynamicQuantize"), (TRT_DOMAIN, "TRT_MXFP8DequantizeLinear")]
    quantizer, dequantizer = proto.graph.node[0], proto.graph.node[1]
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    assert (
        types[quantizer.output[0]] == TensorProto.FLOAT8E4M3FN
        and types[quantizer.output[1]] == TensorProto.UINT8
    )
    dq_attributes = {a.name: helper.get_attribute_value(a) for a in dequantizer.attribute}
    assert dq_attributes == {"axis": -1, "block_size": 32, "output_dtype": TensorProto.FLOAT}

    shape = (16, K) if len(x_shape) == 2 else (2, 8, K)
    x = activations(shape, seed=1)
    y, _ = run_reference(proto, x)
    weight = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W"))
    np.testing.assert_allclose(y, fake_quantize_mxfp8(x, -1) @ weight, rtol=1e-5, atol=1e-5)
    codes = run_reference(proto, x, [quantizer.output[1]])[0]
    expected = quantize_mxfp8(x, -1)
    np.testing.assert_array_equal(codes, expected.scales.view(np.uint8))


def test_float16_nvfp4_activation_casts_back() -> None:
    model = matmul_model(["M", K], elem=TensorProto.FLOAT16)
    result = quantize_input(model, "nvfp4")
    assert result.dtype == ir.DataType.FLOAT16 and result.producer().op_type == "Cast"  # type: ignore[union-attr]
    proto = checked(model)
    x = activations((4, K)).astype(np.float16)
    y, _ = run_reference(proto, x)
    assert y.dtype == np.float16


def test_float16_mxfp8_dequantizes_to_float16() -> None:
    model = matmul_model(["M", K], elem=TensorProto.FLOAT16, opset=24)
    result = quantize_input(model, "mxfp8")
    assert result.dtype == ir.DataType.FLOAT16
    proto = checked(model)
    x = activations((4, K)).astype(np.float16)
    y, _ = run_reference(proto, x)
    assert y.dtype == np.float16


def test_names_stay_unique_when_inserted_twice() -> None:
    model = matmul_model(["M", K])
    x = model.graph.inputs[0]
    relu = next(n for n in model.graph if n.op_type == "Relu")
    insert_nvfp4_activation(model.graph, x, [(matmul_of(model), 0)], 4.0)
    insert_nvfp4_activation(model.graph, x, [(relu, 0)], 2.0)
    proto = checked(model)
    names = [o for n in proto.graph.node for o in n.output] + [t.name for t in proto.graph.initializer]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("x_shape", "elem", "fmt", "reason"),
    [
        (["M", K], TensorProto.INT32, "nvfp4", "float32/float16/bfloat16"),
        ([K], TensorProto.FLOAT, "nvfp4", "rank 2 or 3"),
        (["A", "B", "C", K], TensorProto.FLOAT, "mxfp8", "rank 2 or 3"),
        (["M", "K"], TensorProto.FLOAT, "nvfp4", "symbolic"),
        (["M", 24], TensorProto.FLOAT, "nvfp4", "multiple of the nvfp4 block size 16"),
        (["M", 48], TensorProto.FLOAT, "mxfp8", "multiple of the mxfp8 block size 32"),
    ],
)
def test_dynamic_quantize_problems(x_shape: list[int | str], elem: int, fmt: str, reason: str) -> None:
    value = ir.Value(name="x", type=ir.TensorType(ir.DataType(elem)), shape=ir.Shape(x_shape))
    problem = dynamic_quantize_problem(value, fmt)  # type: ignore[arg-type]
    assert problem is not None and reason in problem


def test_bfloat16_and_48_wide_for_nvfp4_have_no_problem() -> None:
    value = ir.Value(name="x", type=ir.TensorType(ir.DataType.BFLOAT16), shape=ir.Shape(["B", "T", 48]))
    assert dynamic_quantize_problem(value, "nvfp4") is None
    assert dynamic_quantize_problem(value, "mxfp8") is not None


def test_insert_refuses_with_one_line_error() -> None:
    model = matmul_model(["M", 48], opset=24)
    with pytest.raises(OnnxqError, match="multiple of the mxfp8 block size 32"):
        quantize_input(model, "mxfp8")


def test_reference_ops_refuse_unsupported_block_size() -> None:
    node = helper.make_node("TRT_MXFP8DynamicQuantize", ["x"], ["q", "s"], domain=TRT_DOMAIN, block_size=16)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, [2, 32])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(TRT_DOMAIN, 1)], ir_version=11
    )
    with pytest.raises(ValueError, match="block_size=32"):
        reference_evaluator(model).run(None, {"x": np.ones((2, 32), np.float32)})
