"""Command line: ``onnxq quantize`` and ``onnxq compare``.

Errors are one line on stderr and exit code 2 (1 for a failed ``--min-snr`` check); a summary table
closes every successful run. No path ends in a Python traceback: an error onnxq does not expect is
reported in one line too, and ``--debug`` shows its traceback. The heavy modules (numpy, onnx, ONNX
Runtime) are imported by the command that needs them, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxq import __version__
from onnxq.choices import (
    ALGORITHMS,
    CALIB_METHODS,
    DEFAULT_ALGORITHM,
    DEFAULT_CALIB_MEMORY_MB,
    DEFAULT_CALIB_METHOD,
    DEFAULT_INT4_BLOCK_SIZE,
    DEFAULT_SMOOTHQUANT_ALPHA,
    MODES,
    TARGETS,
)
from onnxq.errors import OnnxqError
from onnxq.report.cli_report import run_report

if TYPE_CHECKING:
    from rich.console import Console

    from onnxq.api import QuantizeResult
    from onnxq.comparison import CompareResult

EXIT_ERROR = 2
EXIT_CHECK_FAILED = 1
#: Rich wraps tables to 80 columns when stdout is not a terminal; names must stay whole to be pasted
PIPED_WIDTH = 10_000


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before the command is not reset by the subcommand's default
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-vv for debug)"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    parser = argparse.ArgumentParser(
        prog="onnxq", description="Quantize ONNX models with explicit Q/DQ.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_quantize(
        commands.add_parser(
            "quantize", help="quantize a model (INT8, FP8, INT4, NVFP4, MXFP8 and mixes)", parents=[common]
        )
    )
    _add_compare(
        commands.add_parser("compare", help="compare a quantized model with its original", parents=[common])
    )
    _add_build(
        commands.add_parser(
            "build", help="build a TensorRT engine and check it honoured every Q/DQ", parents=[common]
        )
    )
    _add_convert(
        commands.add_parser(
            "convert",
            help="convert a model's float32 tensors to fp16 or bf16 (the unquantized baseline)",
            parents=[common],
        )
    )
    from onnxq.report.cli_report import add_report_parser

    add_report_parser(commands, parents=[common])
    from onnxq.frontend.cli_export import add_export_parser

    add_export_parser(commands, parents=[common])
    _add_emulate(
        commands.add_parser(
            "emulate",
            help="rewrite an NVFP4/MXFP8 model into standard ops that ONNX Runtime CPU runs",
            parents=[common],
        )
    )
    return parser


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="input .onnx model (never modified)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="default: the recipe's mode for a model from onnxq export, else int8. Number formats: int8, fp8; int4 (weight-only, per block); nvfp4 (FP4 weights and activations); "
        "nvfp4-w4a16 (FP4 weights only); w4a8 (FP4 weights, FP8 activations); int4-w4a8 (INT4 weights, "
        "FP8 activations); mxfp8 (FP8 per 32 values with power-of-two scales)",
    )
    parser.add_argument(
        "--algo",
        choices=ALGORITHMS,
        help=f"INT4 weight algorithm (default {DEFAULT_ALGORITHM} with --calib, rtn without)",
    )
    parser.add_argument(
        "--block-size", type=int, help=f"INT4 block size along K (default {DEFAULT_INT4_BLOCK_SIZE})"
    )
    parser.add_argument(
        "--zero-point", action="store_true", help="INT4 modes: UINT4 with a zero point per block"
    )
    parser.add_argument(
        "--high-precision",
        choices=("fp16", "bf16", "fp32"),
        help="type of the non-quantized rest (default fp16 for --target tensorrt, fp32 for ort)",
    )
    parser.add_argument(
        "--low-precision-io",
        action="store_true",
        help="with an fp16/bf16 rest: graph inputs and outputs take that type too",
    )
    _add_keep_fp32(parser)
    parser.add_argument(
        "--ort-cpu",
        help="--target ort: the deployment CPU, auto|avx2|vnni|arm (default auto: both INT8 weight grids "
        "measured here, deployed against as written; the choice is recorded in the model's metadata)",
    )
    parser.add_argument(
        "--fp4-plugin",
        action="store_true",
        help="nvfp4-w4a16: write each FP4-weight GEMM as the FP4 GEMM TensorRT plugin node (plugins/fp4_gemm; "
        "build the engine with --plugins libfp4_gemm_plugin.so)",
    )
    parser.add_argument(
        "--int4-accuracy-level",
        type=int,
        default=4,
        choices=(0, 1, 2, 3, 4),
        help="--target ort INT4: MatMulNBits accuracy level (4: int8 activations, fast; 0: float, exact)",
    )
    parser.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="block modes: quantize the output projection (lm_head, classifier head) too",
    )
    parser.add_argument(
        "--smoothquant",
        nargs="?",
        const=str(DEFAULT_SMOOTHQUANT_ALPHA),
        metavar="ALPHA|auto",
        help="int8/fp8: SmoothQuant per GEMM input channel before calibration; alpha in [0, 1] "
        f"(default {DEFAULT_SMOOTHQUANT_ALPHA}) or auto (searched per layer on --calib)",
    )
    parser.add_argument("--calib", help=".npz file (keys = input names, first axis = samples) or a directory")
    parser.add_argument(
        "--target", choices=TARGETS, default="tensorrt", help="deployment runtime (placement rules)"
    )
    parser.add_argument("--patterns", help="a TOML placement rule set replacing the target's")
    parser.add_argument("--calib-method", default=DEFAULT_CALIB_METHOD, choices=CALIB_METHODS)
    parser.add_argument(
        "--percentile", type=float, help="for --calib-method percentile and auto (default 99.99)"
    )
    parser.add_argument("--calib-batch-size", type=int, help="samples per ONNX Runtime run")
    parser.add_argument("--calib-max-samples", type=int, help="use at most this many samples")
    parser.add_argument(
        "--calib-memory",
        type=float,
        default=DEFAULT_CALIB_MEMORY_MB,
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
    parser.add_argument(
        "--keep-quantized",
        action="store_true",
        help="for a model already quantized: keep its Q/DQ and quantized ops, quantize only what is still float",
    )
    parser.add_argument(
        "--no-recipe",
        action="store_true",
        help="ignore the recipe onnxq export left in the model (its mode, the layers it keeps in high precision)",
    )
    parser.add_argument("--explain", action="store_true", help="print every decision and calibrated range")
    parser.add_argument("--explain-json", metavar="FILE", help="write the whole plan and every range as JSON")
    parser.add_argument(
        "--min-snr",
        type=float,
        metavar="DB",
        help="output SNR target on held-out data: the most sensitive layers go back to float, one measured "
        "step at a time, until it is met (every 5th calibration sample is held out unless --eval-data)",
    )
    parser.add_argument(
        "--eval-data", metavar="DATA", help="with --min-snr or --auto: the held-out inputs (.npz or folder)"
    )
    from onnxq.report.cli_auto import add_cli_arguments as add_auto_arguments

    add_auto_arguments(parser)


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


def _add_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .onnx model to build (quantized or not)")
    parser.add_argument("-o", "--output", help="engine path (default: <input stem>.engine beside it)")
    parser.add_argument(
        "--shapes",
        action="append",
        default=[],
        metavar="NAME:MIN,OPT,MAX",
        help="optimization profile of a dynamic input, e.g. x:1x3x224x224,8x3x224x224,32x3x224x224",
    )
    parser.add_argument("--timing-cache", help="timing cache file (read when present, written after)")
    parser.add_argument("--opt-level", type=int, help="builder optimization level 0-5 (TensorRT's default 3)")
    parser.add_argument("--workspace", type=int, metavar="MIB", help="workspace memory limit in MiB")
    parser.add_argument(
        "--hardware-compat", action="store_true", help="an engine that runs on every GPU from Ampere on"
    )
    parser.add_argument(
        "--version-compat", action="store_true", help="an engine that later TensorRT versions can run"
    )
    parser.add_argument("--plugins", action="append", default=[], metavar="LIB", help="plugin library")
    parser.add_argument(
        "--print-trtexec",
        action="store_true",
        help="print the equivalent trtexec command (to run on the target) and build nothing",
    )
    parser.add_argument(
        "--trtexec-style",
        choices=("posix", "windows"),
        help="quoting of --print-trtexec (default: this system's)",
    )
    parser.add_argument("--original", help="the unquantized model, for --fp16-baseline and --compare")
    parser.add_argument(
        "--fp16-baseline", action="store_true", help="also build --original converted to FP16"
    )
    parser.add_argument(
        "--bench", action="store_true", help="time the engine against the FP16 baseline, print the ratio"
    )
    parser.add_argument(
        "--compare",
        metavar="DATA",
        help="run the engine and --original (ONNX Runtime) on DATA: SNR per output",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the engine-inspector check")


def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="input .onnx model (never modified)")
    parser.add_argument("--to", required=True, choices=("fp16", "bf16"), help="the float type to convert to")
    parser.add_argument("-o", "--output", help="output path (default: <input stem>.<to>.onnx beside it)")
    parser.add_argument(
        "--calib", help="sample inputs: tensors whose observed range exceeds fp16 keep float32 (optional)"
    )
    parser.add_argument(
        "--low-precision-io", action="store_true", help="graph inputs and outputs take the new type too"
    )
    _add_keep_fp32(parser)


def _add_keep_fp32(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-fp32-ops",
        metavar="OPS",
        help="op types an fp16/bf16 rest keeps in float32, replacing the default list of ops known to "
        "overflow (Exp, Pow, ReduceSum, ...: see --explain); 'none' keeps none",
    )
    parser.add_argument(
        "--keep-fp32-nodes",
        metavar="NAMES",
        help="comma-separated node names an fp16/bf16 rest keeps in float32",
    )


def _keep_fp32_ops(args: argparse.Namespace) -> list[str] | None:
    if args.keep_fp32_ops is None:
        return None
    return [] if args.keep_fp32_ops.strip().lower() == "none" else _split(args.keep_fp32_ops)


def _add_emulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="quantized .onnx model with FP4/MXFP8 parts (never modified)")
    parser.add_argument("-o", "--output", help="output path (default: <input stem>.emulated.onnx beside it)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    _configure_logging(getattr(args, "verbose", 0), debug)
    try:
        commands = {
            "quantize": _run_quantize,
            "compare": _run_compare,
            "emulate": _run_emulate,
            "build": _run_build,
            "convert": _run_convert,
            "export": _run_export,
            "report": run_report,
        }
        return commands[args.command](args)
    except OnnxqError as error:
        _report(f"onnxq: error: {error}", debug)
    except KeyboardInterrupt:
        _report("onnxq: interrupted; no output written", debug)
    except MemoryError:
        _report("onnxq: error: out of memory. Fix: lower --calib-memory or --calib-batch-size.", debug)
    except Exception as error:  # the promise: one line, never a traceback, unless --debug asks for it
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        _report(
            f"onnxq: internal error: {type(error).__name__}: {first_line}. "
            "Fix: rerun with --debug for the traceback and report it.",
            debug,
        )
    return EXIT_ERROR


def _configure_logging(verbose: int, debug: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # progress lines are what a CI log shows of a long run, so they show at the default verbosity
    logging.getLogger("onnxq.progress").setLevel(min(level, logging.INFO))


def _report(line: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    # a tensor name may hold a line break; the error stays one line
    one_line = line.replace("\r", "\\r").replace("\n", "\\n")
    _console(stderr=True).print(one_line, markup=False, highlight=False, soft_wrap=True)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPED_WIDTH)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def default_output(model: str, mode: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.{mode}.onnx")


def _run_quantize(args: argparse.Namespace) -> int:
    from onnxq.api import quantize

    output = Path(args.output) if args.output else default_output(args.model, _default_mode(args))
    if args.explain_json:
        _check_writable_file(Path(args.explain_json), "--explain-json")
    started = time.perf_counter()
    options: dict[str, Any] = dict(
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
        use_recipe=not args.no_recipe,
        quantize_bmm=not args.no_quantize_bmm,
        keep_quantized=args.keep_quantized,
        algo=args.algo,
        block_size=args.block_size,
        zero_point=args.zero_point,
        quantize_lm_head=args.quantize_lm_head,
        int4_accuracy_level=args.int4_accuracy_level,
        high_precision=args.high_precision,
        low_precision_io=args.low_precision_io,
        keep_fp32_ops=_keep_fp32_ops(args),
        keep_fp32_nodes=_split(args.keep_fp32_nodes) or [],
        smoothquant=args.smoothquant,
        fp4_plugin=args.fp4_plugin,
        ort_cpu=args.ort_cpu,
        progress=sys.stderr.isatty(),
    )
    if args.auto is not None:
        result = _quantize_auto(args, options, output)
    elif args.min_snr is None:
        result = quantize(
            args.model, mode=args.mode, calibration_data=args.calib, output_path=output, **options
        )
    else:
        result = _quantize_to_target(args, options, output)
    if args.explain:
        print_plan(result)
        print_ranges(result)
    if args.explain_json:
        write_explain_json(result, Path(args.explain_json))
    print_summary(result, Path(args.model), output, time.perf_counter() - started)
    if result.plugins is not None:
        _console().print(result.plugins.describe(), markup=False)
    return 0


def _quantize_auto(args: argparse.Namespace, options: dict[str, Any], output: Path) -> QuantizeResult:
    """``--auto BITS``: per layer the format with the least output error within the budget, verified once."""
    from onnxq.report.autoquant import run_cli

    auto = run_cli(args, options, output)
    _console().print(auto.describe(), markup=False)
    return auto.result


def _quantize_to_target(args: argparse.Namespace, options: dict[str, Any], output: Path) -> QuantizeResult:
    """``--min-snr``: quantize, measure on held-out data, return the most sensitive layers to float."""
    from onnxq.report.fallback import meet_snr_target

    if args.calib is None:
        raise OnnxqError(
            "--min-snr measures the quantized model on data, and no --calib was given", "add --calib"
        )
    fallback = meet_snr_target(
        args.model,
        args.calib,
        {"mode": args.mode, **options},
        args.min_snr,
        args.eval_data,
        output_path=output,
    )
    _console().print(
        f"--min-snr {args.min_snr:g} dB: {fallback.snr_db:.2f} dB on {fallback.holdout}, "
        f"{len(fallback.excluded)} layer(s) returned to float in {len(fallback.steps)} measured step(s)",
        markup=False,
    )
    return fallback.result


def _default_mode(args: argparse.Namespace) -> str:
    """The mode that names the default output: as given, else the model's recipe, else int8."""
    if args.mode is not None:
        return str(args.mode)
    from onnxq.frontend.recipes import hints_from_file

    hints = None if args.no_recipe else hints_from_file(args.model)
    return hints.mode if hints is not None else "int8"


