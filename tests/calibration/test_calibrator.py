"""The ONNX Runtime calibrator: two passes, batch-size invariance, memory groups, non-finite, cache."""

from __future__ import annotations

import json
from pathlib import Path

import model_builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.api import input_specs
from onnxq.calibration.calibrator import CalibrationSettings, calibrate, group_by_size
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.methods import METHOD_NAMES, get_method
from onnxq.calibration.statistics import TensorStats
from onnxq.errors import OnnxqError
from onnxq.formats import get_format

CNN_TENSORS = ["x", "r1", "c2", "r2", "p1", "r3"]


@pytest.fixture(scope="module")
def cnn() -> ir.Model:
    return ir.serde.deserialize_model(model_builders.residual_cnn())


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    return model_builders.cnn_inputs(3, 32)


def ranges_for(
    model: ir.Model, data: object, method: str, batch_size: int, memory_mb: float = 1024
) -> dict[str, tuple]:
    feeds = open_calibration_data(data, input_specs(model), batch_size)
    settings = CalibrationSettings(memory_limit_mb=memory_mb)
    found = calibrate(model, CNN_TENSORS, feeds, get_method(method), get_format("int8"), settings)
    return {t: (r.stats, r.chosen_low, r.chosen_high) for t, r in found.items()}


@pytest.mark.parametrize("method", sorted(METHOD_NAMES))
def test_scales_are_bit_identical_for_batch_sizes_1_7_32(
    cnn: ir.Model, samples: dict[str, np.ndarray], method: str
) -> None:
    results = [ranges_for(cnn, samples, method, batch) for batch in (1, 7, 32)]
    assert results[0] == results[1] == results[2]


def test_pass_one_matches_numpy_statistics(cnn: ir.Model, samples: dict[str, np.ndarray]) -> None:
    """The in-session reductions agree with statistics computed on the exposed tensors."""
    import onnxruntime as ort

    proto = model_builders.residual_cnn()
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in CNN_TENSORS if t != "x")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    exposed = dict(zip(["y", *CNN_TENSORS[1:]], session.run(None, samples)))
    exposed["x"] = samples["x"]
    found = ranges_for(cnn, samples, "max", 8)
    for tensor in CNN_TENSORS:
        assert found[tensor][0] == TensorStats.of(exposed[tensor])


def test_memory_limit_splits_groups_without_changing_results(
    cnn: ir.Model, samples: dict[str, np.ndarray]
) -> None:
    whole = ranges_for(cnn, samples, "entropy", 8)
    tiny_budget = ranges_for(cnn, samples, "entropy", 8, memory_mb=0.05)
    assert whole == tiny_budget


def test_group_by_size_respects_the_budget() -> None:
    sizes = {"a": 100_000, "b": 200_000, "c": 50_000, "d": 400_000}
    groups = group_by_size(list(sizes), sizes, limit_mb=1.0)
    assert [t for g in groups for t in g] == list(sizes)
    assert all(sum(4 * sizes[t] for t in g) <= 1024 * 1024 or len(g) == 1 for g in groups)
    assert groups == [["a"], ["b", "c"], ["d"]]


def test_nonfinite_values_are_skipped_and_counted() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
        y = Log(x)
    }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    data = {"x": np.array([[0.0, 1.0, np.e, 4.0], [1.0, 2.0, 0.5, 3.0]], np.float32)}
    feeds = open_calibration_data(data, input_specs(model), 1)
    found = calibrate(model, ["y"], feeds, get_method("entropy"), get_format("int8"))
    assert found["y"].nonfinite == 1  # log(0) = -inf
    assert found["y"].stats.low == pytest.approx(np.log(0.5)) and found["y"].stats.high == pytest.approx(
        np.log(4.0)
    )


def test_directory_of_samples_with_different_sequence_lengths(tmp_path: Path) -> None:
    """Dynamic shapes: each file its own length; the calibrator runs each as it comes."""
    seq_model = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[B, S, 32] x) => (float[B, S, 32] y) {
            y = MatMul(x, w)
        }
        """
    )
    seq_model.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(32, dtype=np.float32), "w"))
    rng = np.random.default_rng(0)
    for index, length in enumerate((5, 9, 17)):
        np.savez(tmp_path / f"sample_{index}.npz", x=rng.standard_normal((2, length, 32)).astype(np.float32))
    result = onnxq.quantize(seq_model, mode="int8", calibration_data=str(tmp_path), target="ort")
    assert result.ranges["x"].stats.count == 2 * 32 * (5 + 9 + 17)


def test_cache_round_trip_and_mismatch(tmp_path: Path, samples: dict[str, np.ndarray]) -> None:
    cache = tmp_path / "ranges.json"
    first = onnxq.quantize(
        model_builders.residual_cnn(), mode="int8", calibration_data=samples, calib_cache=cache
    )
    stored = json.loads(cache.read_text())
    assert stored["method"] == "auto" and set(stored["tensors"]) >= {"x", "r1"}
    second = onnxq.quantize(
        model_builders.residual_cnn(), mode="int8", calibration_data=samples, calib_cache=cache
    )
    assert all(r.source == "cache" for r in second.ranges.values())
    assert ir.to_onnx_text(first.model) == ir.to_onnx_text(second.model)
    other_data = model_builders.cnn_inputs(9, 8)
    with pytest.raises(OnnxqError, match="different"):
        onnxq.quantize(
            model_builders.residual_cnn(), mode="int8", calibration_data=other_data, calib_cache=cache
        )


def test_overrides_and_known_ranges_win(tmp_path: Path, samples: dict[str, np.ndarray]) -> None:
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"r1": [0.0, 1.5]}))
    result = onnxq.quantize(
        model_builders.residual_cnn(), mode="int8", calibration_data=samples, calib_overrides=overrides
    )
    assert (result.ranges["r1"].chosen_low, result.ranges["r1"].chosen_high) == (0.0, 1.5)
    assert result.ranges["r1"].source == "override"
    assert result.ranges["r2"].chosen_low == 0.0  # Relu output: known non-negative


def test_missing_custom_op_library_is_a_clear_error(samples: dict[str, np.ndarray]) -> None:
    with pytest.raises(OnnxqError, match="custom-op library"):
        onnxq.quantize(
            model_builders.residual_cnn(), calibration_data=samples, ort_custom_ops=["/nonexistent/libops.so"]
        )


def test_unavailable_provider_is_a_clear_error(samples: dict[str, np.ndarray]) -> None:
    with pytest.raises(OnnxqError, match="not available"):
        onnxq.quantize(model_builders.residual_cnn(), calibration_data=samples, providers=["tensorrt"])
