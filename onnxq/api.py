"""The Python API: ``quantize`` a model and ``compare`` it with its original.

``quantize`` runs: load (a copy) -> clean-up passes -> placement plan -> calibration through ONNX
Runtime -> Q/DQ insertion -> atomic save. Every step is a module of its own; this file only wires them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx.defs
import onnx_ir as ir

from onnxq import option_checks
from onnxq.algorithms.apply_smoothquant import SmoothQuantSummary
from onnxq.algorithms.smoothquant import Alpha, check_smoothquant_options
from onnxq.calibration.auto_method import (
    AUTO_CANDIDATES,
    AUTO_METHOD,
    AUTO_MIN_SAMPLES,
    AUTO_SAMPLES,
    CandidateSetup,
    choose_method,
)
from onnxq.calibration.cache import check_cached_ranges, load_cache, model_hash, save_cache
from onnxq.calibration.calibrator import (
    DEFAULT_MEMORY_LIMIT_MB,
    CalibrationSettings,
    TensorRange,
    calibrate,
    calibrate_candidates,
    check_memory_limit,
)
from onnxq.calibration.data import CalibrationData, InputSpec, open_calibration_data
from onnxq.calibration.method_guard import first_samples, guard_ranges
from onnxq.calibration.methods import get_method, normalize_method_name
from onnxq.calibration.overrides import known_ranges, load_overrides, value_names, warn_unmatched_overrides
from onnxq.calibration.statistics import TensorStats
from onnxq.choices import DEFAULT_ALGORITHM, DEFAULT_CALIB_METHOD, DEFAULT_INT4_BLOCK_SIZE
from onnxq.errors import OnnxqError
from onnxq.formats import get_format
from onnxq.formats.base import NumberFormat, QuantParams
from onnxq.graph import passes, prequantized
from onnxq.graph.block_emit import DEFAULT_ACCURACY_LEVEL, BlockEmission, emit_blocks
from onnxq.graph.float_conversion import (
    DEFAULT_KEEP_FP32_OPS,
    HIGH_PRECISIONS,
    ConversionReport,
    convert_float_precision,
)
from onnxq.graph.qdq import LOW_PRECISION_FLOATS, InsertionStats, insert_qdq, required_opset
from onnxq.model_io import (
    DEFAULT_IR_VERSION,
    check_output_path,
    external_tensors,
    load_model,
    referenced_files,
    save_model,
)
from onnxq.modes import ModeSpec, check_mode_options, mode_spec
from onnxq.ort_grid import AUTO_CPU, check_ort_cpu_option, record_choice, resolve_ort_weight_grid
from onnxq.placement.block_plan import BlockOptions, apply_mode, refresh_reasons
from onnxq.placement.plan import Plan
from onnxq.placement.planner import PlacementOptions, plan_placement
from onnxq.placement.rules import load_rule_set
from onnxq.plugins import ReplaceSummary

logger = logging.getLogger(__name__)

#: per-channel DequantizeLinear needs opset 13; FLOAT8 Q/DQ needs 19, and so do float16/bfloat16 tensors
#: (``qdq.required_opset``, applied in ``_prepare`` where the opset is upgraded before planning)
MIN_OUTPUT_OPSET = 13
MATMULNBITS_ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class QuantizeOptions:
    mode: str = "int8"
    target: str = "tensorrt"
    patterns: str | os.PathLike[str] | None = None
    calib_method: str = DEFAULT_CALIB_METHOD
    percentile: float | None = None
    op_types: Sequence[str] | None = None
    exclude_nodes: str | None = None
    quantize_bmm: bool = True
    providers: Sequence[str] | None = None
    ort_custom_ops: Sequence[str] = ()
    calib_batch_size: int | None = None
    calib_max_samples: int | None = None
    calib_memory_mb: float = DEFAULT_MEMORY_LIMIT_MB
    calib_cache: str | os.PathLike[str] | None = None
    calib_overrides: str | os.PathLike[str] | None = None
    ir_version: int = DEFAULT_IR_VERSION
    opset: int | None = None
    progress: bool = False
    #: keep the quantization a model already holds and quantize only what is still float
    keep_quantized: bool = False
    #: INT4 weight algorithm (rtn, awq-lite, awq-clip, awq-full); None: the default for the data given
    algo: str | None = None
    #: INT4 block size along K (NVFP4 and MXFP8 have fixed blocks of 16 and 32)
    block_size: int | None = None
    #: INT4 modes: UINT4 with a zero point per block instead of symmetric INT4
    zero_point: bool = False
    #: block modes: quantize the output projection (lm_head / classifier head) too
    quantize_lm_head: bool = False
    #: ORT target, INT4: MatMulNBits ``accuracy_level`` (4: int8 activations inside the kernel, fast; 0: float)
    int4_accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    #: the type of the non-quantized rest: "fp16" (TensorRT default), "bf16" or "fp32" (ORT default)
    high_precision: str | None = None
    #: op types kept float32 in an fp16/bf16 rest; None: ``DEFAULT_KEEP_FP32_OPS`` (ops known to overflow)
    keep_fp32_ops: list[str] | None = None
    #: node names kept float32 in an fp16/bf16 rest
    keep_fp32_nodes: list[str] = field(default_factory=list)
    #: with fp16/bf16: graph inputs and outputs take that type too (default: they keep theirs)
    low_precision_io: bool = False
    #: apply the recipe an ``onnxq export`` left in the model (its mode, the layers it keeps in high
    #: precision) where the caller gave no mode / exclude_nodes of their own
    use_recipe: bool = True
    #: --target ort: the deployment CPU ("avx2", "vnni", "arm") that picks the INT8 weight grid; None or
    #: "auto": both grids measured here, deployed against as written (onnxq.ort_grid)
    ort_cpu: str | None = None
    #: nvfp4-w4a16: replace FP4-weight GEMMs by the FP4 GEMM TensorRT plugin node (plugins/fp4_gemm)
    fp4_plugin: bool = False
    #: int8/fp8: SmoothQuant before calibration, alpha in [0, 1] or "auto" (searched per GEMM group); None: off
    smoothquant: float | str | None = None


@dataclass
class QuantizeResult:
    model: ir.Model
    plan: Plan
    #: tensor name -> observed statistics and chosen range
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    output_path: Path | None = None
    insertion: InsertionStats = field(default_factory=InsertionStats)
    seconds: dict[str, float] = field(default_factory=dict)
    blocks: BlockEmission = field(default_factory=BlockEmission)
    #: the INT4 weight algorithm that ran ("" for other modes)
    algorithm: str = ""
    #: what the FP16/BF16 conversion of the rest did (None: the rest stayed float32)
    conversion: ConversionReport | None = None
    #: what the FP4 GEMM plugin replacement did (None: not asked for)
    plugins: ReplaceSummary | None = None
    #: what SmoothQuant did per GEMM group (None: not asked for)
    smoothquant: SmoothQuantSummary | None = None
    #: how the activation ranges were chosen, one line ("" when nothing was calibrated)
    calibration_summary: str = ""

    @property
    def calibration(self) -> dict[str, TensorRange]:
        return self.ranges


def quantize(
    model: Any,
    *,
    mode: str | None = None,
    calibration_data: Any = None,
    output_path: str | os.PathLike[str] | None = None,
    **options: Any,
) -> QuantizeResult:
    """Quantize ``model`` (path, ModelProto, onnx_ir.Model or onnx_graphsurgeon.Graph).

    ``options`` are the fields of :class:`QuantizeOptions` (target, calib_method, op_types, ...).
    The input is never modified; with ``output_path`` the result is written there atomically.
    """
    mode, recipe_notes = _apply_recipe(model, mode, options)
    settings = _options(mode, options)
    spec = mode_spec(settings.mode)
    # option files are read (and refused) before any expensive step
    overrides = load_overrides(settings.calib_overrides) if settings.calib_overrides is not None else {}
    timer = _Timer()
    _check_output_path(model, output_path, calibration_data, settings)
    algorithm = _algorithm(spec, settings.algo, calibration_data is not None)
    working = load_model(model)
    smoothquant = _smoothquant_alpha(settings, working)
    # an input saved with external data gives an output saved so, whatever the conversions did to it
    external_input = any(True for _ in external_tensors(working))
    prequantized.refuse_unless_kept(working, prequantized.model_label(model), settings.keep_quantized)
    _prepare(working, settings, spec)
    for note in recipe_notes:  # after _prepare (an opset upgrade rebuilds the graph); --explain prints them
        passes.add_note(working, note)
        logger.info("%s", note)
    timer.lap("prepare")
    # a rule's [rules.modes.fp8] table governs every FP8 layer, block modes' FP8 convolutions included
    rules = load_rule_set(settings.target, settings.patterns).for_mode(spec.base)
    plan = plan_placement(working, rules, _placement(settings))
    prequantized.keep_existing(working, plan)
    apply_mode(working, plan, spec, _block_options(settings, algorithm))
    _check_block_plan(plan, spec)
    _check_target_float_types(working, plan, settings.target)
    timer.lap("plan")
    symmetric = rules.activation_symmetric or spec.base != "int8"
    activation_format, weight_format = formats_for(spec.base or "int8", symmetric)
    data = _open_data(working, plan, calibration_data, settings)
    if data is not None and plan.runs_awq():
        from onnxq.algorithms.apply_awq import run_awq

        run_awq(working, plan, data, _calibration_settings(settings))
        refresh_reasons(plan)
        timer.lap("awq")
    smoothing = None
    if data is not None and smoothquant is not None:
        from onnxq.algorithms.apply_smoothquant import run_smoothquant

        smoothing = run_smoothquant(
            working, plan, data, _calibration_settings(settings), smoothquant,
            activation_format=activation_format, weight_format=weight_format, symmetric=symmetric,
        )  # fmt: skip
        timer.lap("smoothquant")

    calibration_summary = {"text": "read from the calibration cache"}

    def calibrate_checked(tensors: list[str]) -> dict[str, TensorRange]:
        assert data is not None
        formats = (activation_format, weight_format)
        found, calibration_summary["text"] = _calibrate_checked(
            working, plan, tensors, data, formats, symmetric, settings
        )
        return found

    ranges = _calibrate(working, plan, data, settings, overrides, calibrate_checked)
    timer.lap("calibrate")
    rest_ranges = _rest_ranges(working, data, ranges, settings)
    params = activation_parameters(plan, ranges, activation_format, symmetric)
    grid_choice = None
    if settings.target == "ort" and spec.base == "int8":
        grid_choice = resolve_ort_weight_grid(
            settings.ort_cpu or AUTO_CPU, working, plan, data, params, (activation_format, weight_format),
            providers=settings.providers, custom_ops=settings.ort_custom_ops,
        )  # fmt: skip
        plan.notes.append(f"INT8 weight grid {grid_choice.grid}: {grid_choice.reason}")
    insertion = insert_qdq(working, plan.tensors(), params, activation_format, weight_format)
    blocks = emit_blocks(working, plan.blocks, settings.target, ranges, settings.int4_accuracy_level)
    refresh_reasons(plan)
    _finish(working, settings, activation_format, spec)
    if grid_choice is not None:
        record_choice(working, grid_choice)
    timer.lap("insert")
    conversion = _convert_rest(working, settings, ranges, rest_ranges)
    if conversion is not None:
        timer.lap("convert")
    plugins = None
    if settings.fp4_plugin:
        from onnxq.plugins import replace_fp4_gemms

        plugins = replace_fp4_gemms(working)  # after the FP16 conversion: X is already float16 there
        timer.lap("plugin")
    # inference sees further through the finished graph (shapes set since the first repair): a declared
    # output shape it now contradicts would fail the strict checker
    plan.notes.extend(passes.repair_declared_shapes(working))
    if output_path is not None:
        save_model(
            working, output_path, custom_ops=settings.ort_custom_ops, external_data=external_input or None
        )
        timer.lap("save")
    path = Path(output_path) if output_path is not None else None
    return QuantizeResult(
        working, plan, ranges, path, insertion, timer.laps, blocks,
        algorithm=algorithm if spec.block_weight == "int4" else "", conversion=conversion,
        smoothquant=smoothing, plugins=plugins,
        calibration_summary=calibration_summary["text"] if ranges else "",
    )  # fmt: skip


#: the rest's type when none is asked for: TensorRT's strongly typed builds run every non-quantized
#: layer in the model's own type, so a float32 rest would make the quantized engine slower than plain
#: FP16; ONNX Runtime's CPU integer kernels read float32 around them
DEFAULT_HIGH_PRECISION = {"tensorrt": "fp16", "ort": "fp32"}


def _apply_recipe(model: Any, mode: str | None, options: dict[str, Any]) -> tuple[str, list[str]]:
    """The mode and ``exclude_nodes`` (set in ``options``) that an exported model's recipe recommends,
    where the caller gave none (``onnxq.frontend.recipes``); the notes say what was applied. Read
    from the model's metadata only (external weights untouched), before the options are checked."""
    from onnxq.frontend.recipes import hints_for_source

    wanted = options.get("use_recipe", True) and (mode is None or options.get("exclude_nodes") is None)
    hints = hints_for_source(model) if wanted else None
    if hints is None:
        return mode or "int8", []
    mode, exclude, notes = hints.resolve(mode, options.get("exclude_nodes"))
    options["exclude_nodes"] = exclude
    return mode, notes


