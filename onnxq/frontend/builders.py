"""PyTorch modules and example inputs for each recipe family, built offline (nothing is downloaded).

Families (the recipe's ``builder``):
- ``torchvision_resnet``: ``torchvision.models.<constructor>(weights=None)``; tiny: one BasicBlock per
  stage, 10 classes;
- ``torchvision_vit``: ``torchvision.models.<constructor>(weights=None, image_size=...)``; tiny: 2
  layers of width 32 on 32 x 32 images;
- ``diffusers_flux``: ``FluxTransformer2DModel(**config)`` (the variant's real config), or the config of
  a diffusers folder; tiny: 1 double + 1 single block, width 32.

Every module is in eval mode. Flux is wrapped (``_KeywordCall``, defined once torch is imported) so that its keyword inputs
become positional ONNX inputs in the recipe's order; its attribute name is stripped from node names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onnxq.errors import OnnxqError
from onnxq.frontend.recipes import Recipe

if TYPE_CHECKING:
    import torch

#: the wrapper's attribute: the exporter's scopes start with it, node names must not
WRAPPED_ATTRIBUTE = "onnxq_wrapped"
TINY_RESNET = {"layers": [1, 1, 1, 1], "num_classes": 10}
TINY_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64,
            "num_classes": 10}  # fmt: skip
#: widths are multiples of 16 so that NVFP4 blocks fit every transformer GEMM
TINY_FLUX = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6],
}  # fmt: skip
TINY_IMAGE = {"torchvision_resnet": (32, 32), "torchvision_vit": (32, 32), "diffusers_flux": (64, 64)}
TINY_TEXT_LENGTH = 8
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Built:
    """A module ready to export and what sizes its inputs."""

    module: torch.nn.Module
    #: the architecture's configuration (Flux: the diffusers config; torchvision: constructor kwargs)
    config: dict[str, Any]
    image_size: tuple[int, int]
    text_length: int | None = None


def torch_modules() -> tuple[Any, Any]:
    """``(torch, torchvision)``, or an OnnxqError saying what to install."""
    try:
        import torch
        import torchvision
    except ImportError as error:
        raise OnnxqError(
            f"onnxq export needs PyTorch and torchvision ({error})", "pip install 'onnxq[torch]'"
        ) from error
    return torch, torchvision


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, TORCH_DTYPES[name])
    return dtype


def build(
    recipe: Recipe, *, tiny: bool = False, image_size: tuple[int, int] | None = None,
    flux_config: dict[str, Any] | None = None, seed: int = 0,
) -> Built:  # fmt: skip
    """The recipe's module with random weights (seeded); ``flux_config`` replaces the variant's."""
    torch, _ = torch_modules()
    torch.manual_seed(seed)
    size = image_size or (TINY_IMAGE[recipe.builder] if tiny else recipe.image.size)
    if recipe.builder == "torchvision_resnet":
        return Built(_resnet(recipe, tiny), {}, size)
    if recipe.builder == "torchvision_vit":
        module, config = _vit(recipe, tiny, size)
        return Built(module, config, size)
    if recipe.builder == "diffusers_flux":
        config = flux_config or ({**TINY_FLUX, "guidance_embeds": bool(recipe.config.get("guidance_embeds"))}
                                 if tiny else recipe.config)  # fmt: skip
        text = TINY_TEXT_LENGTH if tiny else int(recipe.variant["text_length"])
        return Built(flux_module(recipe, config), dict(config), size, text)
    raise ValueError(f"unknown builder {recipe.builder!r} in {recipe.source}")


def _resnet(recipe: Recipe, tiny: bool) -> torch.nn.Module:
    _, torchvision = torch_modules()
    if tiny:
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, TINY_RESNET["layers"], num_classes=TINY_RESNET["num_classes"]).eval()
    constructor = getattr(torchvision.models, recipe.variant["constructor"])
    module: torch.nn.Module = constructor(weights=None)
    return module.eval()


def _vit(recipe: Recipe, tiny: bool, size: tuple[int, int]) -> tuple[torch.nn.Module, dict[str, Any]]:
    _, torchvision = torch_modules()
    if size[0] != size[1]:
        raise OnnxqError(
            f"--image-size {size[0]} {size[1]}: torchvision's ViT takes square images only",
            f"pass --image-size {size[0]} {size[0]}",
        )
    if tiny:
        from torchvision.models.vision_transformer import VisionTransformer

        config = {**TINY_VIT, "image_size": size[0]}
        return _randomized_head(VisionTransformer(**config).eval()), config
    constructor = getattr(torchvision.models, recipe.variant["constructor"])
    patch = int(recipe.variant["constructor"].rsplit("_", 1)[1])
    if size[0] % patch:
        raise OnnxqError(
            f"--image-size {size[0]} is not a multiple of {recipe.name}'s patch size {patch}",
            f"pass a multiple of {patch}, e.g. {recipe.image.size[0]}",
        )
    return _randomized_head(constructor(weights=None, image_size=size[0]).eval()), {"image_size": size[0]}


def _randomized_head(model: torch.nn.Module) -> torch.nn.Module:
    """torchvision starts the ViT head at zero (every logit 0): random weights instead, so that a
    random-weight export has outputs to compare and quantize (loaded weights replace them)."""
    import torch

    head = model.get_submodule("heads.head")
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=head.in_features**-0.5)
    return model


def _keyword_call_class() -> type:
    import torch

    class _KeywordCall(torch.nn.Module):
        """Calls the wrapped module with keyword inputs; returns its first output."""

        def __init__(self, wrapped: torch.nn.Module, names: tuple[str, ...]) -> None:
            super().__init__()
            setattr(self, WRAPPED_ATTRIBUTE, wrapped)
            self.names = names

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            wrapped = getattr(self, WRAPPED_ATTRIBUTE)
            output: torch.Tensor = wrapped(**dict(zip(self.names, inputs, strict=True)), return_dict=False)[0]
            return output

    return _KeywordCall


def flux_module(recipe: Recipe, config: dict[str, Any], transformer: Any = None) -> torch.nn.Module:
    """The Flux transformer (built from ``config`` unless given), wrapped to take positional inputs."""
    if transformer is None:
        transformer = _flux_class()(**config)
    names = tuple(spec.name for spec in recipe.active_inputs(config))
    module: torch.nn.Module = _keyword_call_class()(transformer.eval(), names)
    return module.eval()


def _flux_class() -> Any:
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as error:
        raise OnnxqError(f"Flux needs diffusers ({error})", "pip install 'onnxq[torch]'") from error
    return FluxTransformer2DModel


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module holding the weights (the wrapped transformer for Flux)."""
    inner = getattr(module, WRAPPED_ATTRIBUTE, None)
    return inner if inner is not None else module


