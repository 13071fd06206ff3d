"""``onnxq export MODEL``: a recipe's PyTorch model to ONNX, with its calibration samples.

Wired into ``onnxq/cli.py`` by ``add_export_parser(commands, parents=[common])`` and ``"export": run_export``;
errors are ``OnnxqError`` (one line, exit 2, from ``cli.main``). Cases handled:
- every option is checked before torch is imported or a model built: unknown model (the known ones
  listed), missing weights file or folder, ``--calib-samples`` without ``--calib-out`` and the reverse,
  ``--images`` without them, a bad ``--image-size``/``--batch``/``--opset``, an unwritable output;
- without ``--weights``: random weights (seeded) and a loud warning;
- ``--weights``: a state dict (.pth via ``torch.load(weights_only=True)``, .safetensors) for
  torchvision models, a diffusers folder for Flux; mismatches name the first keys and shapes;
- ``--dynamic-batch``: traced at batch 2 (torch.export specializes a size-1 dimension);
- calibration samples are made before the export (so a bad ``--images`` folder fails first) and
  written after it: a failed export leaves neither the model nor the samples.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")
EXPORTERS = ("auto", "dynamo", "torchscript")
#: the batch a dynamic-batch model is traced at: torch.export treats a size-1 dimension as static
DYNAMIC_TRACE_BATCH = 2
#: ONNX opsets the exporter and ONNX Runtime 1.32 both handle for these models
MIN_OPSET, MAX_OPSET = 17, 23
RANDOM_WEIGHTS_WARNING = (
    "!!! NO --weights: {model} is exported with RANDOM weights. Its outputs mean nothing; use it to test "
    "a pipeline, never to judge accuracy. Pass --weights PATH for a real model. !!!"
)


def add_export_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """The ``export`` subcommand; ``parents``: cli.py's common options (-v, --debug)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="export a PyTorch model (ResNet, ViT, Flux recipes in models/) to ONNX, ready to quantize",
        parents=list(parents),
    )
    parser.add_argument(
        "model", help="recipe variant: resnet18/34/50/101/152, vit_b_16/b_32/l_16, flux-dev, flux-schnell"
    )
    parser.add_argument(
        "--weights",
        help="local weights: a state dict (.pth, .safetensors) for ResNet/ViT, a diffusers folder for Flux "
        "(without it: random weights, for pipeline tests)",
    )
    parser.add_argument("-o", "--output", help="output .onnx path (default: <model>.onnx)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the recipe's)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input image size")
    parser.add_argument("--dtype", choices=DTYPES, help="export dtype (default: the recipe's)")
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="auto", help="auto: dynamo, then TorchScript"
    )
    parser.add_argument("--calib-samples", type=int, metavar="N", help="also write N calibration samples")
    parser.add_argument("--calib-out", help="where: calib.npz, or a new folder (one .npz per sample)")
    parser.add_argument("--images", help="ResNet/ViT: a folder of jpg/png images to calibrate with")
    parser.add_argument("--tiny", action="store_true", help="a few-layer configuration of the family (tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and samples")
    return parser


def run_export(args: argparse.Namespace) -> int:
    from onnxq.frontend.recipes import find_recipe

    recipe = find_recipe(args.model)
    output = Path(args.output) if args.output else Path(f"{recipe.name}.onnx")
    _check_options(args, output)
    from onnxq.frontend import builders

    builders.torch_modules()  # an install hint before anything else
    dtype = args.dtype or recipe.dtype
    built = _build(recipe, args, dtype)
    batch = DYNAMIC_TRACE_BATCH if args.dynamic_batch else (args.batch or 1)
    samples = _samples(recipe, built, args)
    report = _export(recipe, built, batch, dtype, args, output)
    print(f"exported {recipe.name} ({report.exporter} exporter, {report.seconds:.1f} s) -> {output}")
    for line in report.lines():
        print(f"  {line}")
    if samples is not None:
        from onnxq.frontend.calibration import write_samples

        write_samples(samples, Path(args.calib_out))
        print(f"calibration samples: {len(samples)} -> {args.calib_out}")
    print(f"next: onnxq quantize {output}" + (f" --calib {args.calib_out}" if samples is not None else "")
          + f"   (recipe: --mode {recipe.mode})")  # fmt: skip
    return 0


