"""Shared fixtures: tests import the model builders from this folder."""

from __future__ import annotations

from pathlib import Path

import model_builders
import numpy as np
import onnx
import pytest


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[Path, Path]:
    """The residual CNN saved as cnn.onnx and 24 calibration samples as calib.npz, in tmp_path."""
    model = tmp_path / "cnn.onnx"
    onnx.save(model_builders.residual_cnn(), model)
    data = tmp_path / "calib.npz"
    np.savez(data, **model_builders.cnn_inputs(1, 24))
    return model, data
