"""FP16/BF16 rest of the graph: accuracy and weight size, measured on the benchmark models.

For each benchmark model (``tools/bench_models.py``: ResNet-, ViT- and BERT-style, seeded, exported
from PyTorch) and each mode (int8, fp8), the TensorRT-target model is quantized twice from the same
calibration data, with a float32 rest (``--high-precision fp32``) and with the default FP16 rest, and
both are run in ONNX Runtime CPU on the held-out samples. Rows also give ``onnxq convert --to fp16``
of the unquantized model (the FP16 baseline users compare with). Reported per row:

* output SNR against the FP32 model (dB; first output), and the difference FP16 rest - FP32 rest;
* bytes of the float weights that are not quantized (float32/float16/bfloat16 initializers), and
  their ratio FP16 rest / FP32 rest (the issue's "halves the non-quantized weights");
* the float32 islands the conversion kept and why (``ConversionReport``).

The models are built once with PyTorch (``--models`` directory, reused when present); quantizing and
evaluating need only onnxq and ONNX Runtime. Run ``python tools/bench_fp16.py --help``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

TOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TOOLS_DIR.parent
for folder in (TOOLS_DIR, REPO_ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import bench  # noqa: E402  (a sibling script, importable once tools/ is on the path)

import onnxq  # noqa: E402
from onnxq.convert import convert_file  # noqa: E402

LOG = logging.getLogger("bench_fp16")
MODELS = ("resnet", "vit", "bert")
MODES = ("int8", "fp8")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
#: the issue's bound on what the FP16 rest may cost a quantized model
MAX_FP16_LOSS_DB = 1.0
#: the issue's floor for ``onnxq convert --to fp16`` of an unquantized model
MIN_CONVERT_SNR_DB = 40.0


@dataclass
class Row:
    model: str
    variant: str
    snr_db: float
    float_weight_bytes: int
    kept_fp32: str = ""
    reference_snr_db: float | None = None
    reference_float_bytes: int | None = None


def float_weight_bytes(path: Path) -> int:
    """Bytes of the float initializers: the weights that stay in high precision."""
    model = onnx.load(str(path))
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES:
            itemsize = 4 if tensor.data_type == onnx.TensorProto.FLOAT else 2
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def first_output(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = bench.make_session(path, optimize=False)
    names = {i.name for i in session.get_inputs()}
    output = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    return np.asarray(output, dtype=np.float32)


def kept_summary(conversion: Any) -> str:
    if conversion is None or not conversion.kept_fp32:
        return ""
    reasons = Counter(conversion.kept_fp32.values())
    return "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))


def measure_model(bench_model: Any, work: Path) -> list[Row]:
    calib = bench.load_npz(bench_model.calib_path)
    feeds = bench.load_npz(bench_model.eval_path)
    reference = first_output(bench_model.model_path, feeds)
    rows = []
    converted = work / f"{bench_model.name}_fp16.onnx"
    report = convert_file(bench_model.model_path, converted, "fp16", data=str(bench_model.calib_path))
    rows.append(
        Row(
            bench_model.name, "convert --to fp16", bench.snr_db(reference, first_output(converted, feeds)),
            float_weight_bytes(converted), kept_summary(report),
            reference_float_bytes=float_weight_bytes(bench_model.model_path),
        )
    )  # fmt: skip
    for mode in MODES:
        measured: dict[str, tuple[float, int, str]] = {}
        for rest in ("fp32", "fp16"):
            out = work / f"{bench_model.name}_{mode}_{rest}.onnx"
            result = onnxq.quantize(
                str(bench_model.model_path), output_path=out, mode=mode, target="tensorrt",
                calibration_data=calib, high_precision=rest,
            )  # fmt: skip
            snr = bench.snr_db(reference, first_output(out, feeds))
            measured[rest] = (snr, float_weight_bytes(out), kept_summary(result.conversion))
            LOG.info("%s %s rest %s: %.2f dB", bench_model.name, mode, rest, snr)
        snr32, bytes32, _ = measured["fp32"]
        snr16, bytes16, kept = measured["fp16"]
        rows.append(Row(bench_model.name, f"{mode}, FP16 rest", snr16, bytes16, kept, snr32, bytes32))
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "# FP16 rest of the graph: output SNR and non-quantized weight bytes",
        "",
        "Generated by `python tools/bench_fp16.py`. TensorRT target, ONNX Runtime CPU with graph optimizations off (Q/DQ as written),",
        "held-out samples, SNR of the first output against the FP32 model.",
        "",
        "| model | variant | SNR FP32 rest (dB) | SNR FP16 rest (dB) | change (dB) | float weights FP32 rest | "
        "float weights FP16 rest | ratio | kept float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        before = row.reference_snr_db
        change = "" if before is None else f"{row.snr_db - before:+.2f}"
        ratio = "" if not row.reference_float_bytes else f"{row.float_weight_bytes / row.reference_float_bytes:.3f}"
        lines.append(
            f"| {row.model} | {row.variant} | {'' if before is None else f'{before:.2f}'} | {row.snr_db:.2f} | "
            f"{change} | {row.reference_float_bytes or ''} | {row.float_weight_bytes} | {ratio} | "
            f"{row.kept_fp32 or '-'} |"
        )
    lines += ["", *verdicts(rows)]
    return "\n".join(lines) + "\n"


def verdicts(rows: list[Row]) -> list[str]:
    notes = []
    for row in rows:
        if row.reference_snr_db is None:
            ok = row.snr_db >= MIN_CONVERT_SNR_DB
            notes.append(f"- {row.model} {row.variant}: {row.snr_db:.2f} dB "
                         f"({'meets' if ok else 'BELOW'} the {MIN_CONVERT_SNR_DB:.0f} dB floor)")  # fmt: skip
        else:
            loss = row.reference_snr_db - row.snr_db
            ok = loss <= MAX_FP16_LOSS_DB or not math.isfinite(loss)
            notes.append(f"- {row.model} {row.variant}: {loss:+.2f} dB lost "
                         f"({'within' if ok else 'OVER'} the {MAX_FP16_LOSS_DB:.0f} dB bound)")  # fmt: skip
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("out/bench/models"),
                        help="where the benchmark models are built or reused (default: out/bench/models)")  # fmt: skip
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=TOOLS_DIR / "results" / "bench_fp16.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-fp16-") as folder:
        for bench_model in bench.build_models(args.models_dir, names, rebuild=False):
            rows += measure_model(bench_model, Path(folder))
    text = render(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