def _run_export(args: argparse.Namespace) -> int:
    from onnxq.frontend.cli_export import run_export

    return run_export(args)


def _check_writable_file(path: Path, option: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OnnxqError(f"{option} {path} is a directory", "pass a file path")
    if not folder.is_dir():
        raise OnnxqError(f"the folder of {option} {path} does not exist", "create it first")


def print_plan(result: QuantizeResult) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"placement plan ({result.plan.target})")
    for column in ("node", "op", "decision", "reason"):
        table.add_column(column, overflow="fold")
    for decision in result.plan.decisions:
        verdict = "[green]quantize[/]" if decision.quantized else "[yellow]skip[/]"
        table.add_row(decision.node, decision.op_type, verdict, decision.reason)
    console.print(table)
    if result.plan.nonfinite:
        console.print(f"tensors that can carry +/-inf (never quantized): {len(result.plan.nonfinite)}")
        for tensor, why in sorted(result.plan.nonfinite.items()):
            console.print(f"  {tensor}: {why}", markup=False)
    for note in getattr(result.plan, "notes", []):
        console.print(f"note: {note}", markup=False)
    if result.smoothquant is not None:
        for line in result.smoothquant.lines():
            console.print(line, markup=False)
    if result.conversion is not None:
        for node, why in sorted(result.conversion.kept_fp32.items()):
            console.print(f"kept float32: {node}: {why}", markup=False)


