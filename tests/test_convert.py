"""``onnxq.convert.convert_file``: the float16/bfloat16 baseline written to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.checker
import onnx.shape_inference
import pytest
from model_builders import attention_inputs, cnn_inputs, masked_attention, residual_cnn, run, snr_db
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq import model_io
from onnxq.cli import main
from onnxq.convert import convert_file, observed_ranges
from onnxq.errors import OnnxqError
from onnxq.graph.float_conversion import FP16_SAFE_LIMIT
from onnxq.model_io import load_model

MIN_FP16_SNR_DB = 40.0
MIN_BF16_SNR_DB = 35.0
MASK_SENTINEL = -1e9


def reference_output(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    outputs: Any = ReferenceEvaluator(proto).run(None, feed)
    return np.asarray(outputs[0])


def saved(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, path)
    return path


def attention_with_minus_1e9(tmp_path: Path) -> Path:
    proto = masked_attention()
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name == "minus_inf":
            proto.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(np.array(MASK_SENTINEL, np.float32), "minus_inf")
            )
    return saved(proto, tmp_path / "attention.onnx")


def test_fp16_file_runs_in_ort_and_keeps_snr(tmp_path: Path) -> None:
    source = saved(residual_cnn(), tmp_path / "cnn.onnx")
    report = convert_file(source, tmp_path / "cnn16.onnx", "fp16")
    half = onnx.load(tmp_path / "cnn16.onnx")
    onnx.checker.check_model(half, full_check=True)
    assert half.producer_name == "onnxq"
    assert report.weight_bytes_after * 2 == report.weight_bytes_before
    assert (tmp_path / "cnn16.onnx").stat().st_size < source.stat().st_size * 0.6
    feed = cnn_inputs(2, 8)
    assert snr_db(run(onnx.load(source), feed)[0], run(half, feed)[0]) >= MIN_FP16_SNR_DB


def test_calibration_data_measures_ranges_and_keeps_the_mask_path_float32(tmp_path: Path) -> None:
    source = attention_with_minus_1e9(tmp_path)
    data = tmp_path / "calib.npz"
    calibration = attention_inputs(1, 16)
    np.savez(data, x=calibration["x"], mask=calibration["mask"])
    ranges = observed_ranges(load_model(source), str(data))
    assert ranges["additive"] == -MASK_SENTINEL  # Where(mask, 0, -1e9)
    assert ranges["x"] == pytest.approx(float(np.abs(attention_inputs(1, 16)["x"]).max()))
    report = convert_file(source, tmp_path / "out.onnx", "fp16", data=str(data))
    islands = {name for name, reason in report.kept_fp32.items() if "beyond the float16 limit" in reason}
    assert len(islands) == 3, report.kept_fp32  # Where, Add (scores + mask), Softmax
    assert report.clamped_values == {}  # -1e9 stays exact in its float32 island
    half = onnx.load(tmp_path / "out.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    assert types.get("masked") == TensorProto.FLOAT and types.get("normed") == TensorProto.FLOAT16
    feed = attention_inputs(3, 8)
    assert snr_db(run(onnx.load(source), feed)[0], run(half, feed)[0]) >= MIN_FP16_SNR_DB
    assert all(
        amax <= FP16_SAFE_LIMIT
        for name, amax in ranges.items()
        if name in types and types[name] == TensorProto.FLOAT16
    )


def test_bf16_file_passes_the_checker(tmp_path: Path) -> None:
    """ONNX Runtime's CPU build has no bfloat16 MatMul: the file is checked by the ONNX checker and
    evaluated with the reference evaluator."""
    source = saved(masked_attention(), tmp_path / "attention.onnx")
    convert_file(source, tmp_path / "bf16.onnx", "bf16")
    result = onnx.load(tmp_path / "bf16.onnx")
    onnx.checker.check_model(result, full_check=True)
    assert {t.data_type for t in result.graph.initializer} >= {TensorProto.BFLOAT16}
    feed = attention_inputs(4, 4)
    computed = np.asarray(reference_output(result, feed), np.float32)
    assert snr_db(run(onnx.load(source), feed)[0], computed) >= MIN_BF16_SNR_DB


def test_refusals_before_any_work(tmp_path: Path) -> None:
    source = saved(residual_cnn(), tmp_path / "cnn.onnx")
    with pytest.raises(OnnxqError, match="--to"):
        convert_file(source, tmp_path / "out.onnx", "int8")
    with pytest.raises(OnnxqError):
        convert_file(source, source, "fp16")
    assert not (tmp_path / "out.onnx").exists()


def test_external_weights_stay_external_when_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model past the external-data threshold (lowered here) is written as .onnx + .data, and its
    converted weights are read from the source's data file only while saving."""
    proto = residual_cnn()
    onnx.save(
        residual_cnn(),
        tmp_path / "cnn.onnx",
        save_as_external_data=True,
        location="cnn.onnx.data",
        size_threshold=0,
    )
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 1024)
    convert_file(tmp_path / "cnn.onnx", tmp_path / "out.onnx", "fp16")
    assert (tmp_path / "out.onnx.data").exists()
    half = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in half.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    feed = cnn_inputs(5, 4)
    assert snr_db(run(proto, feed)[0], run(onnx.load(tmp_path / "out.onnx"), feed)[0]) >= MIN_FP16_SNR_DB


# --- which ops and nodes stay float32: overridable ------------------------------------------------


def _node_input_types(path: Path, op_type: str) -> set[int]:
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path))
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    return {types[name] for n in inferred.graph.node if n.op_type == op_type for name in n.input if name in types}


def test_keep_fp32_ops_replaces_the_default_list(tmp_path: Path) -> None:
    source = saved(residual_cnn(), tmp_path / "cnn.onnx")
    default, chosen = tmp_path / "default.onnx", tmp_path / "chosen.onnx"
    assert main(["convert", str(source), "--to", "fp16", "-o", str(default)]) == 0
    assert main(["convert", str(source), "--to", "fp16", "-o", str(chosen), "--keep-fp32-ops", "Relu"]) == 0
    assert _node_input_types(default, "Relu") == {TensorProto.FLOAT16}
    assert _node_input_types(chosen, "Relu") == {TensorProto.FLOAT}
    assert _node_input_types(chosen, "Conv") == {TensorProto.FLOAT16}


def test_keep_fp32_nodes_in_a_quantized_model(tmp_path: Path) -> None:
    proto = residual_cnn()
    for index, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type.lower()}_{index}"
    add = next(n.name for n in proto.graph.node if n.op_type == "Add")
    source = saved(proto, tmp_path / "cnn.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **cnn_inputs(1, 8))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(source), "--calib", str(calib), "-o", str(out), "--keep-fp32-nodes", add]) == 0
    assert _node_input_types(out, "Add") == {TensorProto.FLOAT}
    assert TensorProto.FLOAT16 in _node_input_types(out, "Relu")


def test_keep_fp32_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = saved(residual_cnn(), tmp_path / "cnn.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **cnn_inputs(1, 8))
    out = tmp_path / "q.onnx"
    cases = [
        (["--keep-fp32-ops", "Softmax", "--high-precision", "fp32"], "rest is fp32"),
        (["--keep-fp32-ops", "softmax"], "not an ONNX operator"),
        (["--keep-fp32-nodes", "no_such_node"], "does not have"),
    ]
    for extra, message in cases:
        assert main(["quantize", str(source), "--calib", str(calib), "-o", str(out), *extra]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "Traceback" not in error and len(error.splitlines()) == 1, error
        assert not out.exists()
