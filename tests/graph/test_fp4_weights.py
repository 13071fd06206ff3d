"""NVFP4 / MXFP8 MatMul weights in TensorRT's form, checked by onnx.reference, and their ORT emulation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.errors import OnnxqError
from onnxq.formats.fp4_e2m1 import pack_fp4, saturate_to_fp4
from onnxq.formats.int8 import Int8Format
from onnxq.formats.mxfp8 import dequantize_mxfp8, quantize_mxfp8
from onnxq.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from onnxq.graph.fp4_weights import (
    dequantize_linear,
    emulate_fp4_weights,
    insert_mxfp8_weight,
    insert_nvfp4_weight,
    matmul_weights,
    quantize_matmul_weights,
)

K, N = 256, 64


def matmul_model(weight: np.ndarray, consumers: int = 1, opset: int = 17) -> ir.Model:
    """x[M, K] @ W[K, N] (``consumers`` MatMuls sharing W, outputs y0, y1, ...); IR 8, as exporters write."""
    k, n = weight.shape
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    nodes = [helper.make_node("MatMul", ["x", "W"], [f"y{i}"]) for i in range(consumers)]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", elem, ["M", k])],
        [helper.make_tensor_value_info(f"y{i}", elem, ["M", n]) for i in range(consumers)],
        [numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return ir.serde.deserialize_model(model)


def weight(k: int = K, n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def serialized(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_reference(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return list(ReferenceEvaluator(proto).run(None, {"x": x}))


def run_ort(proto: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:  # ORT's Q/DQ fusions (MatMulIntegerToFloat) change the numbers of INT8 DQ -> MatMul
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, {"x": x}))


def initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def test_nvfp4_weight_is_tensorrt_form_and_matches_reference() -> None:
    w = weight()
    model = matmul_model(w)
    stats = quantize_matmul_weights(model, "nvfp4")
    proto = serialized(model)
    assert proto.opset_import[0].version == 23 and proto.ir_version >= 11
    assert stats.weights == 1 and stats.weight_bytes_before == w.nbytes
    # 4-bit values + one FP8 scale per 16 + a float32 global: about 0.28 of the FP32 bytes
    assert stats.weight_bytes_after == K * N // 2 + K * N // 16 + 4
    scale_dq, weight_dq, matmul = proto.graph.node
    assert (scale_dq.op_type, weight_dq.op_type, matmul.op_type) == ("DequantizeLinear",) * 2 + ("MatMul",)
    assert {a.name: a.i for a in weight_dq.attribute} == {"axis": 0, "block_size": 16}
    assert not scale_dq.attribute and weight_dq.input[1] == scale_dq.output[0]
    inits = initializers(proto)
    types = [inits[name].data_type for name in (weight_dq.input[0], scale_dq.input[0], scale_dq.input[1])]
    assert types == [TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT]
    assert "W" not in inits  # the float weight is gone
    q = quantize_nvfp4(w, axis=0)
    assert inits[weight_dq.input[0]].raw_data == pack_fp4(q.values).tobytes()
    # identity input: each output element is one product plus zeros, so the MatMul adds no rounding
    # (only -0.0 weights come out as +0.0)
    (out,) = run_reference(proto, np.eye(K, dtype=np.float32))
    np.testing.assert_array_equal(out, dequantize_nvfp4(q))


def test_mxfp8_weight_form_and_reference() -> None:
    w = weight(seed=1)
    model = matmul_model(w)
    stats = quantize_matmul_weights(model, "mxfp8")
    proto = serialized(model)
    assert proto.opset_import[0].version == 24 and proto.ir_version >= 11
    assert stats.weight_bytes_after == K * N + K * N // 32
    weight_dq, _ = proto.graph.node
    attrs = {a.name: a.i for a in weight_dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32, "output_dtype": TensorProto.FLOAT}
    inits = initializers(proto)
    assert [inits[name].data_type for name in weight_dq.input] == [
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E8M0,
    ]
    (out,) = run_reference(proto, np.eye(K, dtype=np.float32))
    np.testing.assert_array_equal(out, dequantize_mxfp8(quantize_mxfp8(w, axis=0)))


def test_half_precision_weight_gets_a_cast_back() -> None:
    w = weight(k=32, n=8).astype(np.float16)
    model = matmul_model(w)
    quantize_matmul_weights(model, "nvfp4")
    proto = serialized(model)
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "DequantizeLinear", "Cast", "MatMul"]
    (out,) = run_reference(proto, np.eye(32, dtype=np.float16))
    expected = dequantize_nvfp4(quantize_nvfp4(w.astype(np.float32), axis=0)).astype(np.float16)
    np.testing.assert_array_equal(out, expected)


def test_shared_weight_gets_one_chain() -> None:
    model = matmul_model(weight(k=32, n=4), consumers=2)
    assert len(matmul_weights(model.graph)) == 1
    quantize_matmul_weights(model, "nvfp4")
    proto = serialized(model)
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and matmuls[0].input[1] == matmuls[1].input[1]
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 2


@pytest.mark.parametrize(("fmt", "k"), [("nvfp4", 40), ("mxfp8", 48)])
def test_partial_blocks_are_refused_for_tensorrt(fmt: str, k: int) -> None:
    model = matmul_model(weight(k=k, n=4))
    stats = quantize_matmul_weights(model, fmt)  # type: ignore[arg-type]
    assert stats.weights == 0 and "not a multiple of the" in stats.skipped["W"]
    assert [n.op_type for n in model.graph] == ["MatMul"]
    insert = insert_nvfp4_weight if fmt == "nvfp4" else insert_mxfp8_weight
    with pytest.raises(OnnxqError, match=f"K = {k} of W is not a multiple of the {fmt} block size"):
        insert(model.graph, model.graph.initializers["W"])


def test_overridable_and_output_weights_stay_float() -> None:
    model = matmul_model(weight(k=32, n=4))
    model.graph.inputs.append(model.graph.initializers["W"])  # IR < 4 style: initializer listed as input
    stats = quantize_matmul_weights(model, "nvfp4")
    assert stats.weights == 0 and "graph input" in stats.skipped["W"]
    model = matmul_model(weight(k=32, n=4))
    model.graph.outputs.append(model.graph.initializers["W"])
    assert "graph output" in quantize_matmul_weights(model, "mxfp8").skipped["W"]


def test_only_named_weights() -> None:
    model = matmul_model(weight(k=32, n=4))
    assert quantize_matmul_weights(model, "nvfp4", names=["other"]).weights == 0
    assert [n.op_type for n in model.graph] == ["MatMul"]


def test_ort_cannot_run_the_deployable_graph() -> None:
    """The premise of emulation: ONNX Runtime CPU has no FLOAT4E2M1 / E8M0 DequantizeLinear kernels."""
    for fmt in ("nvfp4", "mxfp8"):
        model = matmul_model(weight(k=32, n=4))
        quantize_matmul_weights(model, fmt)  # type: ignore[arg-type]
        with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
            run_ort(serialized(model), np.zeros((1, 32), np.float32))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_emulation_runs_in_ort_and_equals_reference(fmt: str) -> None:
    model = matmul_model(weight(seed=2))
    quantize_matmul_weights(model, fmt)  # type: ignore[arg-type]
    deployable = serialized(model)
    emulated_model = ir.serde.deserialize_model(deployable)
    assert emulate_fp4_weights(emulated_model) == 1
    emulated = serialized(emulated_model)
    assert [n.op_type for n in emulated.graph.node] == ["MatMul"]
    assert [t.data_type for t in emulated.graph.initializer] == [TensorProto.FLOAT]
    # identity input: bit-exact (the folded weight is the DQ chain's output)
    eye = np.eye(K, dtype=np.float32)
    (ours,), (reference,) = run_ort(emulated, eye), run_reference(deployable, eye)
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))
    # random input: the two runtimes sum K products in different orders; bound by K ulps of sum |x w|
    x = np.random.default_rng(3).standard_normal((8, K)).astype(np.float32)
    (ours,), (reference,) = run_ort(emulated, x), run_reference(deployable, x)
    w_emulated = numpy_helper.to_array(emulated.graph.initializer[0])
    bound = K * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w_emulated))
    assert (np.abs(ours - reference) <= bound).all()


def test_emulation_leaves_dequantize_linear_that_ort_runs() -> None:
    """An INT8 weight DQ (ONNX Runtime has its kernel) stays; only the FP4 chain is folded."""
    model = matmul_model(weight(k=32, n=4))
    quantize_matmul_weights(model, "nvfp4")
    proto = serialized(model)
    int8_dq = helper.make_node("DequantizeLinear", ["q8", "s8"], ["w8"], axis=1)
    proto.graph.node.extend([int8_dq, helper.make_node("MatMul", ["y0", "w8"], ["z"])])
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(np.ones((4, 3), np.int8), "q8"),
            numpy_helper.from_array(np.ones(3, np.float32), "s8"),
        ]
    )
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 3]))
    onnx.checker.check_model(proto, full_check=True)
    emulated_model = ir.serde.deserialize_model(proto)
    assert emulate_fp4_weights(emulated_model) == 1
    emulated = serialized(emulated_model)
    assert [n.op_type for n in emulated.graph.node] == ["MatMul", "DequantizeLinear", "MatMul"]
    x = np.random.default_rng(6).standard_normal((2, 32)).astype(np.float32)
    ours, reference = run_ort(emulated, x, optimize=False)[1], run_reference(proto, x)[1]
    np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_emulation_of_half_precision_weights() -> None:
    model = matmul_model(weight(k=32, n=8).astype(np.float16))
    quantize_matmul_weights(model, "mxfp8")
    deployable = serialized(model)
    emulated_model = ir.serde.deserialize_model(deployable)
    emulate_fp4_weights(emulated_model)
    emulated = serialized(emulated_model)
    assert [n.op_type for n in emulated.graph.node] == ["Cast", "MatMul"]
    eye = np.eye(32, dtype=np.float16)
    np.testing.assert_array_equal(run_ort(emulated, eye)[0], run_reference(deployable, eye)[0])


def test_numpy_dequantize_linear_matches_reference() -> None:
    """The emulator's DQ on per-tensor, per-axis and int zero-point cases (not only blocks)."""
    x = np.array([[-8, 7], [3, -1]], ml_dtypes.int4)
    scale, zp = np.array([0.5, 0.25], np.float32), np.array([1, -2], ml_dtypes.int4)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)
    graph = helper.make_graph(
        [node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(x, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (expected,) = ReferenceEvaluator(model).run(None, {})
    np.testing.assert_array_equal(dequantize_linear(x, scale, zp, axis=1), expected)
    np.testing.assert_array_equal(dequantize_linear(x, np.array(2.0, np.float32)), x.astype(np.float32) * 2)


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - approx) ** 2)))


