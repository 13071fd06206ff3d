"""Tiny seeded Flux: export with dynamic batch and latents, match eager PyTorch, quantize NVFP4, run emulated."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the front-end tests need torch (pip install 'onnxq[torch]')")
pytest.importorskip("torchvision", reason="the front-end tests need torchvision (pip install 'onnxq[torch]')")
pytest.importorskip("diffusers", reason="Flux needs diffusers (pip install 'onnxq[torch]')")

from frontend_helpers import eager, export_tiny, quantize_and_check, session  # noqa: E402

from onnxq.frontend import builders, recipes  # noqa: E402


def test_flux_exports_with_dynamic_latents_and_quantizes_nvfp4(tmp_path: Path) -> None:
    recipe, built, path, _ = export_tiny("flux-dev", tmp_path)
    # another batch and latent length than the trace (64 x 64 pixels, 16 tokens): 32 x 48 pixels, 6 tokens
    other = builders.Built(built.module, built.config, (32, 48), built.text_length)
    generator = torch.Generator().manual_seed(5)
    shapes = builders.input_shapes(recipe, other, 3)
    feed = {k: v.numpy() for k, v in builders.flux_inputs(recipe, other, shapes, generator, 0.7).items()}
    assert feed["hidden_states"].shape[:2] == (3, 6)
    np.testing.assert_allclose(
        session(path).run(None, feed)[0], eager(built.module, feed), rtol=1e-4, atol=1e-4
    )
    from onnxq.frontend.calibration import calibration_samples

    data = calibration_samples(recipe, built, 2, None, seed=6)
    result = quantize_and_check(recipe, path, data, tmp_path)
    regex = recipes.hints_for(recipe).exclude_regex() or ""
    gemms = [d for d in result.plan.decisions if d.op_type in ("MatMul", "Gemm")]
    kept = {d.node for d in gemms if d.category == "excluded by user"}
    assert kept == {d.node for d in gemms if re.search(regex, d.node)} and "proj_out/MatMul" in kept
    assert result.plan.blocks  # NVFP4 weights where the recipe allows


def test_diffusers_folder_weights_load_and_variant_is_checked(tmp_path: Path) -> None:
    import argparse

    from onnxq.errors import OnnxqError
    from onnxq.frontend import cli_export

    recipe = recipes.find_recipe("flux-dev")
    saved = builders.unwrap(builders.build(recipe, tiny=True, seed=9).module)
    saved.save_pretrained(tmp_path / "transformer")  # a pipeline folder: the transformer in its subfolder
    args = argparse.Namespace(weights=str(tmp_path), tiny=True, image_size=None, seed=0)
    built = cli_export._build(recipe, args, "fp32")
    loaded = builders.unwrap(built.module).state_dict()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    with pytest.raises(OnnxqError, match=r"has guidance embeddings, unlike flux-schnell.*use flux-dev"):
        cli_export._build(recipes.find_recipe("flux-schnell"), args, "fp32")
