"""Command line: ``onnxq quantize`` and ``onnxq compare``.

Errors are one line on stderr and exit code 2 (1 for a failed ``--min-snr`` check); a summary table
closes every successful run.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from onnxq.api import MODES, QuantizeResult, quantize
from onnxq.calibration.calibrator import DEFAULT_MEMORY_LIMIT_MB
from onnxq.calibration.methods import registered_methods
from onnxq.compare import CompareResult, compare
from onnxq.errors import OnnxqError
from onnxq.model_io import model_file_size
from onnxq.placement.rules import TARGETS

EXIT_ERROR = 2
EXIT_CHECK_FAILED = 1

console = Console()
error_console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxq", description="Quantize ONNX models with explicit Q/DQ.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_quantize(commands.add_parser("quantize", help="quantize a model to INT8 or FP8"))
    _add_compare(commands.add_parser("compare", help="compare a quantized model with its original"))
    return parser


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="input .onnx model (never modified)")
    parser.add_argument("--mode", choices=MODES, default="int8")
    parser.add_argument("--calib", help=".npz file (keys = input names, first axis = samples) or a directory")
    parser.add_argument(
        "--target", choices=TARGETS, default="tensorrt", help="deployment runtime (placement rules)"
    )
    parser.add_argument("--patterns", help="a TOML placement rule set replacing the target's")
    parser.add_argument("--calib-method", default="max", choices=registered_methods())
    parser.add_argument("--percentile", type=float, help="for --calib-method percentile (default 99.99)")
    parser.add_argument("--calib-batch-size", type=int, help="samples per ONNX Runtime run")
    parser.add_argument("--calib-max-samples", type=int, help="use at most this many samples")
    parser.add_argument(
        "--calib-memory",
        type=float,
        default=DEFAULT_MEMORY_LIMIT_MB,
        metavar="MB",
        help="memory for the tensors one calibration run hands back (default %(default)s)",
    )
    parser.add_argument("--calib-cache", help="JSON file of calibrated ranges: reused when it matches")
    parser.add_argument("--calib-overrides", help="JSON file {tensor: [low, high]} pinning ranges")
    parser.add_argument("--providers", help="comma-separated execution providers, e.g. cuda,cpu")
    parser.add_argument(
        "--ort-custom-ops", action="append", default=[], metavar="LIB", help="custom-op library"
    )
    parser.add_argument("-o", "--output", help="output path (default: <input stem>.<mode>.onnx beside it)")
    parser.add_argument(
        "--op-types", help="comma-separated op types to quantize (default: all the rules cover)"
    )
    parser.add_argument("--exclude-nodes", metavar="REGEX", help="leave nodes whose name matches in float")
    parser.add_argument("--no-quantize-bmm", action="store_true", help="leave attention BMMs in float")
    parser.add_argument("--explain", action="store_true", help="print every decision and calibrated range")


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="original .onnx model")
    parser.add_argument("quantized", help="quantized .onnx model")
    parser.add_argument("--data", required=True, help="inputs: .npz file or directory")
    parser.add_argument("--providers", help="comma-separated execution providers")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument(
        "--min-snr", type=float, metavar="DB", help="fail (exit 1) if an output's SNR is lower"
    )
    parser.add_argument(
        "--ort-fusions",
        action="store_true",
        help="run the quantized model with ONNX Runtime's fused CPU integer kernels (default: Q/DQ as written)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _run_quantize(args) if args.command == "quantize" else _run_compare(args)
    except OnnxqError as error:
        error_console.print(f"onnxq: error: {error}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        error_console.print("onnxq: interrupted; no output written", markup=False)
        return EXIT_ERROR


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def default_output(model: str, mode: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.{mode}.onnx")


def _run_quantize(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else default_output(args.model, args.mode)
    started = time.perf_counter()
    result = quantize(
        args.model,
        mode=args.mode,
        calibration_data=args.calib,
        output_path=output,
        target=args.target,
        patterns=args.patterns,
        calib_method=args.calib_method,
        percentile=args.percentile,
        calib_batch_size=args.calib_batch_size,
        calib_max_samples=args.calib_max_samples,
        calib_memory_mb=args.calib_memory,
        calib_cache=args.calib_cache,
        calib_overrides=args.calib_overrides,
        providers=_split(args.providers),
        ort_custom_ops=args.ort_custom_ops,
        op_types=_split(args.op_types),
        exclude_nodes=args.exclude_nodes,
        quantize_bmm=not args.no_quantize_bmm,
        progress=sys.stderr.isatty(),
    )
    if args.explain:
        print_plan(result)
        print_ranges(result)
    print_summary(result, Path(args.model), output, time.perf_counter() - started)
    return 0


def print_plan(result: QuantizeResult) -> None:
    table = Table(title=f"placement plan ({result.plan.target})")
    for column in ("node", "op", "decision", "reason"):
        table.add_column(column)
    for decision in result.plan.decisions:
        verdict = "[green]quantize[/]" if decision.quantized else "[yellow]skip[/]"
        table.add_row(decision.node, decision.op_type, verdict, decision.reason)
    console.print(table)
    if result.plan.nonfinite:
        console.print(f"tensors that can carry +/-inf (never quantized): {len(result.plan.nonfinite)}")
        for tensor, why in sorted(result.plan.nonfinite.items()):
            console.print(f"  {tensor}: {why}", markup=False)


def print_ranges(result: QuantizeResult) -> None:
    table = Table(title="calibrated tensors")
    for column in ("tensor", "observed", "chosen", "non-finite", "source"):
        table.add_column(column)
    for tensor, found in result.ranges.items():
        observed = f"[{found.stats.low:.4g}, {found.stats.high:.4g}]" if found.stats.has_data else "-"
        chosen = f"[{found.chosen_low:.4g}, {found.chosen_high:.4g}]"
        table.add_row(tensor, observed, chosen, str(found.nonfinite), found.source)
    console.print(table)


def print_summary(result: QuantizeResult, model: Path, output: Path, seconds: float) -> None:
    quantized, skipped = result.plan.counts()
    table = Table(title=f"onnxq quantize -> {output}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for op_type, count in sorted(quantized.items()):
        table.add_row(f"quantized {op_type}", str(count))
    for reason, count in sorted(skipped.items()):
        table.add_row(f"skipped: {reason}", str(count))
    table.add_row(
        "Q/DQ tensors", f"{result.insertion.activations} activations, {result.insertion.weights} weights"
    )
    insertion = result.insertion
    table.add_row(
        "weights quantized",
        f"{_megabytes(insertion.weight_bytes_before)} -> {_megabytes(insertion.weight_bytes_after)}",
    )
    table.add_row(
        "file size", f"{_megabytes(model_file_size(model))} -> {_megabytes(model_file_size(output))}"
    )
    table.add_row(
        "time", f"{seconds:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()) + ")"
    )
    console.print(table)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _run_compare(args: argparse.Namespace) -> int:
    result = compare(
        args.reference,
        args.quantized,
        args.data,
        providers=_split(args.providers),
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        ort_fusions=args.ort_fusions,
    )
    print_comparison(result)
    if args.min_snr is not None and result.min_snr_db < args.min_snr:
        error_console.print(
            f"onnxq: check failed: SNR {result.min_snr_db:.2f} dB < --min-snr {args.min_snr} dB"
        )
        return EXIT_CHECK_FAILED
    return 0


def print_comparison(result: CompareResult) -> None:
    how = "ORT fused kernels" if result.ort_fusions else "Q/DQ as written"
    table = Table(title=f"onnxq compare ({result.samples} samples, {how})")
    for column in ("output", "SNR (dB)", "cosine", "max abs error"):
        table.add_column(column)
    for name, metrics in result.outputs.items():
        snr = "inf" if math.isinf(metrics.snr_db) and metrics.snr_db > 0 else f"{metrics.snr_db:.2f}"
        table.add_row(name, snr, f"{metrics.cosine:.6f}", f"{metrics.max_abs_error:.4g}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