def print_ranges(result: QuantizeResult) -> None:
    from rich.table import Table

    table = Table(title="calibrated tensors")
    for column in ("tensor", "observed", "chosen", "non-finite", "source"):
        table.add_column(column, overflow="fold")
    for tensor, found in result.ranges.items():
        observed = f"[{found.stats.low:.4g}, {found.stats.high:.4g}]" if found.stats.has_data else "-"
        chosen = f"[{found.chosen_low:.4g}, {found.chosen_high:.4g}]"
        table.add_row(tensor, observed, chosen, str(found.nonfinite), found.source)
    _console().print(table)


def explain_document(result: QuantizeResult) -> dict[str, Any]:
    """The whole plan and every range, names uncut: what ``--explain-json`` writes."""
    plan = result.plan
    return {
        "onnxq_version": __version__,
        "target": plan.target,
        "decisions": [
            {
                "node": d.node,
                "op_type": d.op_type,
                "rule": d.rule,
                "quantized": d.quantized,
                "reason": d.reason,
                "category": d.category,
                "tensors": [
                    {"tensor": u.tensor, "role": u.role, "input_index": u.input_index, "axis": u.axis}
                    for u in d.uses
                ],
            }
            for d in plan.decisions
        ],
        "shared_scale_groups": dict(sorted(plan.groups.items())),
        "nonfinite": dict(sorted(plan.nonfinite.items())),
        "notes": list(getattr(plan, "notes", [])),
        "block_weights": [
            {
                "node": c.node,
                "weight": c.weight,
                "weight_format": c.weight_format,
                "block_size": c.block_size,
                "algorithm": c.algorithm,
                "activation": c.activation,
                "activation_format": c.activation_format,
                "details": list(c.details),
            }
            for c in plan.blocks
        ],
        "ranges": {
            tensor: {
                "observed": [found.stats.low, found.stats.high] if found.stats.has_data else None,
                "chosen": [found.chosen_low, found.chosen_high],
                "nonfinite": found.nonfinite,
                "source": found.source,
            }
            for tensor, found in result.ranges.items()
        },
    }