def test_weight_snr_sanity() -> None:
    """Output SNR of a random-weight MatMul (K=256, N=64) through the emitted graphs, vs INT8 per channel.

    Expected order (bits of precision per weight): NVFP4 (E2M1, 1 mantissa bit) < MXFP8 (E4M3, 3 bits)
    < INT8 per channel (7 bits over a Gaussian's range). NVFP4's 16-wide FP8 block scales must beat FP4
    with one scale per output channel.
    """
    w = weight(seed=4)
    x = np.random.default_rng(5).standard_normal((64, K)).astype(np.float32)
    y = x @ w
    snr = {}
    for fmt in ("nvfp4", "mxfp8"):
        model = matmul_model(w)
        quantize_matmul_weights(model, fmt)  # type: ignore[arg-type]
        snr[fmt] = snr_db(y, run_reference(serialized(model), x)[0])
    int8 = Int8Format()
    params = int8.weight_params(w, axis=1)
    snr["int8"] = snr_db(y, x @ int8.dequantize(int8.quantize(w, params), params))
    channel_scale = np.abs(w).max(axis=0) / 6
    snr["fp4_per_channel"] = snr_db(
        y, x @ (saturate_to_fp4(w / channel_scale).astype(np.float32) * channel_scale)
    )
    print("weight SNR dB:", {k: round(v, 2) for k, v in snr.items()})
    assert snr["fp4_per_channel"] < snr["nvfp4"] < snr["mxfp8"] < snr["int8"]