# --- inputs ---------------------------------------------------------------------------------------


def dimension_sizes(recipe: Recipe, built: Built, batch: int) -> dict[str, int]:
    """Sizes of the recipe's named dimensions for this module, batch and image size."""
    height, width = built.image_size
    sizes = {"batch": batch, "height": height, "width": width}
    if recipe.builder == "diffusers_flux":
        sizes["latent"] = latent_tokens(recipe, built)
        sizes["text"] = built.text_length or 0
        for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
            sizes[key] = int(built.config[key])
    return sizes


def latent_tokens(recipe: Recipe, built: Built) -> int:
    """Image tokens of a Flux latent: (H / vae / patch) x (W / vae / patch)."""
    step = int(recipe.image.vae_scale or 1) * int(recipe.image.patch or 1)
    height, width = built.image_size
    if height % step or width % step:
        raise OnnxqError(
            f"--image-size {height} {width} is not a multiple of {step} (VAE scale x latent patch)",
            f"pass multiples of {step}, e.g. {recipe.image.size[0]} {recipe.image.size[1]}",
        )
    return (height // step) * (width // step)


def input_shapes(recipe: Recipe, built: Built, batch: int) -> dict[str, tuple[int, ...]]:
    sizes = dimension_sizes(recipe, built, batch)
    shapes = {}
    for spec in recipe.active_inputs(built.config):
        shapes[spec.name] = tuple(d if isinstance(d, int) else sizes[d] for d in spec.shape)
    return shapes


def dynamic_axes(recipe: Recipe, built: Built, dynamic_batch: bool) -> dict[str, dict[int, str]]:
    """{input: {axis: dimension name}}: the recipe's dynamic dimensions, batch only with ``dynamic_batch``."""
    axes: dict[str, dict[int, str]] = {}
    for spec in recipe.active_inputs(built.config):
        named = {
            axis: dim
            for axis, dim in enumerate(spec.shape)
            if isinstance(dim, str) and dim in spec.dynamic and (dim != "batch" or dynamic_batch)
        }
        if named:
            axes[spec.name] = named
    return axes


def example_inputs(
    recipe: Recipe, built: Built, batch: int, dtype: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded inputs of the recipe's shapes: images ~ N(0, 1); Flux inputs as its pipeline makes them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shapes = input_shapes(recipe, built, batch)
    float_type = torch_dtype(dtype)
    if recipe.builder != "diffusers_flux":
        return {
            name: torch.randn(shape, generator=generator).to(float_type) for name, shape in shapes.items()
        }
    return {
        name: value.to(float_type)
        for name, value in flux_inputs(recipe, built, shapes, generator, sigma=0.5).items()
    }


def flux_inputs(
    recipe: Recipe, built: Built, shapes: dict[str, tuple[int, ...]], generator: torch.Generator, sigma: float
) -> dict[str, torch.Tensor]:
    """One Flux feed at noise level ``sigma``: noisy packed latents, synthetic text embeddings (no T5
    here: N(0, 1)), image ids (0, row, column) as the pipeline builds them, zero text ids."""
    import torch

    batch = shapes["hidden_states"][0]
    clean = torch.randn(shapes["hidden_states"], generator=generator)
    noise = torch.randn(shapes["hidden_states"], generator=generator)
    feed = {
        "hidden_states": (1.0 - sigma) * clean + sigma * noise,
        "encoder_hidden_states": torch.randn(shapes["encoder_hidden_states"], generator=generator),
        "pooled_projections": torch.randn(shapes["pooled_projections"], generator=generator),
        "timestep": torch.full((batch,), sigma),
        "img_ids": image_ids(recipe, built),
        "txt_ids": torch.zeros(shapes["txt_ids"]),
    }
    if "guidance" in shapes:
        feed["guidance"] = torch.full((batch,), float(recipe.variant.get("guidance", 3.5)))
    return feed


def image_ids(recipe: Recipe, built: Built) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids``: (0, row, column) per latent token."""
    import torch

    step = int(recipe.image.vae_scale or 1) * int(recipe.image.patch or 1)
    rows, columns = built.image_size[0] // step, built.image_size[1] // step
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3)


def flux_sigmas(recipe: Recipe, tokens: int) -> list[float]:
    """The noise levels of the variant's sampler: FlowMatchEulerDiscreteScheduler's ``linspace(1, 1/N,
    N)``, time-shifted with ``mu`` interpolated from the image tokens where the variant has ``shift``
    (Flux.1 dev's dynamic shifting); schnell uses them unshifted."""
    steps = int(recipe.variant.get("steps", 28))
    sigmas = [1.0 - index * (1.0 - 1.0 / steps) / max(steps - 1, 1) for index in range(steps)]
    shift = recipe.variant.get("shift")
    if not shift:
        return sigmas
    slope = (shift["max_shift"] - shift["base_shift"]) / (shift["max_seq_len"] - shift["base_seq_len"])
    mu = shift["base_shift"] + slope * (tokens - shift["base_seq_len"])
    return [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in sigmas]