def write_explain_json(result: QuantizeResult, path: Path) -> None:
    """Atomic like every onnxq output: a temp file beside ``path``, then a rename."""
    text = json.dumps(explain_document(result), indent=1, allow_nan=True) + "\n"
    folder = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def print_summary(result: QuantizeResult, model: Path, output: Path, seconds: float) -> None:
    from rich.table import Table

    from onnxq.model_io import model_file_size

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
    blocks = result.blocks
    if blocks.weights:
        formats = sorted({c.weight_format for c in result.plan.blocks})
        algorithm = f" ({result.algorithm})" if result.algorithm else ""
        table.add_row(
            "block weights",
            f"{blocks.weights} {'/'.join(formats)}{algorithm}, {blocks.dynamic_activations} dynamic activations",
        )
    before = result.insertion.weight_bytes_before + blocks.weight_bytes_before
    after = result.insertion.weight_bytes_after + blocks.weight_bytes_after
    table.add_row("weights quantized", f"{_megabytes(before)} -> {_megabytes(after)}")
    if result.calibration_summary:
        table.add_row("calibration", result.calibration_summary)
    if result.conversion is not None:
        conversion = result.conversion
        table.add_row(
            "rest converted",
            f"{conversion.converted_nodes} nodes, {len(conversion.kept_fp32)} kept float32, "
            f"{_megabytes(conversion.weight_bytes_before)} -> {_megabytes(conversion.weight_bytes_after)}",
        )
    table.add_row(
        "file size", f"{_megabytes(model_file_size(model))} -> {_megabytes(model_file_size(output))}"
    )
    table.add_row(
        "time", f"{seconds:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()) + ")"
    )
    _console().print(table)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _run_compare(args: argparse.Namespace) -> int:
    from onnxq.comparison import compare

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
        _console(stderr=True).print(
            f"onnxq: check failed: SNR {result.min_snr_db:.2f} dB < --min-snr {args.min_snr} dB",
            markup=False,
        )
        return EXIT_CHECK_FAILED
    return 0


