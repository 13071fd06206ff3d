"""INT4 block weights end to end: the TensorRT form (INT4 + blocked DequantizeLinear) and the ONNX
Runtime form (MatMulNBits) on small MatMul/Gemm models, run in ONNX Runtime CPU and compared with a
numpy reference X @ dequant(W), with each other, and with FP32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from model_builders import build, snr_db
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.formats import int4
from onnxq.graph import block_weights
from onnxq.graph.block_weights import emit_dequantize_linear, emit_matmul_nbits

N = 64
EMITTERS = {"dequantize_linear": emit_dequantize_linear, "matmul_nbits": emit_matmul_nbits}
#: MatMulNBits at accuracy level 0 computes in float32, in another summation order than numpy
FLOAT_ORDER_TOLERANCE = 1e-4


def matmul_model(k: int, w: np.ndarray, opset: int = 21) -> onnx.ModelProto:
    return build(f"g (float[M, {k}] x) => (float[M, {N}] y) {{ [mm] y = MatMul(x, w) }}", {"w": w}, opset)


def weight_and_input(k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, N)) * 0.05).astype(np.float32), rng.standard_normal((8, k)).astype(
        np.float32
    )


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def emit(
    original: onnx.ModelProto, form: str, **options
) -> tuple[onnx.ModelProto, block_weights.BlockWeightRecord]:
    model = ir.serde.deserialize_model(original)
    record = EMITTERS[form](model, node(model, "mm"), **options)
    return ir.serde.serialize_model(model), record


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output in ONNX Runtime CPU (see :func:`run_ort_all`)."""
    return run_ort_all(model, x)[0]