def high_precision_for(settings: QuantizeOptions) -> str:
    """The rest's type: as asked, else the target's default."""
    return settings.high_precision or DEFAULT_HIGH_PRECISION.get(settings.target, "fp32")


def _rest_ranges(
    model: ir.Model, data: CalibrationData | None, ranges: dict[str, TensorRange], settings: QuantizeOptions
) -> dict[str, float]:
    """``max |value|`` of the float32 tensors calibration did not observe, for an FP16 rest: a tensor
    that is not quantized (a depthwise conv output read only by a Transpose) may exceed float16's range
    as much as a quantized one. One more statistics pass over the data (scalars only); none without
    data or for other rests (bfloat16 has float32's range)."""
    if data is None or high_precision_for(settings) != "fp16":
        return {}
    tensors = [v.name for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT and v.name]
    tensors += [v.name for n in model.graph for v in n.outputs if v.dtype == ir.DataType.FLOAT and v.name]
    tensors = [t for t in dict.fromkeys(tensors) if t not in ranges]
    if not tensors:
        return {}
    found = calibrate(model, tensors, data, get_method("max"), get_format("int8"), _calibration_settings(settings))
    return {name: found[name].stats.amax for name in tensors if name in found and found[name].stats.has_data}


def _convert_rest(
    model: ir.Model, settings: QuantizeOptions, ranges: dict[str, TensorRange], rest_ranges: dict[str, float]
) -> ConversionReport | None:
    """The non-quantized part in FP16/BF16; tensors whose observed range exceeds FP16 keep float32."""
    precision = high_precision_for(settings)
    if precision == "fp32":
        return None
    amax = {**rest_ranges, **{t: r.stats.amax for t, r in ranges.items() if r.stats.has_data}}
    keep_ops = DEFAULT_KEEP_FP32_OPS if settings.keep_fp32_ops is None else settings.keep_fp32_ops
    return convert_float_precision(
        model, precision, tensor_ranges=amax, low_precision_io=settings.low_precision_io,
        keep_ops=keep_ops, keep_nodes=settings.keep_fp32_nodes,
    )  # fmt: skip


