"""``meet_snr_target``: the documented hold-out split, measured steps, the unreachable target."""

from __future__ import annotations

import model_builders
import numpy as np
import pytest

import onnxq
from onnxq.errors import OnnxqError
from onnxq.report.fallback import HOLDOUT_EVERY, meet_snr_target, split_holdout

SAMPLES = 20
OPTIONS = {"mode": "int8", "high_precision": "fp32"}
#: above what INT8 reaches on this model, below what float layers reach
GAIN_ASKED_DB = 1.0


def test_split_holds_out_every_fifth_sample_in_order() -> None:
    data = model_builders.cnn_inputs(2, 12)
    kept, held, description = split_holdout(model_builders.residual_cnn(), data)
    held_indices = [i for i in range(12) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    assert np.array_equal(np.concatenate([f["x"] for f in held]), data["x"][held_indices])
    kept_indices = [i for i in range(12) if i not in held_indices]
    assert np.array_equal(np.concatenate([f["x"] for f in kept]), data["x"][kept_indices])
    assert f"{len(held)} of 12" in description


def test_target_met_by_measured_steps() -> None:
    model, data = model_builders.residual_cnn(), model_builders.cnn_inputs(1, SAMPLES)
    kept, held, _ = split_holdout(model, data)
    plain = onnxq.quantize(model, mode="int8", calibration_data=kept, high_precision="fp32")
    start = onnxq.compare(model, plain.model, held).min_snr_db
    target = start + GAIN_ASKED_DB
    found = meet_snr_target(model, data, OPTIONS, target)
    assert found.snr_db >= target
    assert found.snr_db == pytest.approx(onnxq.compare(model, found.result.model, held).min_snr_db, rel=1e-9)
    assert found.steps and found.steps[0].snr_before_db == pytest.approx(start, rel=1e-9)
    assert [s.layer for s in found.steps if s.kept] == found.excluded
    for step in found.steps:
        assert step.kept == (step.snr_after_db > step.snr_before_db)
    skipped = {d.node for d in found.result.plan.decisions if d.category == "excluded by user"}
    assert set(found.excluded) <= skipped
    notes = [n for n in found.result.plan.notes if n.startswith("fallback to float")]
    assert len(notes) == len(found.steps)


def test_unreachable_target_names_best_snr_and_layers_tried() -> None:
    model, data = model_builders.residual_cnn(), model_builders.cnn_inputs(1, SAMPLES)
    with pytest.raises(OnnxqError, match=r"not reached: best [0-9.]+ dB .* tried (conv|add)") as raised:
        meet_snr_target(model, data, OPTIONS, 1000.0)
    assert "\n" not in str(raised.value)


def test_too_few_samples_to_hold_out() -> None:
    with pytest.raises(OnnxqError, match="too few"):
        meet_snr_target(model_builders.residual_cnn(), model_builders.cnn_inputs(1, 3), OPTIONS, 30.0)