def run_ort_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """ONNX Runtime CPU, default optimizations; DQ -> MatMul fused into MatMulNBits kept in float."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def dequantized_weight(w: np.ndarray, block_size: int, zero_point: bool, axis: int = 0) -> np.ndarray:
    params = int4.weight_params(w, axis, block_size, zero_point)
    return int4.dequantize(int4.quantize(w, params), params)


def relative_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.abs(reference - test).max() / np.abs(reference).max())


@pytest.mark.parametrize("k", [256, 200], ids=["K256", "K200-partial-block"])
@pytest.mark.parametrize("zero_point", [False, True], ids=["int4", "uint4-zp"])
def test_both_forms_run_in_ort_and_match_the_reference(k: int, zero_point: bool) -> None:
    w, x = weight_and_input(k, seed=k + zero_point)
    original = matmul_model(k, w)
    expected = x @ dequantized_weight(w, 128, zero_point)
    outputs = {}
    for form in EMITTERS:
        proto, record = emit(original, form, block_size=128, zero_point=zero_point)
        if form == "dequantize_linear":
            onnx.checker.check_model(proto, full_check=True)
            (reference_run,) = ReferenceEvaluator(proto).run(None, {"x": x})
            assert relative_error(expected, reference_run) < FLOAT_ORDER_TOLERANCE
        outputs[form] = run_ort(proto, x)
        assert relative_error(expected, outputs[form]) < FLOAT_ORDER_TOLERANCE
        # quantization error is what the numpy reference has, to within the float summation order
        assert snr_db(x @ w, outputs[form]) == pytest.approx(snr_db(x @ w, expected), abs=0.01)
        assert "w" not in {i.name for i in proto.graph.initializer}  # the float weight is gone
        stored = [i for i in proto.graph.initializer if i.name.startswith("w_")]
        assert record.weight_bytes_after == sum(len(i.raw_data) for i in stored)
        assert record.weight_bytes_before == w.nbytes and (record.k, record.n) == (k, N)
    assert relative_error(outputs["dequantize_linear"], outputs["matmul_nbits"]) < FLOAT_ORDER_TOLERANCE


def test_dequantize_linear_form_layout() -> None:
    w, _ = weight_and_input(200, seed=1)
    proto, _ = emit(matmul_model(200, w), "dequantize_linear", block_size=128)
    (dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 128}
    assert len(dq.input) == 2  # symmetric: no zero point (0 by default, as TensorRT expects)
    tensors = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert tensors[dq.input[0]].dtype == int4.INT4 and tensors[dq.input[0]].shape == (200, N)
    assert tensors[dq.input[1]].shape == (2, N)
    proto_zp, _ = emit(matmul_model(200, w), "dequantize_linear", block_size=128, zero_point=True)
    (dq_zp,) = [n for n in proto_zp.graph.node if n.op_type == "DequantizeLinear"]
    zero = numpy_helper.to_array(next(i for i in proto_zp.graph.initializer if i.name == dq_zp.input[2]))
    assert zero.dtype == int4.UINT4 and zero.shape == (2, N)


@pytest.mark.parametrize("zero_point", [False, True])
def test_matmul_nbits_layout(zero_point: bool) -> None:
    """B [N, n_blocks, bs/2] (K padded with the zero point), scales [N, n_blocks], packed zero points."""
    k, block_size = 200, 64  # 4 blocks, the last one 8 long
    w, _ = weight_and_input(k, seed=2)
    proto, _ = emit(matmul_model(k, w), "matmul_nbits", block_size=block_size, zero_point=zero_point)
    (fused,) = proto.graph.node
    assert (fused.op_type, fused.domain, fused.name) == ("MatMulNBits", "com.microsoft", "mm")
    attributes = {a.name: a.i for a in fused.attribute}
    assert attributes == {"K": k, "N": N, "bits": 4, "block_size": block_size, "accuracy_level": 0}
    tensors = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    packed, scales = tensors[fused.input[1]], tensors[fused.input[2]]
    assert packed.dtype == np.uint8 and packed.shape == (N, 4, block_size // 2)
    assert scales.shape == (N, 4)
    params = int4.weight_params(w, 0, block_size, zero_point)
    np.testing.assert_array_equal(scales, params.scale.T)
    codes, zero = int4.to_unsigned(int4.quantize(w, params), params)
    # unpack independently: low nibble = even k, high nibble = odd k
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, -1)
    np.testing.assert_array_equal(unpacked[:, :k], codes.T.astype(np.uint8))
    np.testing.assert_array_equal(unpacked[:, k:], np.repeat(zero[-1:].T.astype(np.uint8), 256 - k, axis=1))
    if zero_point:
        packed_zero = tensors[fused.input[3]]
        assert packed_zero.shape == (N, 2)
        np.testing.assert_array_equal(int4.unpack_nibbles(packed_zero, 4), zero.T)
    else:
        assert len(fused.input) == 3  # default zero point 8 = INT4 code 0
    assert dict((o.domain, o.version) for o in proto.opset_import)["com.microsoft"] == 1


GEMM = """g (float[M, {k}] x) => (float[M, 64] y) {{
    [mm] y = Gemm<transB = {trans_b}, alpha = 0.5, beta = 2.0>(x, w, c)
}}"""


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(N,), (1, N), (1,)], ids=["N", "1xN", "scalar"])
def test_gemm_forms_fold_alpha_beta_and_transb(trans_b: int, bias_shape: tuple[int, ...]) -> None:
    k = 200
    w, x = weight_and_input(k, seed=3)
    c = np.random.default_rng(4).standard_normal(bias_shape).astype(np.float32)
    stored = w.T.copy() if trans_b else w
    original = build(GEMM.format(k=k, trans_b=trans_b), {"w": stored, "c": c}, 21)
    expected = 0.5 * x @ dequantized_weight(w, 128, False) + 2.0 * c
    for form in EMITTERS:
        proto, record = emit(original, form, block_size=128)
        assert record.k == k and record.n == N
        assert relative_error(expected, run_ort(proto, x)) < FLOAT_ORDER_TOLERANCE


def test_shared_weight_stays_until_its_last_reader_is_rewritten() -> None:
    w, x = weight_and_input(256, seed=5)
    text = f"""g (float[M, 256] x) => (float[M, {N}] a, float[M, {N}] b) {{
        [mm] a = MatMul(x, w)
        [other] b = MatMul(x, w)
    }}"""
    model = ir.serde.deserialize_model(build(text, {"w": w}, 21))
    emit_dequantize_linear(model, node(model, "mm"))
    assert "w" in model.graph.initializers
    emit_matmul_nbits(model, node(model, "other"))
    assert "w" not in model.graph.initializers
    a, b = run_ort_all(ir.serde.serialize_model(model), x)
    assert relative_error(a, b) < FLOAT_ORDER_TOLERANCE


def test_float16_weights_get_float16_scales_and_codes_from_them() -> None:
    w, x = weight_and_input(200, seed=6)
    text = f"g (float16[M, 200] x) => (float16[M, {N}] y) {{ [mm] y = MatMul(x, w) }}"
    proto, _ = emit(build(text, {"w": w.astype(np.float16)}, 21), "dequantize_linear")
    onnx.checker.check_model(proto, full_check=True)
    tensors = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scale = tensors["w_scale"]
    assert scale.dtype == np.float16
    # the stored codes are those of the stored (float16-rounded) scale: DQ gives back these values
    params = int4.BlockParams(
        scale.astype(np.float32), np.zeros(scale.shape, int4.INT4), int4.Granularity.block(0, 128)
    )
    np.testing.assert_array_equal(tensors["w_quantized"], int4.quantize(w.astype(np.float16), params))
    (y,) = ReferenceEvaluator(proto).run(None, {"x": x.astype(np.float16)})
    assert y.dtype == np.float16


def test_dequantize_linear_form_needs_opset_21() -> None:
    w, _ = weight_and_input(256, seed=7)
    model = ir.serde.deserialize_model(matmul_model(256, w, opset=19))
    with pytest.raises(ValueError, match="opset >= 21"):
        emit_dequantize_linear(model, node(model, "mm"))


@pytest.mark.parametrize("block_size", [24, 8, 0, 100])
def test_matmul_nbits_rejects_block_sizes_its_kernels_lack(block_size: int) -> None:
    assert block_weights.matmul_nbits_block_problem(block_size) is not None
    w, _ = weight_and_input(256, seed=8)
    model = ir.serde.deserialize_model(matmul_model(256, w))
    with pytest.raises(ValueError, match="block size"):
        emit_matmul_nbits(model, node(model, "mm"), block_size=block_size)


def test_dequantize_linear_form_accepts_any_positive_block_size() -> None:
    w, x = weight_and_input(200, seed=9)
    proto, _ = emit(matmul_model(200, w), "dequantize_linear", block_size=48)
    onnx.checker.check_model(proto, full_check=True)
    assert relative_error(x @ dequantized_weight(w, 48, False), run_ort(proto, x)) < FLOAT_ORDER_TOLERANCE


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("g (float[2, 8] x, float[8, 4] v) => (float[2, 4] y) { [mm] y = MatMul(x, v) }", "not a constant"),
        ("g (float[3, 2, 8] x) => (float[3, 2, 4] y) { [mm] y = MatMul(x, w3) }", "rank 3"),
        ("g (float[2, 8] x) => (float[2, 8] y) { [mm] y = Add(x, x) }", "not a MatMul or Gemm"),
    ],
)
def test_nodes_without_a_block_quantizable_weight_give_the_reason(text: str, reason: str) -> None:
    w3 = np.ones((3, 8, 4), np.float32)
    model = ir.serde.deserialize_model(build(text, {"w3": w3} if "w3" in text else {}, 21))
    assert reason in (block_weights.weight_problem(node(model, "mm")) or "")
    for emitter in EMITTERS.values():
        with pytest.raises(ValueError, match=reason):
            emitter(model, node(model, "mm"))


def test_weight_that_is_also_a_graph_input_is_left_alone() -> None:
    text = "g (float[2, 8] x, float[8, 4] w) => (float[2, 4] y) { [mm] y = MatMul(x, w) }"
    model = ir.serde.deserialize_model(build(text, {"w": np.ones((8, 4), np.float32)}, 21))
    assert "graph input" in (block_weights.weight_problem(node(model, "mm")) or "")


def test_matmul_nbits_rejects_a_vector_input() -> None:
    text = "g (float[128] x) => (float[64] y) { [mm] y = MatMul(x, w) }"
    model = ir.serde.deserialize_model(build(text, {"w": weight_and_input(128, seed=13)[0]}, 21))
    with pytest.raises(ValueError, match="1-D"):
        emit_matmul_nbits(model, node(model, "mm"))


def test_matmul_nbits_rejects_gemm_it_cannot_express() -> None:
    w, _ = weight_and_input(128, seed=10)
    text = "g (float[128, M] x) => (float[M, 64] y) { [mm] y = Gemm<transA = 1>(x, w) }"
    model = ir.serde.deserialize_model(build(text, {"w": w}, 21))
    with pytest.raises(ValueError, match="transA=1"):
        emit_matmul_nbits(model, node(model, "mm"))
    text = "g (float[M, 128] x, float[M, 64] c) => (float[M, 64] y) { [mm] y = Gemm(x, w, c) }"
    model = ir.serde.deserialize_model(build(text, {"w": w}, 21))
    with pytest.raises(ValueError, match="one value per output column"):
        emit_matmul_nbits(model, node(model, "mm"))


@pytest.mark.parametrize(("k", "block_size"), [(256, 128), (200, 128), (200, 32), (64, 16)])
@pytest.mark.parametrize("zero_point", [False, True], ids=["full-range-int4", "uint4-zp"])
def test_matmul_nbits_bytes_equal_onnx_runtimes_own_quantizer(
    k: int, block_size: int, zero_point: bool
) -> None:
    """ONNX Runtime's MatMul4BitsQuantizer kernel (symmetric: extreme / -8; asymmetric: zero point)
    writes the same scales, zero points and weight nibbles (its K padding aside, which is never read)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    w, _ = weight_and_input(k, seed=k + block_size)
    n_blocks = -(-k // block_size)
    packed = np.zeros((N, n_blocks, block_size // 2), np.uint8)
    scales = np.zeros(N * n_blocks, np.float32)
    zero = np.zeros(N * -(-n_blocks // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero, block_size, N, k, not zero_point)
    proto, _ = emit(
        matmul_model(k, w),
        "matmul_nbits",
        block_size=block_size,
        zero_point=zero_point,
        full_range=not zero_point,
    )
    (fused,) = proto.graph.node
    tensors = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(tensors[fused.input[2]], scales.reshape(N, n_blocks))
    ours = int4.unpack_nibbles(tensors[fused.input[1]].reshape(N, -1), k)
    np.testing.assert_array_equal(ours, int4.unpack_nibbles(packed.reshape(N, -1), k))
    if zero_point:
        np.testing.assert_array_equal(tensors[fused.input[3]], zero.reshape(N, -1))


def test_full_range_negative_scales_survive_both_forms() -> None:
    w, x = weight_and_input(200, seed=11)
    params = int4.weight_params(w, 0, 128, full_range=True)
    assert (params.scale < 0).any()
    expected = x @ int4.dequantize(int4.quantize(w, params), params)
    for form in EMITTERS:
        proto, _ = emit(matmul_model(200, w), form, block_size=128, full_range=True)
        assert relative_error(expected, run_ort(proto, x)) < FLOAT_ORDER_TOLERANCE


def test_negative_gemm_alpha_is_folded_with_its_sign() -> None:
    w, x = weight_and_input(128, seed=12)
    text = "g (float[M, 128] x) => (float[M, 64] y) { [mm] y = Gemm<alpha = -2.0>(x, w) }"
    original = build(text, {"w": w}, 21)
    expected = -2.0 * x @ dequantized_weight(w, 128, False)
    for form in EMITTERS:
        proto, _ = emit(original, form, block_size=128)
        assert relative_error(expected, run_ort(proto, x)) < FLOAT_ORDER_TOLERANCE
