"""Helpers of the front-end tests: import after ``pytest.importorskip("torch")``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import onnxq
from onnxq.frontend import builders, recipes
from onnxq.frontend.export import export_with_report
from onnxq.model_io import load_model

CALIBRATION_SAMPLES = 8
#: quantized output SNR floors (dB) on held-in data: far below what these runs measure, far above noise
MIN_SNR = {"int8": 20.0, "fp8": 15.0, "nvfp4": 15.0}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_tiny(
    name: str, tmp_path: Path, batch: int = 2
) -> tuple[recipes.Recipe, builders.Built, Path, dict[str, Any]]:
    recipe = recipes.find_recipe(name)
    built = builders.build(recipe, tiny=True, seed=1)
    inputs = builders.example_inputs(recipe, built, batch, "fp32", seed=2)
    path = tmp_path / f"{name}.onnx"
    report = export_with_report(
        built.module, tuple(inputs.values()), path, input_names=list(inputs),
        output_names=list(recipe.output_names), dynamic_shapes=builders.dynamic_axes(recipe, built, True),
        opset=recipe.opset, hints=recipes.hints_for(recipe),
    )  # fmt: skip
    assert report.exporter == "dynamo" and report.errors and not report.unchecked
    return recipe, built, path, inputs


def eager(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def quantize_and_check(recipe: recipes.Recipe, path: Path, data: Any, tmp_path: Path) -> onnxq.QuantizeResult:
    hints = recipes.recipe_hints(load_model(path))
    assert hints == recipes.hints_for(recipe)
    out = tmp_path / f"{recipe.name}.q.onnx"
    result = onnxq.quantize(path, mode=hints.mode, calibration_data=data, output_path=out,
                            exclude_nodes=hints.exclude_regex())  # fmt: skip
    compared = onnxq.compare(path, out, data)
    assert compared.min_snr_db > MIN_SNR[hints.mode], compared.outputs
    return result