def _algorithm(spec: ModeSpec, asked: str | None, has_data: bool) -> str:
    """The INT4 weight algorithm: the one asked for, else AWQ with data and RTN without."""
    if spec.block_weight != "int4":
        return "rtn"
    if asked is not None and asked != "rtn" and not has_data:
        raise OnnxqError(
            f"--algo {asked} searches on activations, but no calibration data was given",
            "pass --calib DATA.npz, or use --algo rtn",
        )
    if asked is not None:
        return asked
    if not has_data:
        logger.warning("no calibration data: INT4 weights use rtn (AWQ needs --calib)")
        return "rtn"
    return DEFAULT_ALGORITHM


def _block_options(settings: QuantizeOptions, algorithm: str) -> BlockOptions:
    return BlockOptions(
        target=settings.target,
        block_size=settings.block_size or DEFAULT_INT4_BLOCK_SIZE,
        algorithm=algorithm,
        zero_point=settings.zero_point,
        quantize_lm_head=settings.quantize_lm_head,
    )


def _check_block_plan(plan: Plan, spec: ModeSpec) -> None:
    """A block mode that finds no GEMM weight to quantize would write the model unchanged: refused."""
    if spec.block_weight is None or plan.blocks:
        return
    gemms = [d for d in plan.decisions if d.op_type in ("MatMul", "Gemm")]
    if not gemms:
        raise OnnxqError(
            f"--mode {spec.name} quantizes MatMul/Gemm weights, and the model has no MatMul or Gemm",
            "use --mode int8 or fp8 for this model",
        )
    reasons = sorted({d.reason for d in gemms})
    raise OnnxqError(
        f"--mode {spec.name} found no MatMul/Gemm weight it can quantize among {len(gemms)} GEMMs "
        f"(e.g. {gemms[0].node}: {reasons[0]})",
        "see --explain for each GEMM; --quantize-lm-head quantizes an output projection; "
        "use --mode int8 or fp8 otherwise",
    )