def _run_build(args: argparse.Namespace) -> int:
    from onnxq.deploy.build_command import BuildRequest, build_options, check_request, run_build

    model = Path(args.model)
    request = BuildRequest(
        model=model,
        engine=Path(args.output) if args.output else model.with_suffix(".engine"),
        shapes=args.shapes,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        optimization_level=args.opt_level,
        workspace_mib=args.workspace,
        hardware_compatible=args.hardware_compat,
        version_compatible=args.version_compat,
        plugins=[Path(p) for p in args.plugins],
        original=Path(args.original) if args.original else None,
        fp16_baseline=args.fp16_baseline,
        bench=args.bench,
        compare_data=Path(args.compare) if args.compare else None,
        check=not args.no_check,
    )
    if args.print_trtexec:
        from onnxq.deploy.trtexec import trtexec_line

        check_request(request)
        print(trtexec_line(request.model, request.engine, build_options(request), style=args.trtexec_style))
        return 0
    report = run_build(request)
    console = _console()
    result = report.build
    console.print(
        f"onnxq build -> {result.engine_path}: {result.engine_bytes / 1e6:.2f} MB, TensorRT "
        f"{result.tensorrt_version}, {'strongly' if result.strongly_typed else 'weakly'} typed, "
        f"{result.build_seconds:.1f} s",
        markup=False,
    )
    if report.check_text:
        console.print(report.check_text, markup=False)
    if report.timings is not None:
        quantized, baseline = report.timings
        ratio = f", {baseline / quantized:.2f}x the FP16 baseline ({baseline:.3f} ms)" if baseline else ""
        console.print(f"latency: {quantized:.3f} ms (median){ratio}", markup=False)
    for name, snr in report.snr_db.items():
        console.print(f"SNR {name}: {snr:.2f} dB against --original in ONNX Runtime", markup=False)
    return 0 if report.check_ok else EXIT_CHECK_FAILED


