"""The Python API: model sources, results, external data, and whole-model accuracy by SNR."""

from __future__ import annotations

from pathlib import Path

import model_builders
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq import model_io


def snr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - actual) ** 2)))


def run(model: onnx.ModelProto | str, feed: dict[str, np.ndarray]) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("source_kind", ["path", "proto", "ir", "graphsurgeon"])
def test_every_model_source_gives_the_same_model(source_kind: str, tmp_path: Path) -> None:
    proto = model_builders.residual_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    sources = {
        "path": str(path),
        "proto": proto,
        "ir": ir.serde.deserialize_model(proto),
        "graphsurgeon": gs.import_onnx(proto),
    }
    data = model_builders.cnn_inputs(0, 8)
    result = onnxq.quantize(sources[source_kind], mode="int8", calibration_data=data)
    reference = onnxq.quantize(str(path), mode="int8", calibration_data=data)
    assert ir.to_onnx_text(result.model) == ir.to_onnx_text(reference.model)
    assert proto == model_builders.residual_cnn(), "the caller's ModelProto must not change"


@pytest.mark.parametrize(("mode", "min_snr"), [("int8", 30.0), ("fp8", 25.0)])
def test_cnn_accuracy_and_validity(mode: str, min_snr: float) -> None:
    data = model_builders.cnn_inputs(0, 32)
    held_out = model_builders.cnn_inputs(1, 16)
    result = onnxq.quantize(model_builders.residual_cnn(), mode=mode, calibration_data=data)
    proto = model_io.to_model_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == model_io.DEFAULT_IR_VERSION
    float_output = run(model_builders.residual_cnn(), held_out)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    quantized_output = ort.InferenceSession(proto.SerializeToString(), options).run(None, held_out)[0]
    assert snr_db(float_output, quantized_output) > min_snr
    comparison = onnxq.compare(model_builders.residual_cnn(), proto, held_out)
    assert comparison.outputs["y"].snr_db == pytest.approx(snr_db(float_output, quantized_output), abs=0.5)


def test_attention_with_mask_survives_and_keeps_inf_path_float() -> None:
    data = model_builders.attention_inputs(0, 32)
    result = onnxq.quantize(model_builders.masked_attention(), mode="int8", calibration_data=data)
    assert {"additive", "masked"} <= set(result.plan.nonfinite)
    proto = model_io.to_model_proto(result.model)
    dequantized_inputs = {i for n in proto.graph.node for i in n.input if i.endswith("_dequantized")}
    assert not any(name.startswith(("additive", "masked")) for name in dequantized_inputs)
    held_out = model_builders.attention_inputs(1, 16)
    assert snr_db(run(model_builders.masked_attention(), held_out), run(proto, held_out)) > 20


def test_nonfinite_seen_in_calibration_leaves_tensor_float() -> None:
    """A -inf that static analysis cannot see (it comes from the data) is caught by calibration."""
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[N, 32] x, float[N, 32] bias) => (float[N, 32] y) {
        shifted = Add(x, bias)
        y = MatMul(shifted, w)
    }
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")
    )
    data = {"x": rng.standard_normal((8, 32)).astype(np.float32), "bias": np.zeros((8, 32), np.float32)}
    result = onnxq.quantize(model, mode="int8", calibration_data=data)
    assert result.plan.quantized_nodes()
    # the same model, with calibration data whose bias input carries -inf like an exported mask
    data["bias"][0, 0] = -np.inf
    with pytest.raises(onnxq.OnnxqError, match="NaN/Inf"):
        onnxq.quantize(model, mode="int8", calibration_data=data)


def test_external_data_output_streams_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large models are written with external data; the path is the same one a >2 GB model takes."""
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 1024)
    source = tmp_path / "big.onnx"
    onnx.save(
        model_builders.residual_cnn(),
        source,
        save_as_external_data=True,
        location="big.onnx.data",
        size_threshold=0,
    )
    output = tmp_path / "big.int8.onnx"
    data = model_builders.cnn_inputs(0, 8)
    onnxq.quantize(str(source), mode="int8", calibration_data=data, output_path=output)
    assert (tmp_path / "big.int8.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big.int8.onnx",
        "big.int8.onnx.data",
        "big.onnx",
        "big.onnx.data",
    ]
    model_io.check_model(output)
    assert snr_db(run(model_builders.residual_cnn(), data), run(str(output), data)) > 30


def test_unknown_option_and_mode() -> None:
    with pytest.raises(TypeError, match="unknown quantize option"):
        onnxq.quantize(model_builders.residual_cnn(), calibration_data={}, colour="blue")
    with pytest.raises(onnxq.OnnxqError, match="unknown mode"):
        onnxq.quantize(model_builders.residual_cnn(), mode="int3")


def test_onnxq_compare_stays_the_function_once_its_module_is_imported() -> None:
    import onnxq.comparison  # a module named like the function would shadow it on the package

    assert callable(onnxq.compare) and onnxq.compare is onnxq.comparison.compare