def _smoothquant_alpha(settings: QuantizeOptions, model: ir.Model) -> Alpha | None:
    """SmoothQuant's alpha (refused in one line: outside [0, 1], a mode it does not serve, no GEMM),
    None when not asked for. Checked on the loaded model, before anything is written."""
    if settings.smoothquant is None:
        return None
    return check_smoothquant_options(settings.smoothquant, settings.mode, model)


def _options(mode: str, options: dict[str, Any]) -> QuantizeOptions:
    unknown = sorted(set(options) - set(QuantizeOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown quantize option(s): {', '.join(unknown)}")
    mode_spec(mode)  # refuses an unknown mode
    settings = QuantizeOptions(mode=mode, **options)
    _check_options(settings)
    return settings


def _check_calib_method(settings: QuantizeOptions) -> None:
    """An unknown method, or ``--percentile`` with a method that reads no percentile, is refused now."""
    name = normalize_method_name(settings.calib_method)
    if name == AUTO_METHOD:
        return
    get_method(settings.calib_method, **_method_options(settings))


def _check_options(settings: QuantizeOptions) -> None:
    """Every option is checked before the first expensive step (see ``onnxq.option_checks``)."""
    option_checks.check_exclude_regex(settings.exclude_nodes)
    check_ort_cpu_option(settings.ort_cpu, settings.target)
    option_checks.check_op_types(settings.op_types)
    check_memory_limit(settings.calib_memory_mb)
    option_checks.check_positive("--calib-batch-size", settings.calib_batch_size, integer=True)
    option_checks.check_positive("--calib-max-samples", settings.calib_max_samples, integer=True)
    option_checks.check_percentile(settings.percentile)
    _check_calib_method(settings)
    option_checks.check_existing_file("--patterns", settings.patterns)
    for library in settings.ort_custom_ops:
        option_checks.check_existing_file("--ort-custom-ops", library, "custom-op library")
    option_checks.check_parent_folder("--calib-cache", settings.calib_cache)
    if settings.smoothquant is not None:  # alpha and mode now; the model once loaded
        check_smoothquant_options(settings.smoothquant, settings.mode, None)
    _check_high_precision(settings)
    _check_fp4_plugin(settings)
    if settings.int4_accuracy_level not in MATMULNBITS_ACCURACY_LEVELS:
        raise OnnxqError(
            f"--int4-accuracy-level {settings.int4_accuracy_level!r} is not one of MatMulNBits' levels",
            "pass 0 (float activations), 1, 2, 3 or 4 (int8 activations)",
        )
    check_mode_options(
        mode_spec(settings.mode), settings.target, settings.algo, settings.block_size, settings.zero_point,
        settings.opset,
    )  # fmt: skip


def _check_fp4_plugin(settings: QuantizeOptions) -> None:
    if settings.fp4_plugin and settings.mode != "nvfp4-w4a16":
        raise OnnxqError(
            f"--fp4-plugin replaces NVFP4-weight GEMMs, and --mode {settings.mode} writes none",
            "use --mode nvfp4-w4a16 or drop --fp4-plugin",
        )


def _check_high_precision(settings: QuantizeOptions) -> None:
    if settings.high_precision is not None and settings.high_precision not in HIGH_PRECISIONS:
        raise OnnxqError(
            f"--high-precision {settings.high_precision!r} is not a float type onnxq converts to",
            f"use one of {', '.join(HIGH_PRECISIONS)}",
        )
    if settings.target == "ort" and high_precision_for(settings) != "fp32":
        raise OnnxqError(
            f"--high-precision {settings.high_precision} with --target ort: ONNX Runtime's CPU integer kernels "
            "take float32 scales only",
            "drop --high-precision for the ORT target (its rest stays float32), or use --target tensorrt",
        )
    if settings.low_precision_io and high_precision_for(settings) == "fp32":
        raise OnnxqError("--low-precision-io needs an fp16 or bf16 rest", "add --high-precision fp16")
    if (settings.keep_fp32_ops is not None or settings.keep_fp32_nodes) and high_precision_for(settings) == "fp32":
        raise OnnxqError(
            "--keep-fp32-ops/--keep-fp32-nodes choose float32 islands of an fp16 or bf16 rest, and the rest is fp32",
            "add --high-precision fp16 or drop them",
        )
    unknown_ops = [op for op in settings.keep_fp32_ops or [] if not onnx.defs.has(op)]
    if unknown_ops:
        raise OnnxqError(
            f"--keep-fp32-ops names {unknown_ops[0]!r}, which is not an ONNX operator",
            "pass ONNX op types such as Softmax,LayerNormalization (case matters)",
        )


def _check_output_path(
    model: Any, output_path: str | os.PathLike[str] | None, calibration_data: Any, settings: QuantizeOptions
) -> None:
    """Before any work: the output must be writable and must not be the input or a file it uses;
    neither the output nor the calibration cache (both written) may be a file the run reads."""
    if output_path is not None:
        check_output_path(model, Path(output_path))
    written = {"-o": output_path, "--calib-cache": settings.calib_cache}
    read = {
        "the calibration data": calibration_data,
        "--calib-overrides": settings.calib_overrides,
        "--patterns": settings.patterns,
    }
    written_paths = {
        option: Path(path) for option, path in written.items() if path is not None and _is_path(path)
    }
    if settings.calib_cache is not None and Path(settings.calib_cache).exists():
        for protected in referenced_files(model):
            option_checks.check_not_same_file(
                "--calib-cache", Path(settings.calib_cache), protected, "the input model's"
            )
    for option, path in written_paths.items():
        for what, source in read.items():
            if _is_path(source):
                option_checks.check_not_same_file(option, path, Path(source), what)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _prepare(model: ir.Model, settings: QuantizeOptions, spec: ModeSpec) -> None:
    """Clean-up passes before planning: names, constants, BatchNorm, opset, shapes."""
    passes.inline_functions(model)  # ORT inlines them too; inlined, their nodes can be quantized
    ir.passes.common.NameFixPass()(model)
    # An initializer listed as a graph input is an overridable default (PyTorch's
    # keep_initializers_as_inputs); deployment runtimes treat it as a constant weight, and so do we.
    ir.passes.common.RemoveInitializersFromInputsPass()(model)
    lifted = passes.lift_constant_nodes(model)
    passes.inline_constant_ifs(model)  # after lifting: a Constant condition is then a known value
    folded = passes.fold_batch_norm(model)
    # float16/bfloat16 tensors take Q/DQ only from opset 19
    target_opset = max(settings.opset or 0, MIN_OUTPUT_OPSET, spec.min_opset, required_opset(model))
    upgraded = passes.upgrade_opset(model, target_opset)
    # INT4 needs IR 10, FLOAT4E2M1/FLOAT8E8M0 IR 11 (the final IR version is set in _finish)
    model.ir_version = max(model.ir_version or 0, spec.min_ir_version)
    passes.clean_up(model)
    repaired = passes.repair_declared_shapes(model)  # notes for the plan, see passes.notes
    passes.infer_shapes(model)
    logger.info(
        "prepared: %d constants lifted, %d BatchNorm folded, opset upgraded: %s, %d shapes replaced",
        *(lifted, folded, upgraded, len(repaired)),
    )


def _check_target_float_types(model: ir.Model, plan: Plan, target: str) -> None:
    """The ORT target exists for ONNX Runtime's fused CPU integer kernels, which take float32 scales
    only: with float16/bfloat16 activations ORT 1.32 even fuses into QLinearConcat with float16 scales
    and then rejects its own graph. Refused up front rather than written slow or broken."""
    if target != "ort":
        return
    values = passes.values_by_name(model.graph)
    low = sorted(
        t for t in plan.activation_tensors() if t in values and values[t].dtype in LOW_PRECISION_FLOATS
    )
    if low:
        dtype = values[low[0]].dtype
        raise OnnxqError(
            f"--target ort quantizes {len(low)} {dtype.name.lower() if dtype else ''} tensors (e.g. {low[0]!r}), "
            "but ONNX Runtime's CPU integer kernels take float32 scales only",
            "convert the model to float32 for the ORT CPU target, or use --target tensorrt",
        )


def _placement(settings: QuantizeOptions) -> PlacementOptions:
    op_types = tuple(settings.op_types) if settings.op_types else None
    return PlacementOptions(
        op_types=op_types, exclude_nodes=settings.exclude_nodes, quantize_bmm=settings.quantize_bmm
    )


def formats_for(base: str, symmetric: bool) -> tuple[NumberFormat, NumberFormat]:
    """(activation format, weight format) of the base Q/DQ: asymmetric INT8 activations (ONNX Runtime) are uint8."""
    if base != "int8":
        return get_format(base), get_format(base)
    return get_format("int8" if symmetric else "uint8"), get_format("int8")


def _open_data(model: ir.Model, plan: Plan, source: Any, settings: QuantizeOptions) -> CalibrationData | None:
    """The calibration data, opened once for AWQ, calibration and the FP16 rest's ranges; None when
    nothing needs it.

    Activations to calibrate without data: refused (a cache is checked against the data's fingerprint,
    so it needs the data too). Data given for an FP16 rest is opened even when nothing is calibrated:
    it tells which float tensors exceed float16's range."""
    tensors = plan.activation_tensors() + plan.dynamic_activation_tensors()
    rest_needs_it = source is not None and high_precision_for(settings) == "fp16"
    if not tensors and not plan.runs_awq() and not rest_needs_it:
        return None
    if source is None:
        raise OnnxqError(
            f"{len(tensors)} activation tensors need calibration data",
            "pass --calib DATA.npz (keys = input names, first axis = samples)",
        )
    return open_calibration_data(
        source, input_specs(model), settings.calib_batch_size, settings.calib_max_samples
    )


def _calibrate(
    model: ir.Model,
    plan: Plan,
    data: CalibrationData | None,
    settings: QuantizeOptions,
    overrides: dict[str, tuple[float, float]],
    calibrate_checked: Callable[[list[str]], dict[str, TensorRange]],
) -> dict[str, TensorRange]:
    tensors = list(dict.fromkeys(plan.activation_tensors() + plan.dynamic_activation_tensors()))
    if not tensors or data is None:
        return {}
    ranges = _cached_or_calibrated(model, tensors, data, settings, calibrate_checked)
    if settings.calib_cache is not None:
        cached = {t: (r.chosen_low, r.chosen_high) for t, r in ranges.items() if r.source == "cache"}
        check_cached_ranges(settings.calib_cache, cached)
    _drop_nonfinite(plan, ranges)
    _apply_known_ranges(model, ranges, overrides)
    return ranges


def _calibrate_checked(
    model: ir.Model,
    plan: Plan,
    tensors: list[str],
    data: CalibrationData,
    formats: tuple[NumberFormat, NumberFormat],
    symmetric: bool,
    settings: QuantizeOptions,
) -> tuple[dict[str, TensorRange], str]:
    """The ranges of the method asked for, measured before they are used, and a summary line.

    ``auto`` computes every candidate method's ranges from one pair of passes and keeps the one whose
    quantized model measures best (``calibration.auto_method``); any other method is checked by the
    guard (far below ``max`` falls back to it). Activations quantized per block at run time (NVFP4's
    global scale) keep ``max`` under ``auto``: the measured copies carry per-tensor Q/DQ only, so
    nothing would measure a clip of theirs.
    """
    activation_format = formats[0]
    options = _method_options(settings)
    calibration_settings = _calibration_settings(settings)
    if normalize_method_name(settings.calib_method) != AUTO_METHOD:
        method = get_method(settings.calib_method, **options)
        found = calibrate(model, tensors, data, method, activation_format, calibration_settings)
        kept = _guarded(model, plan, found, data, formats, symmetric, settings)
        replaced = kept is not found
        return kept, f"{method.name}" + (" (far below max: max used)" if replaced else "")
    static = set(plan.activation_tensors()) & set(tensors)
    samples = first_samples(data, AUTO_SAMPLES) if static else []
    count = sum(data.samples_in(feed) for feed in samples)
    # too few samples to tell the methods apart: max alone, without the histogram pass
    names = AUTO_CANDIDATES if static and count >= AUTO_MIN_SAMPLES else ("max",)
    methods = [get_method(name, **(options if name == "percentile" else {})) for name in names]
    candidates = calibrate_candidates(model, tensors, data, methods, activation_format, calibration_settings)
    for ranges in candidates.values():
        ranges.update({t: candidates["max"][t] for t in tensors if t not in static})
    if not static:
        return candidates["max"], "auto: max (per-block activations only)"
    quiet = replace(calibration_settings, progress=False)  # the folds' small calibrations
    setup = CandidateSetup(tensors, static, methods, formats, symmetric, quiet)
    choice = choose_method(model, plan, candidates, samples, count, data.specs, setup)
    logger.info("%s", choice.note())
    plan.notes.append(choice.note())
    return choice.ranges, choice.summary()


def _method_options(settings: QuantizeOptions) -> dict[str, Any]:
    return {"percentile": settings.percentile} if settings.percentile is not None else {}


def _guarded(
    model: ir.Model,
    plan: Plan,
    ranges: dict[str, TensorRange],
    data: CalibrationData,
    formats: tuple[NumberFormat, NumberFormat],
    symmetric: bool,
    settings: QuantizeOptions,
) -> dict[str, TensorRange]:
    """A clipping method far below ``max`` on a few samples falls back to ``max``, with a warning."""
    decision = guard_ranges(
        model, plan, ranges, first_samples(data), formats, symmetric, settings.calib_method,
        settings.providers, settings.ort_custom_ops,
    )  # fmt: skip
    if decision.warning is not None:
        logger.warning(decision.warning)
        plan.notes.append(decision.warning)
    return decision.ranges


def _calibration_settings(settings: QuantizeOptions) -> CalibrationSettings:
    return CalibrationSettings(
        settings.providers, settings.ort_custom_ops, settings.calib_memory_mb, settings.progress
    )


def _cached_or_calibrated(
    model: ir.Model,
    tensors: list[str],
    data: CalibrationData,
    settings: QuantizeOptions,
    calibrate_checked: Callable[[list[str]], dict[str, TensorRange]],
) -> dict[str, TensorRange]:
    """Ranges read from the cache, or calibrated and checked (``auto``'s choice, or the guard's) before
    they are cached: a cache holds the decision, not a step before it."""
    method_options = _method_options(settings)
    # hashing reads every weight: only done when a cache is asked for
    identity = (
        _cache_identity(model, data, settings, method_options) if settings.calib_cache is not None else {}
    )
    if settings.calib_cache is not None and Path(settings.calib_cache).exists():
        cached = load_cache(settings.calib_cache, **identity)
        missing = [t for t in tensors if t not in cached]
        if not missing:
            logger.info("calibration ranges read from %s", settings.calib_cache)
            return {t: _range_from_cache(*cached[t]) for t in tensors}
        logger.warning("calibration cache lacks %d tensors; calibrating again", len(missing))
    # uint8 is priced on its own asymmetric grid (methods.asymmetric_histogram_mse)
    ranges = calibrate_checked(tensors)
    if settings.calib_cache is not None:
        chosen = {t: (r.chosen_low, r.chosen_high) for t, r in ranges.items() if not r.nonfinite}
        save_cache(settings.calib_cache, chosen, **identity, observed=_observed(ranges))
    return ranges


def _cache_identity(
    model: ir.Model, data: CalibrationData, settings: QuantizeOptions, options: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model_hash": model_hash(model),
        "data_fingerprint": data.fingerprint(),
        "method": settings.calib_method,
        "options": {**options, "target": settings.target, "mode": settings.mode},
    }


def _observed(ranges: dict[str, TensorRange]) -> dict[str, dict[str, Any]]:
    return {
        t: {"observed_low": r.stats.low, "observed_high": r.stats.high, "nonfinite": r.nonfinite}
        for t, r in ranges.items()
        if r.stats.has_data
    }


def _range_from_cache(low: float, high: float) -> TensorRange:
    return TensorRange(TensorStats(low=low, high=high, count=1), low, high, "cache")


def _drop_nonfinite(plan: Plan, ranges: dict[str, TensorRange]) -> None:
    """A tensor seen holding NaN/inf during calibration stays float, and so do the nodes needing it."""
    for tensor, found in ranges.items():
        if found.nonfinite:
            reason = f"input {tensor} held {found.nonfinite} non-finite values during calibration"
            plan.nonfinite[tensor] = f"{found.nonfinite} NaN/inf values seen during calibration"
            plan.drop_tensor(tensor, reason, "can carry inf")


def _apply_known_ranges(
    model: ir.Model, ranges: dict[str, TensorRange], overrides: dict[str, tuple[float, float]]
) -> None:
    """Known bounds (Softmax in [0, 1], Relu >= 0) and the user's overrides win over statistics."""
    for tensor, (low, high) in known_ranges(model).items():
        if tensor in ranges:
            found = ranges[tensor]
            found.chosen_low = found.chosen_low if low is None else max(found.chosen_low, low)
            found.chosen_high = found.chosen_high if high is None else min(found.chosen_high, high)
    warn_unmatched_overrides(overrides, value_names(model), ranges)
    for tensor, (low, high) in overrides.items():
        if tensor in ranges:
            ranges[tensor].chosen_low, ranges[tensor].chosen_high = low, high
            ranges[tensor].source = "override"


def activation_parameters(
    plan: Plan, ranges: dict[str, TensorRange], fmt: NumberFormat, symmetric: bool
) -> dict[str, QuantParams]:
    """Scale/zero point per activation; a shared-scale group uses the union of its members' ranges."""
    grouped: dict[str, tuple[float, float]] = {}
    for tensor, group in plan.groups.items():
        if tensor in ranges:
            low, high = grouped.get(group, (0.0, 0.0))
            grouped[group] = (min(low, ranges[tensor].chosen_low), max(high, ranges[tensor].chosen_high))
    params = {}
    for tensor in plan.activation_tensors():
        if tensor not in ranges:
            continue
        low, high = grouped.get(
            plan.groups.get(tensor, ""), (ranges[tensor].chosen_low, ranges[tensor].chosen_high)
        )
        params[tensor] = fmt.activation_params(low, high, symmetric)
    return params


def input_specs(model: ir.Model) -> list[InputSpec]:
    """What calibration data must provide: graph inputs that are not initializers.

    A dimension is static only as an int >= 1; ``-1`` (paddle2onnx's dynamic dimension) and 0 are
    dynamic (None), symbolic names stay names.
    """
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        shape = tuple(
            (d if d >= 1 else None) if isinstance(d, int) else (str(d) if d is not None else None)
            for d in (value.shape or [])
        )
        dtype = value.dtype.numpy() if value.dtype is not None else None
        specs.append(InputSpec(value.name or "", dtype, shape))  # type: ignore[arg-type]
    return specs


def _finish(model: ir.Model, settings: QuantizeOptions, fmt: NumberFormat, spec: ModeSpec) -> None:
    # INT4 needs IR 10 and FLOAT4E2M1/FLOAT8E8M0 IR 11: the mode's need wins over a lower --ir-version
    model.ir_version = max(settings.ir_version, spec.min_ir_version)
    minimum = max(fmt.min_opset, MIN_OUTPUT_OPSET, spec.min_opset)
    model.opset_imports[""] = max(model.opset_imports.get("", 0), minimum)
    model.producer_name = "onnxq"
    passes.clean_up(model)


class _Timer:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
