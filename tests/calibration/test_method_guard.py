"""The method guard: SNR against numpy, the fallback to ``max``, and agreement with the real pipeline."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import onnxq
import onnxq.api as api
from onnxq.calibration.calibrator import TensorRange, calibrate
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.method_guard import (
    DEFAULT_GUARD_SAMPLES,
    FAR_BELOW_MAX_DB,
    SNR_CAP_DB,
    first_samples,
    guard_ranges,
    max_ranges,
    output_snr_db,
)
from onnxq.calibration.methods import get_method
from onnxq.calibration.statistics import TensorStats
from onnxq.model_io import load_model
from onnxq.modes import mode_spec
from onnxq.placement.planner import plan_placement
from onnxq.placement.rules import load_rule_set

SEED = 3
IR_VERSION = 10
CHANNELS = 16
SIDE = 6
SAMPLES = DEFAULT_GUARD_SAMPLES + 4

MODEL_TEXT = f"""
<ir_version: {IR_VERSION}, opset_import: ["" : 17]>
net (float[N, {CHANNELS}, {SIDE}, {SIDE}] x) => (float[N, {CHANNELS}, {SIDE}, {SIDE}] y) {{
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (a)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2)
}}
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(SEED)
    proto = onnx.parser.parse_model(MODEL_TEXT)
    for name in ("w1", "w2"):
        weight = (0.3 * rng.standard_normal((CHANNELS, CHANNELS, 3, 3))).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    path = tmp_path_factory.mktemp("guard") / "net.onnx"
    onnx.save(proto, path)
    return path


@pytest.fixture(scope="module")
def data_path(model_path: Path) -> Path:
    rng = np.random.default_rng(SEED + 1)
    path = model_path.parent / "calib.npz"
    np.savez(path, x=rng.standard_normal((SAMPLES, CHANNELS, SIDE, SIDE)).astype(np.float32))
    return path


def _prepared(model_path: Path, data_path: Path, target: str) -> tuple[Any, ...]:
    """(model, plan, max-method ranges, formats, symmetric) as ``onnxq.quantize`` builds them."""
    settings = api._options("int8", {"target": target})
    model = load_model(str(model_path))
    api._prepare(model, settings, mode_spec("int8"))
    rules = load_rule_set(target, None)
    plan = plan_placement(model, rules, api._placement(settings))
    formats = api.formats_for("int8", rules.activation_symmetric)
    data = api._open_data(model, plan, str(data_path), settings)

    def max_ranges(tensors: list[str]) -> dict[str, TensorRange]:
        return calibrate(model, tensors, data, get_method("max"), formats[0])

    ranges = api._calibrate(model, plan, data, settings, {}, max_ranges)
    return model, plan, ranges, formats, rules.activation_symmetric


def _shrunk(ranges: dict[str, TensorRange], factor: float) -> dict[str, TensorRange]:
    """A destructive 'method': every range clipped to ``factor`` of its max."""
    return {
        t: replace(
            r,
            chosen_low=r.chosen_low * factor,
            chosen_high=r.chosen_high * factor,
            source="calibration (bad)",
        )
        for t, r in ranges.items()
    }


def _samples(data_path: Path) -> list[dict[str, np.ndarray]]:
    values = np.load(data_path)["x"]
    return [{"x": values[i : i + 1]} for i in range(DEFAULT_GUARD_SAMPLES)]


def test_output_snr_matches_numpy() -> None:
    rng = np.random.default_rng(SEED)
    reference = [rng.standard_normal((3, 5)), rng.standard_normal(7)]
    noise = [0.05 * rng.standard_normal((3, 5)), 0.05 * rng.standard_normal(7)]
    got = [r + n for r, n in zip(reference, noise, strict=True)]
    signal = sum(float(np.sum(r * r)) for r in reference)
    error = sum(float(np.sum(n * n)) for n in noise)
    assert output_snr_db(reference, got) == pytest.approx(10 * math.log10(signal / error), rel=1e-9)
    assert output_snr_db(reference, reference) == SNR_CAP_DB


