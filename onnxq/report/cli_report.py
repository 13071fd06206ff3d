"""``onnxq report FP32.onnx QUANT.onnx --data DATA.npz [-o report.html]``: the CLI glue.

Prints two ranked tables (layers worst first, then the tensors whose own quantizer adds the most
noise) and, with ``-o``, writes the HTML report atomically. Bad input (unreadable models, models that
do not correspond, data that does not fit, an ``-o`` that is a model or in a missing folder) is an
:class:`~onnxq.errors.OnnxqError` raised before any output is written: ``onnxq.cli.main`` prints it as
one line and exits non-zero, and no file is left behind.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxq.choices import DEFAULT_CALIB_MEMORY_MB
from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    from rich.console import Console

    from onnxq.report.build import Report

#: tensors listed in the terminal (all of them are in the HTML)
TERMINAL_TENSORS = 20
#: same as ``onnxq.cli.PIPED_WIDTH``: names stay whole when piped
PIPED_WIDTH = 10_000
DEFAULT_EXACT_LAYERS = 5


def add_report_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Add ``report`` to the ``onnxq`` subcommands (``parents``: the common -v/--debug parser)."""
    parser = subparsers.add_parser(
        "report",
        help="per-tensor and per-layer accuracy of a quantized model against its FP32 original",
        parents=parents or [],
    )
    parser.add_argument("reference", help="original FP32 .onnx model")
    parser.add_argument("quantized", help="its quantized .onnx model")
    parser.add_argument("--data", required=True, help="inputs: .npz file or directory")
    parser.add_argument("-o", "--output", help="write a self-contained HTML report here")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument(
        "--memory", type=float, default=DEFAULT_CALIB_MEMORY_MB, metavar="MB",
        help=f"tensors compared per pass must fit this (default {DEFAULT_CALIB_MEMORY_MB})",
    )  # fmt: skip
    parser.add_argument(
        "--exact-layers", type=int, default=DEFAULT_EXACT_LAYERS, metavar="K",
        help=f"exact sensitivity runs for the K worst layers by estimate (default {DEFAULT_EXACT_LAYERS})",
    )  # fmt: skip
    parser.add_argument("--providers", help="comma-separated execution providers")


def run_report(args: argparse.Namespace) -> int:
    from onnxq.report.build import build_report
    from onnxq.report.html_report import write_html

    output = Path(args.output) if args.output else None
    if output is not None:
        _check_output(output, [args.reference, args.quantized, args.data])
    providers = [p for p in args.providers.split(",") if p.strip()] if args.providers else None
    report = build_report(
        args.reference, args.quantized, args.data, batch_size=args.batch_size, max_samples=args.max_samples,
        memory_mb=args.memory, exact_layers=args.exact_layers, providers=providers,
    )  # fmt: skip
    print_report(report, _console())
    if output is not None:
        write_html(report, output)
        _console().print(f"onnxq report -> {output}", markup=False)
    return 0


def _check_output(output: Path, inputs: list[str]) -> None:
    if output.suffix.lower() not in (".html", ".htm"):
        raise OnnxqError(f"-o {output} is not an .html file", "name the report e.g. report.html")
    if not output.parent.is_dir():
        raise OnnxqError(
            f"-o {output}: folder {output.parent} does not exist", "create it or pick another path"
        )
    if output.exists() and any(Path(i).exists() and output.samefile(i) for i in inputs):
        raise OnnxqError(f"-o {output} is one of the inputs", "write the report to a new .html file")


def _console() -> Console:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if math.isfinite(value) else str(value)


def print_report(report: Report, console: Console) -> None:
    from rich.table import Table

    title = f"onnxq report ({report.samples} samples, lowest output SNR {_db(report.output_snr_db)} dB)"
    layers = Table(title=f"{title}: layers, worst first")
    for column in (
        "#",
        "layer",
        "op",
        "quantized inputs",
        "estimate (dB)",
        "only it quantized",
        "only it float",
    ):
        layers.add_column(column)
    for rank, layer in enumerate(report.ranked_layers(), 1):
        layers.add_row(
            str(rank), layer.name, layer.op_type, ", ".join(layer.tensors), _db(layer.estimate_db),
            _db(layer.only_quantized_db), _db(layer.only_float_db),
        )  # fmt: skip
    console.print(layers)
    ranked = report.ranked_tensors()
    tensors = Table(
        title=f"tensors, most noise first ({min(len(ranked), TERMINAL_TENSORS)} of {len(ranked)})"
    )
    for column in ("tensor", "kind", "format", "SNR vs FP32", "own SNR", "clipped %", "clip range"):
        tensors.add_column(column)
    for tensor in ranked[:TERMINAL_TENSORS]:
        clip = tensor.clip_range
        tensors.add_row(
            tensor.name, tensor.point.kind, tensor.point.fmt, _db(tensor.metrics.snr_db),
            _db(tensor.metrics.local_snr_db), f"{100 * tensor.metrics.clipped_share:.4f}",
            f"[{clip[0]:.4g}, {clip[1]:.4g}]" if clip else "dynamic",
        )  # fmt: skip
    console.print(tensors)
    for note in report.notes:
        console.print(f"onnxq: note: {note}", markup=False, soft_wrap=True)