def test_emulation_folds_a_scale_chain_cast_by_the_fp16_rest() -> None:
    """Small weights put the NVFP4 global scale below float16's normal range: the FP16 rest keeps that
    scale DQ in float32 and casts its output for the weight DQ; emulation folds through the Cast."""
    import onnxq
    from onnxq.reference_ops import reference_evaluator

    tiny = weight(k=64, n=16, seed=4) * np.float32(1e-3)
    quantized = onnxq.quantize(
        ir.serde.serialize_model(matmul_model(tiny)), mode="nvfp4-w4a16", quantize_lm_head=True
    ).model
    deployable = serialized(quantized)
    ops = [n.op_type for n in deployable.graph.node]
    assert "Cast" in ops and ops.count("DequantizeLinear") == 2
    emulated_model = ir.serde.deserialize_model(deployable)
    assert emulate_fp4_weights(emulated_model) == 1
    emulated = serialized(emulated_model)
    assert not {"DequantizeLinear"} & {n.op_type for n in emulated.graph.node}
    eye = np.eye(64, dtype=np.float32)  # the output rows are the dequantized weight rows, exactly
    (expected,) = reference_evaluator(deployable).run(None, {"x": eye})
    np.testing.assert_array_equal(run_ort(emulated, eye, optimize=False)[0], expected)