def test_output_snr_nonfinite() -> None:
    reference = [np.array([1.0, np.inf, 2.0])]
    assert output_snr_db(reference, [np.array([1.0, 5.0, 2.5])]) == pytest.approx(10 * math.log10(5 / 0.25))
    assert output_snr_db(reference, [np.array([np.nan, np.inf, 2.0])]) == -math.inf


def test_max_ranges_keep_other_sources() -> None:
    stats = TensorStats(low=-2.0, high=5.0, count=10)
    ranges = {
        "a": TensorRange(stats, -2.0, 3.0, "calibration (percentile)"),
        "b": TensorRange(stats, -1.0, 1.0, "override"),
    }
    result = max_ranges(ranges)
    assert (result["a"].chosen_low, result["a"].chosen_high) == (stats.low, stats.high)
    assert result["b"] == ranges["b"]


def test_first_samples_are_single_rows(model_path: Path, data_path: Path) -> None:
    model = load_model(str(model_path))
    data = open_calibration_data(str(data_path), api.input_specs(model), 5, None)
    feeds = first_samples(data, 3)
    expected = np.load(data_path)["x"]
    assert len(feeds) == 3
    for index, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["x"], expected[index : index + 1])


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_destructive_method_falls_back_to_max(model_path: Path, data_path: Path, target: str) -> None:
    model, plan, ranges, formats, symmetric = _prepared(model_path, data_path, target)
    bad = _shrunk(ranges, 0.05)
    decision = guard_ranges(model, plan, bad, _samples(data_path), formats, symmetric, "bad")
    assert decision.max_snr_db > decision.method_snr_db + FAR_BELOW_MAX_DB
    assert decision.chosen == "max" and decision.warning is not None and "'bad'" in decision.warning
    assert "\n" not in decision.warning
    for tensor, chosen in decision.ranges.items():
        assert (chosen.chosen_low, chosen.chosen_high) == (
            ranges[tensor].chosen_low,
            ranges[tensor].chosen_high,
        )


def test_harmless_method_is_kept(model_path: Path, data_path: Path) -> None:
    model, plan, ranges, formats, symmetric = _prepared(model_path, data_path, "tensorrt")
    mild = _shrunk(ranges, 0.999)
    decision = guard_ranges(model, plan, mild, _samples(data_path), formats, symmetric, "mild")
    assert decision.chosen == "mild" and decision.warning is None and decision.ranges is mild
    assert decision.method_snr_db >= decision.max_snr_db - FAR_BELOW_MAX_DB


def test_max_and_no_samples_are_not_measured(model_path: Path, data_path: Path) -> None:
    model, plan, ranges, formats, symmetric = _prepared(model_path, data_path, "tensorrt")
    unchecked = guard_ranges(model, plan, ranges, [], formats, symmetric, "entropy")
    assert unchecked.ranges is ranges and unchecked.warning is not None and "not checked" in unchecked.warning
    as_max = guard_ranges(model, plan, ranges, _samples(data_path), formats, symmetric, "max")
    assert as_max.ranges is ranges and as_max.warning is None and math.isnan(as_max.max_snr_db)


def test_max_snr_equals_the_written_model(model_path: Path, data_path: Path, tmp_path: Path) -> None:
    """The guard's 'max' measurement is what the pipeline writes, run independently (ORT target: fp32 rest)."""
    model, plan, ranges, formats, symmetric = _prepared(model_path, data_path, "ort")
    samples = _samples(data_path)
    decision = guard_ranges(model, plan, _shrunk(ranges, 0.5), samples, formats, symmetric, "half")
    written = tmp_path / "max.onnx"
    # the guard measures with the rule set's weight grid (7-bit): the same as a model for an AVX2 CPU
    onnxq.quantize(
        str(model_path),
        calibration_data=str(data_path),
        target="ort",
        output_path=written,
        ort_cpu="avx2",
        calib_method="max",
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    quantized = ort.InferenceSession(str(written), options, providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    reference = np.concatenate([original.run(None, s)[0] for s in samples]).astype(np.float64)
    got = np.concatenate([quantized.run(None, s)[0] for s in samples]).astype(np.float64)
    expected = 10 * math.log10(np.sum(reference**2) / np.sum((reference - got) ** 2))
    assert decision.max_snr_db == pytest.approx(expected, abs=1e-3)