def _run_convert(args: argparse.Namespace) -> int:
    from onnxq.convert import convert_file
    from onnxq.graph.float_conversion import DEFAULT_KEEP_FP32_OPS

    source = Path(args.model)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.{args.to}.onnx")
    started = time.perf_counter()
    keep_ops = _keep_fp32_ops(args)
    report = convert_file(
        source, output, args.to, low_precision_io=args.low_precision_io, data=args.calib,
        keep_ops=DEFAULT_KEEP_FP32_OPS if keep_ops is None else keep_ops,
        keep_nodes=_split(args.keep_fp32_nodes) or [],
    )  # fmt: skip
    _console().print(
        f"onnxq convert -> {output}: {report.converted_nodes} nodes in {args.to}, {len(report.kept_fp32)} kept "
        f"float32, {report.casts_inserted} casts; weights {_megabytes(report.weight_bytes_before)} -> "
        f"{_megabytes(report.weight_bytes_after)} ({time.perf_counter() - started:.2f} s)",
        markup=False,
    )
    return 0


def _run_emulate(args: argparse.Namespace) -> int:
    from onnxq.emulate import emulate_file

    source = Path(args.model)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.emulated.onnx")
    started = time.perf_counter()
    stats = emulate_file(source, output)
    _console().print(
        f"onnxq emulate -> {output}: {stats.describe()} ({time.perf_counter() - started:.2f} s)", markup=False
    )
    return 0


def print_comparison(result: CompareResult) -> None:
    from rich.table import Table

    how = "ORT fused kernels" if result.ort_fusions else "Q/DQ as written"
    table = Table(title=f"onnxq compare ({result.samples} samples, {how})")
    for column in ("output", "SNR (dB)", "cosine", "max abs error"):
        table.add_column(column)
    for name, metrics in result.outputs.items():
        snr = "inf" if math.isinf(metrics.snr_db) and metrics.snr_db > 0 else f"{metrics.snr_db:.2f}"
        table.add_row(name, snr, f"{metrics.cosine:.6f}", f"{metrics.max_abs_error:.4g}")
    console = _console()
    console.print(table)
    for warning in result.warnings:
        _console(stderr=True).print(f"onnxq: warning: {warning}", markup=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
