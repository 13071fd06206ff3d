"""Calibration inputs that used to end in a traceback, a misleading line, or silence (issue 6, items 7, 8)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import model_builders
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq.calibration.calibrator import CalibrationSettings, check_memory_limit
from onnxq.calibration.overrides import load_overrides
from onnxq.errors import OnnxqError

VOCAB = 10
HIDDEN = 32
TOKENS = 4


def embedding_model(seed: int = 0) -> onnx.ModelProto:
    """ids [N, 4] -> Gather from a [10, 32] table -> MatMul [32, 32]."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
            helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj"),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", TOKENS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", TOKENS, HIDDEN])],
        [
            model_builders.weights(rng, "table", [VOCAB, HIDDEN]),
            model_builders.weights(rng, "w", [HIDDEN, HIDDEN]),
        ],
    )
    return model_builders.finish(graph)


def ids(high: int, samples: int = 6) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(1).integers(0, high, (samples, TOKENS)).astype(np.int64)}


def test_gather_ids_out_of_range_are_one_line_naming_the_node() -> None:
    with pytest.raises(OnnxqError) as error:
        onnxq.quantize(embedding_model(), calibration_data=ids(high=VOCAB * 3))
    message = str(error.value)
    assert "node 'lookup' (Gather)" in message and "calibration data" in message
    assert "ids [6, 4] int64" in message and "Fix:" in message and "\n" not in message


def test_gather_ids_in_range_calibrate() -> None:
    """Control for the test above: the same model with valid ids calibrates."""
    assert onnxq.quantize(embedding_model(), calibration_data=ids(high=VOCAB)).ranges


# ----------------------------------------------------------------------------------------------
# ranges beyond float32


@pytest.mark.parametrize("bound", [1e300, -1e39])
def test_override_beyond_float32_names_float32(tmp_path: Path, bound: float) -> None:
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"emb": sorted([0.0, bound])}))
    with pytest.raises(OnnxqError, match=r"'emb'.*exceeds float32's range") as error:
        load_overrides(path)
    assert "finite" not in error.value.problem


def test_override_at_float32_max_is_accepted(tmp_path: Path) -> None:
    top = float(np.finfo(np.float32).max)
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"emb": [-top, top]}))
    assert load_overrides(path) == {"emb": (-top, top)}


def test_cache_value_beyond_float32_names_float32(tmp_path: Path) -> None:
    cache = tmp_path / "ranges.json"
    model, data = embedding_model(), ids(high=VOCAB)
    onnxq.quantize(model, calibration_data=data, calib_cache=cache)
    document = json.loads(cache.read_text())
    document["tensors"]["emb"]["high"] = 1e300
    cache.write_text(json.dumps(document))
    with pytest.raises(OnnxqError, match=r"ranges\.json.*'emb'.*exceeds float32's range") as error:
        onnxq.quantize(model, calibration_data=data, calib_cache=cache)
    assert "finite" not in error.value.problem


# ----------------------------------------------------------------------------------------------
# silent acceptance


def test_override_that_matches_no_tensor_warns_with_near_matches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"embb": [-1.0, 1.0], "emb": [-2.0, 2.0]}))
    with caplog.at_level(logging.WARNING):
        result = onnxq.quantize(embedding_model(), calibration_data=ids(VOCAB), calib_overrides=path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'embb' matches no tensor" in w and "'emb'" in w for w in warnings), warnings
    assert not any("'emb' matches" in w for w in warnings)
    assert (result.ranges["emb"].chosen_low, result.ranges["emb"].source) == (-2.0, "override")


@pytest.mark.parametrize("megabytes", [0, -10, math.nan, math.inf, "lots", True])
def test_memory_limit_must_be_a_positive_number(megabytes: object) -> None:
    with pytest.raises(OnnxqError, match=r"memory limit .* not a positive number"):
        check_memory_limit(megabytes)
    with pytest.raises(OnnxqError, match="--calib-memory"):
        CalibrationSettings(memory_limit_mb=megabytes)  # type: ignore[arg-type]


def test_memory_limit_accepts_fractions() -> None:
    assert check_memory_limit("0.5") == 0.5
    assert CalibrationSettings(memory_limit_mb=64).memory_limit_mb == 64


def test_overrides_are_read_before_the_data(tmp_path: Path) -> None:
    """A bad override file fails before any calibration data is opened or any model runs."""
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"emb": [2.0, 1.0]}))
    opened: list[int] = []

    def data() -> list[dict[str, np.ndarray]]:
        opened.append(1)
        return [ids(VOCAB)]

    with pytest.raises(OnnxqError, match=r"low 2\.0 > high 1\.0"):
        onnxq.quantize(embedding_model(), calibration_data=data, calib_overrides=path)
    assert opened == []
