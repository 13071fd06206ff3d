"""AutoQuantize benchmark: a sweep of effective-bits budgets on the BERT- and ViT-style benchmark models.

Models: ``bert.onnx`` and ``vit.onnx`` with ``*_calib.npz`` / ``*_eval.npz`` as built by
``tools/bench_models.py`` (``--models`` folder). Per model the formats' uniform models and the per-layer
estimates are measured once (:func:`onnxq.report.autoquant.measure_candidates`), then each budget is
solved, built and measured on the evaluation set (:func:`onnxq.report.autoquant.choose_and_verify`).

Rows: per budget, the effective bits reached, the formats chosen (layers per format), the predicted and
the measured output SNR (held-out set, ``onnxq.compare``), the chosen layers' weight size as stored and
the model file size; then, for reference, each uniform model (every layer its format can take in it,
the others in the FP16 rest) with its effective bits and measured SNR.

``python tools/bench_autoquant.py [--models /tmp/bbfull2/models] [--budgets 4.5,5,6,8,10]`` writes
``tools/results/bench_autoquant.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

from onnxq.comparison import compare
from onnxq.model_io import model_file_size, save_model
from onnxq.report.autoquant import (
    DEFAULT_FORMATS,
    FLOAT_BITS,
    Candidates,
    check_budget,
    choose_and_verify,
    measure_candidates,
)

LOG = logging.getLogger("bench_autoquant")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_autoquant.md"
DEFAULT_MODELS = Path("/tmp/bbfull2/models")
DEFAULT_BUDGETS = "4.5,5,6,8,10"
MODEL_NAMES = ("bert", "vit")
MB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS)
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    parser.add_argument("--names", default=",".join(MODEL_NAMES))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--high-precision",
        default="fp32",
        help="the rest's type (default fp32: onnxq emulate cannot yet run NVFP4 weights in an fp16 rest)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    budgets = [float(b) for b in args.budgets.split(",")]
    for budget in budgets:
        check_budget(budget)
    lines = _header(args.formats, args.high_precision)
    for name in args.names.split(","):
        lines += _bench_model(args.models, name, budgets, args.formats.split(","), args.high_precision)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _header(formats: str, high_precision: str) -> list[str]:
    return [
        "# AutoQuantize budget sweep",
        "",
        f"Formats {formats}, `--target tensorrt`, `--high-precision {high_precision}` (the layers left in",
        f"high precision cost {FLOAT_BITS[high_precision]:g} bits per weight). Effective bits: stored weight bits (codes,",
        "scales, zero points) averaged over the parameters of the layers AutoQuantize chooses for (GEMM/Conv",
        "weights). Predicted: additive per-layer noise from the 'only this layer' measurements on the",
        "calibration data; measured: `onnxq.compare` on the held-out `*_eval.npz`. Weights: those layers'",
        "weights as stored; file: the saved model. Written by `tools/bench_autoquant.py`.",
        "",
        "Layers without weights (attention BMMs, residual Adds) stay in high precision in the mixed models,",
        "while the uniform int8/fp8/nvfp4 models quantize them: part of the mixed models' lead over a",
        "uniform model of the same bits comes from that. The rest is fp32 because `onnxq emulate` cannot yet",
        "run NVFP4 weights in an fp16 rest (the conversion puts a Cast between the FP8 scale DQ and the",
        "weight DQ), so no NVFP4 model with the default fp16 rest can be measured on a CPU.",
        "",
    ]


def _bench_model(
    folder: Path, name: str, budgets: list[float], formats: list[str], high_precision: str
) -> list[str]:
    model = folder / f"{name}.onnx"
    calib, held = folder / f"{name}_calib.npz", folder / f"{name}_eval.npz"
    started = time.perf_counter()
    candidates = measure_candidates(
        model, calib, formats, {"target": "tensorrt", "high_precision": high_precision}, held
    )
    measured_at = time.perf_counter()
    LOG.info("%s: %d layers measured in %.1f s", name, len(candidates.layers), measured_at - started)
    lines = [
        f"## {name} ({len(candidates.layers)} layers, {candidates.params / 1e6:.2f} M weight parameters)",
        "",
        "| budget (bits) | effective bits | formats chosen | predicted SNR (dB) | measured SNR (dB) "
        "| weights (MB) | file (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as temporary:
        for budget in budgets:
            lines.append(_budget_row(candidates, budget, Path(temporary) / f"{name}_{budget:g}.onnx"))
    lines += [
        "",
        "Uniform models for reference:",
        "",
        "| format | effective bits | measured SNR (dB) |",
        "|---|---|---|",
    ]
    for fmt, result in candidates.uniform.items():
        bits = _uniform_bits(candidates, fmt)
        snr = compare(candidates.fp32, result.model, held).min_snr_db
        lines.append(f"| {fmt} | {bits:.2f} | {snr:.2f} |")
    seconds = time.perf_counter() - started
    lines += [
        "",
        f"Time: {measured_at - started:.0f} s for the uniform models and estimates, {seconds:.0f} s in all.",
        "",
    ]
    return lines


def _budget_row(candidates: Candidates, budget: float, path: Path) -> str:
    if budget < candidates.smallest_bits():
        return f"| {budget:g} | below the smallest ({candidates.smallest_bits():.2f}): refused | | | | | |"
    result = choose_and_verify(candidates, budget)
    save_model(result.result.model, path)
    chosen = ", ".join(f"{n} {fmt}" for fmt, n in sorted(result.counts().items()))
    return (
        f"| {budget:g} | {result.effective_bits:.2f} | {chosen} | {result.predicted_snr_db:.2f} "
        f"| {result.measured_snr_db:.2f} | {result.weight_bytes / MB:.2f} | {model_file_size(path) / MB:.2f} |"
    )


def _uniform_bits(candidates: Candidates, fmt: str) -> float:
    """Effective bits of the uniform model: each layer in ``fmt`` where it took it, else in the rest."""
    total = 0.0
    for layer in candidates.layers:
        option = next((o for o in layer.options if o.fmt == fmt), None)
        total += layer.params * (option.bits if option is not None else candidates.float_bits)
    return total / candidates.params if candidates.params else math.nan


if __name__ == "__main__":
    main()
