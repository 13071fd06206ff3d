"""Tiny seeded configurations of each recipe: export, match eager PyTorch, quantize, run in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the front-end tests need torch (pip install 'onnxq[torch]')")
pytest.importorskip("torchvision", reason="the front-end tests need torchvision (pip install 'onnxq[torch]')")

from frontend_helpers import CALIBRATION_SAMPLES, eager, export_tiny, quantize_and_check, session  # noqa: E402

from onnxq.frontend import builders, recipes  # noqa: E402
from onnxq.model_io import load_model  # noqa: E402


def test_resnet_exports_matches_eager_and_quantizes_int8(tmp_path: Path) -> None:
    recipe, built, path, _ = export_tiny("resnet50", tmp_path)
    rng = np.random.default_rng(3)
    # a batch size the trace never saw: the batch axis is dynamic
    feeds = {"input": rng.standard_normal((3, 3, 32, 32), dtype=np.float32)}
    got = session(path).run(None, feeds)[0]
    np.testing.assert_allclose(got, eager(built.module, feeds), rtol=1e-4, atol=1e-4)
    model = load_model(path)
    assert not [n for n in model.graph if n.op_type in ("Constant", "BatchNormalization")]
    assert any(n.name.startswith("layer1.0.") for n in model.graph)
    data = {"input": rng.standard_normal((CALIBRATION_SAMPLES, 3, 32, 32), dtype=np.float32)}
    result = quantize_and_check(recipe, path, data, tmp_path)
    assert sum(d.quantized for d in result.plan.decisions if d.op_type == "Conv") >= 4


def test_vit_exports_and_quantizes_fp8_keeping_recipe_layers(tmp_path: Path) -> None:
    recipe, built, path, inputs = export_tiny("vit_b_16", tmp_path)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    np.testing.assert_allclose(
        session(path).run(None, feeds)[0], eager(built.module, feeds), rtol=1e-4, atol=1e-4
    )
    rng = np.random.default_rng(4)
    data = {"input": rng.standard_normal((CALIBRATION_SAMPLES, 3, 32, 32), dtype=np.float32)}
    result = quantize_and_check(recipe, path, data, tmp_path)
    excluded = {d.node for d in result.plan.decisions if d.category == "excluded by user"}
    assert excluded == {"conv_proj/Conv", "heads.head/Gemm"}
    assert any(d.quantized and d.op_type == "MatMul" for d in result.plan.decisions)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_flux_noise_levels_are_the_schedulers(name: str) -> None:
    diffusers = pytest.importorskip("diffusers", reason="Flux needs diffusers")
    recipe = recipes.find_recipe(name)
    tokens = 4096
    steps = int(recipe.variant["steps"])
    shift = recipe.variant.get("shift")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=bool(shift), base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    mu = None
    if shift:
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = 0.5 + slope * (tokens - 256)
    scheduler.set_timesteps(sigmas=list(sigmas), mu=mu)
    np.testing.assert_allclose(builders.flux_sigmas(recipe, tokens), scheduler.sigmas[:-1].numpy(), rtol=1e-5)
