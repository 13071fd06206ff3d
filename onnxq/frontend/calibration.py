"""Calibration samples from the front-end, in the form ``onnxq quantize --calib`` reads.

Cases handled:
- image models with ``--images DIR``: jpg/jpeg/png files in name order, read with Pillow (an error
  says to install it), RGB, the short side resized (bilinear) to the recipe's ``resize`` scaled to the
  image size, centre-cropped, scaled to [0, 1] and normalized with the recipe's mean/std, as
  torchvision's weights expect; fewer images than asked: all of them, with a warning; none: refused;
- image models without ``--images``: seeded N(0, 1) inputs, with a warning that random inputs
  calibrate poorly;
- Flux: noisy latents at the noise levels of the variant's sampler (cycled through the schedule),
  synthetic N(0, 1) text embeddings and pooled projections (no text encoder here), the pipeline's
  image ids and zero text ids, guidance 3.5 where the variant takes it;
- the output: an ``.npz`` (keys = input names; image models: first axis = samples; Flux, whose ids
  have no sample axis: one feed of N samples) or, for a path without ``.npz``, a folder of one ``.npz``
  per sample. Written atomically: a temporary beside it, renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.frontend.builders import Built, flux_inputs, flux_sigmas, input_shapes, latent_tokens
from onnxq.frontend.recipes import Recipe
from onnxq.model_io import output_folder
from onnxq.temporaries import make_temporary, remove_stale_temporaries

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RANDOM_NOTE = (
    "no --images: calibrating with random inputs, which calibrate poorly (ranges unlike real images); "
    "pass --images DIR with a few hundred representative jpg/png files"
)


def calibration_samples(
    recipe: Recipe, built: Built, count: int, images: Path | None, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of one sample each (batch axis of 1; Flux ids without one)."""
    if count < 1:
        raise OnnxqError(f"--calib-samples {count} is not positive", "pass a count of 1 or more, e.g. 64")
    if recipe.builder == "diffusers_flux":
        if images is not None:
            raise OnnxqError("--images is for image classifiers; Flux calibrates on latents", "drop --images")
        return list(_flux_feeds(recipe, built, count, seed))
    name = recipe.active_inputs(built.config)[0].name
    if images is None:
        logger.warning("%s", RANDOM_NOTE)
        rng = np.random.default_rng(seed)
        shape = input_shapes(recipe, built, 1)[name]
        return [{name: rng.standard_normal(shape, dtype=np.float32)} for _ in range(count)]
    return [{name: array[None]} for array in _image_arrays(recipe, built.image_size, images, count)]


def _flux_feeds(recipe: Recipe, built: Built, count: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    shapes = input_shapes(recipe, built, 1)
    sigmas = flux_sigmas(recipe, latent_tokens(recipe, built))
    for index in range(count):
        feed = flux_inputs(recipe, built, shapes, generator, sigma=sigmas[index % len(sigmas)])
        yield {name: value.to(torch.float32).numpy() for name, value in feed.items()}


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise OnnxqError(f"--images {folder} is not a folder", "pass a folder of jpg/png images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise OnnxqError(f"--images {folder} holds no jpg/png files", "pass a folder of jpg/png images")
    return files


def _image_arrays(recipe: Recipe, size: tuple[int, int], folder: Path, count: int) -> Iterator[np.ndarray]:
    try:
        from PIL import Image
    except ImportError as error:
        raise OnnxqError("reading --images needs Pillow", "pip install pillow") from error
    files = image_files(folder)
    if len(files) < count:
        logger.warning(
            "--images %s holds %d images, fewer than --calib-samples %d: using them all",
            folder,
            len(files),
            count,
        )
    for path in files[:count]:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise OnnxqError(f"cannot read image {path}: {error}", "remove or replace the file") from error
        yield preprocess(recipe, image, size)


def preprocess(recipe: Recipe, image: Any, size: tuple[int, int]) -> np.ndarray:
    """torchvision's ImageNet preprocessing: resize the short side, centre crop, [0, 1], mean/std."""
    from PIL import Image

    height, width = size
    spec = recipe.image
    short = round((spec.resize or spec.size[0]) * height / spec.size[0])
    # torchvision's Resize(int): the short side to ``short``, the long side truncated in proportion
    if image.width <= image.height:
        new_size = (short, int(short * image.height / image.width))
    else:
        new_size = (int(short * image.width / image.height), short)
    resized = image.resize(new_size, Image.Resampling.BILINEAR)
    if resized.width < width or resized.height < height:
        raise OnnxqError(
            f"the recipe resizes to {short} pixels, smaller than --image-size {height} {width}",
            "pass a square --image-size",
        )
    # torchvision's CenterCrop rounds the offset
    left, top = round((resized.width - width) / 2.0), round((resized.height - height) / 2.0)
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(cropped, dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean or (0.0, 0.0, 0.0), dtype=np.float32)
    std = np.asarray(spec.std or (1.0, 1.0, 1.0), dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def write_samples(feeds: list[dict[str, np.ndarray]], destination: Path) -> Path:
    """One ``.npz`` (``destination`` ends in .npz) or a new folder of one ``.npz`` per feed, atomically.

    In the single file, inputs with a sample axis are concatenated along it; the others (Flux ids) are
    the same in every feed and stored once. An existing folder is never replaced (it may be the user's)."""
    check_destination(destination)
    folder = output_folder(destination)
    remove_stale_temporaries(folder)
    temporary = make_temporary(folder, destination.name)
    try:
        staged = temporary / destination.name
        if destination.suffix.lower() == ".npz":
            _save_npz(staged, _joined(feeds))
        else:
            staged.mkdir()
            for index, feed in enumerate(feeds):
                _save_npz(staged / f"sample_{index:05d}.npz", feed)
        _replace(staged, destination)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return destination


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    save: Any = np.savez  # numpy's stubs read a keyword "allow_pickle" into **arrays
    save(path, **arrays)


def check_destination(destination: Path) -> None:
    """Before any work: the folder exists, and the destination is not an existing folder."""
    if not output_folder(destination).is_dir():
        raise OnnxqError(f"the folder of --calib-out {destination} does not exist", "create it first")
    if destination.is_dir():
        raise OnnxqError(
            f"--calib-out {destination} is an existing folder", "pass a new folder name or a .npz path"
        )


#: Flux inputs without a sample axis (the same in every feed)
UNBATCHED_INPUTS = ("img_ids", "txt_ids")


def _joined(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        name: feeds[0][name] if name in UNBATCHED_INPUTS else np.concatenate([f[name] for f in feeds], axis=0)
        for name in feeds[0]
    }


def _replace(staged: Path, destination: Path) -> None:
    try:
        os.replace(staged, destination)
    except OSError as error:
        raise OnnxqError(
            f"cannot write {destination}: {error.strerror or error}", "choose another --calib-out"
        ) from error