def _check_options(args: argparse.Namespace, output: Path) -> None:
    if (args.calib_samples is None) != (args.calib_out is None):
        raise OnnxqError(
            "--calib-samples and --calib-out go together",
            "pass both, e.g. --calib-samples 64 --calib-out calib.npz",
        )
    if args.images is not None and args.calib_samples is None:
        raise OnnxqError(
            "--images is read for calibration samples only", "add --calib-samples N --calib-out calib.npz"
        )
    if args.batch is not None and args.batch < 1:
        raise OnnxqError(f"--batch {args.batch} is not positive", "pass 1 or more, or --dynamic-batch")
    if args.image_size is not None and min(args.image_size) < 1:
        raise OnnxqError(
            f"--image-size {args.image_size[0]} {args.image_size[1]} is not positive",
            "pass e.g. --image-size 224 224",
        )
    if args.opset is not None and not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise OnnxqError(
            f"--opset {args.opset} is outside {MIN_OPSET}-{MAX_OPSET}", "drop --opset to use the recipe's"
        )
    if args.weights is not None and not Path(args.weights).exists():
        raise OnnxqError(
            f"--weights {args.weights} does not exist",
            "pass a local weights file or folder (nothing is downloaded)",
        )
    if args.images is not None and not Path(args.images).is_dir():
        raise OnnxqError(f"--images {args.images} is not a folder", "pass a folder of jpg/png images")
    from onnxq.frontend.export import save_model_checks

    save_model_checks(output)
    if args.calib_out is not None:
        from onnxq.frontend.calibration import check_destination

        check_destination(Path(args.calib_out))


def _build(recipe: Any, args: argparse.Namespace, dtype: str) -> Any:
    from onnxq.frontend import builders, weights

    size = tuple(args.image_size) if args.image_size else None
    if args.weights is None:
        logger.warning(RANDOM_WEIGHTS_WARNING.format(model=recipe.name))
        built = builders.build(recipe, tiny=args.tiny, image_size=size, seed=args.seed)
    elif recipe.builder == "diffusers_flux":
        folder = weights.flux_folder(Path(args.weights))
        config = weights.flux_folder_config(folder)
        weights.check_flux_variant(config, recipe.config, recipe.name)
        transformer = weights.load_flux_folder(folder, builders.torch_dtype(dtype))
        built = builders.build(recipe, tiny=args.tiny, image_size=size, flux_config=config)
        built.module = builders.flux_module(recipe, config, transformer)
    else:
        built = builders.build(recipe, tiny=args.tiny, image_size=size, seed=args.seed)
        weights.load_into(
            builders.unwrap(built.module), Path(args.weights), recipe.name + (" (tiny)" if args.tiny else "")
        )
    built.module = built.module.to(builders.torch_dtype(dtype))
    return built


def _samples(recipe: Any, built: Any, args: argparse.Namespace) -> list[Any] | None:
    if args.calib_samples is None:
        return None
    from onnxq.frontend.calibration import calibration_samples

    images = Path(args.images) if args.images else None
    return calibration_samples(recipe, built, args.calib_samples, images, seed=args.seed)


def _export(recipe: Any, built: Any, batch: int, dtype: str, args: argparse.Namespace, output: Path) -> Any:
    from onnxq.frontend import builders
    from onnxq.frontend.export import export_with_report
    from onnxq.frontend.recipes import hints_for

    inputs = builders.example_inputs(recipe, built, batch, dtype, seed=args.seed)
    return export_with_report(
        built.module, tuple(inputs.values()), output, input_names=list(inputs),
        output_names=list(recipe.output_names), dynamic_shapes=builders.dynamic_axes(recipe, built, args.dynamic_batch),
        opset=args.opset or recipe.opset, dtype=dtype, exporter=args.exporter, hints=hints_for(recipe),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m onnxq.frontend.cli_export``: the command on its own, until cli.py wires it."""
    from onnxq.cli import EXIT_ERROR

    parser = argparse.ArgumentParser(prog="onnxq")
    commands = parser.add_subparsers(dest="command", required=True)
    add_export_parser(commands)
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_export(args)
    except OnnxqError as error:
        print(f"onnxq: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
