"""AutoQuantize: per layer, the number format that minimizes the output error under an effective-bits budget.

:func:`auto_quantize` (and :func:`auto_sweep` for several budgets at once) runs four steps:

1. **uniform models**: the model is quantized once per requested format (``formats``: mode names from
   :mod:`onnxq.modes` such as int8, fp8, nvfp4, int4, w4a8, plus ``fp16``: the layer stays in the
   high-precision rest), on the calibration part of the data;
2. **per-layer estimates**: for every layer with a quantized weight (a GEMM or Conv the plan quantizes)
   and every format, the output SNR of the variant of that format's model in which only this layer is
   quantized (the report's graph edit, :func:`onnxq.report.build.variant`), measured against FP32.
   Each becomes a noise-to-signal ratio; the ratio of the "nothing quantized" variant (the rest's own
   FP16 noise) is subtracted, and the increments are added up (sum of per-layer output noise powers):
   predicted SNR = -10 log10(rest + sum of increments). With several outputs the lowest SNR is used;
3. **knapsack**: the bits of a layer in a format are counted from what that format's model stores for
   its weight (codes, scales, zero points and second-level scales, per parameter: NVFP4 4 + 8/16 + the
   global scale, INT4 block 128 4 + scale bits/128, INT8/FP8 8 + one scale per output channel);
   ``fp16`` costs the rest's bits (16, 32 for a float32 rest). The budget is the weight bits averaged
   over the parameters of these layers. A multiple-choice knapsack (:func:`solve_knapsack`, dynamic
   programming over a budget discretized in 1/1024 bit per parameter, costs rounded up so the budget
   holds exactly; ties go to the format listed first) picks one format per layer;
4. **mixed model and verification**: the model of the format holding most parameters is the base;
   every other layer is rewired to float (the report's edit) and, unless it stays in high precision,
   given the quantizer chain its format's model built for it (copied node by node, the float tensor it
   reads taken from the base by name, casts added where the rest's types differ). Layers without a
   weight (attention BMMs, residual Adds, pooling) cost no weight bits and stay in high precision.
   The mixed model is measured once on held-out data with :func:`onnxq.compare`.

Held-out data: ``eval_data``, else every 5th calibration sample (:func:`onnxq.report.fallback.split_holdout`).
Estimates are measured on the calibration part (at most ``ESTIMATE_SAMPLES`` samples).

Refused with one line, before any work: a budget that is not a positive number, an unknown or repeated
format, a format the target cannot run, ``--fp4-plugin`` (the plugin node replaces the GEMM), ``--smoothquant`` (it rescales the float graph per format, so
the formats' models would no longer share it), INT4 for the ORT target (MatMulNBits replaces the layer,
so it cannot be spliced). After the estimates: a budget below the smallest the layers allow (every
layer in its cheapest format), or no layer any format quantizes. INT4 uses the AWQ variants that leave
the float graph alone (rtn, awq-clip; awq-clip when another or none is asked for).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.api import QuantizeOptions, QuantizeResult, high_precision_for, quantize
from onnxq.calibration.calibrator import CalibrationSettings
from onnxq.calibration.data import open_calibration_data
from onnxq.choices import DEFAULT_AUTO_FORMATS
from onnxq.comparison import compare
from onnxq.errors import OnnxqError
from onnxq.graph.passes import clean_up, unique_name, values_by_name
from onnxq.graph.qdq import InsertionStats
from onnxq.model_io import check_output_path, load_model, save_model
from onnxq.modes import MODE_SPECS, mode_spec
from onnxq.report.build import output_snrs, variant
from onnxq.report.fallback import split_holdout
from onnxq.report.points import QuantPoint, find_points, match_points

#: the format name of "this layer stays in the high-precision rest"
FLOAT_FORMAT = "fp16"
DEFAULT_FORMATS = DEFAULT_AUTO_FORMATS
#: knapsack resolution: the budget is discretized in steps of 1/BITS_RESOLUTION bit per parameter
BITS_RESOLUTION = 1024
#: samples of the calibration part on which each "only this layer" variant is measured
ESTIMATE_SAMPLES = 16
#: variant sessions open at once (each holds a copy of the weights)
VARIANTS_PER_PASS = 4
#: stand-in for an infinite error inside the knapsack (a variant with non-finite outputs)
HUGE_ERROR = 1e30
#: INT4 weight algorithms that leave the float graph as it is (awq-lite/full fold scales into producers)
SPLICEABLE_INT4_ALGORITHMS = ("rtn", "awq-clip")
FLOAT32_BYTES = 4
FLOAT_BITS = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0}


@dataclass
class FormatOption:
    """One layer in one format: its stored bits per weight parameter and the measured noise it adds."""

    fmt: str
    bits: float
    #: output SNR with only this layer quantized (inf for the high-precision option)
    only_layer_db: float
    #: output noise-to-signal ratio this layer adds over the rest's own noise
    noise: float


@dataclass
class AutoLayer:
    name: str
    op_type: str
    params: int
    options: list[FormatOption]
    chosen: str = FLOAT_FORMAT

    def option(self, fmt: str) -> FormatOption:
        return next(o for o in self.options if o.fmt == fmt)


@dataclass
class Candidates:
    """Everything measured once and shared by every budget: uniform models and per-layer options."""

    fp32: ir.Model
    formats: list[str]
    #: format -> its uniformly quantized model
    uniform: dict[str, QuantizeResult]
    layers: list[AutoLayer]
    #: noise-to-signal ratio of the rest alone (no layer quantized)
    rest_noise: float
    float_bits: float
    calibration: Any
    holdout: Any
    holdout_description: str
    #: seconds spent on the uniform models and the estimates
    seconds: float = 0.0

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def smallest_bits(self) -> float:
        """The effective bits with every layer in its cheapest format."""
        return sum(layer.params * min(o.bits for o in layer.options) for layer in self.layers) / self.params


@dataclass
class AutoResult:
    result: QuantizeResult
    budget_bits: float
    effective_bits: float
    predicted_snr_db: float
    measured_snr_db: float
    layers: list[AutoLayer]
    holdout: str
    #: bytes of the chosen layers' weights as stored (codes and scales)
    weight_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Layers per chosen format."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.chosen] = counts.get(layer.chosen, 0) + 1
        return counts

    def describe(self) -> str:
        chosen = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.counts().items()))
        return (
            f"--auto {self.budget_bits:g} bits: {self.effective_bits:.2f} effective bits ({chosen}); "
            f"predicted {self.predicted_snr_db:.2f} dB, measured {self.measured_snr_db:.2f} dB on {self.holdout}"
        )


# --- entry points --------------------------------------------------------------------------------


def auto_quantize(
    model: Any,
    calibration_data: Any,
    *,
    effective_bits: float,
    formats: Sequence[str] = DEFAULT_FORMATS,
    options: QuantizeOptions | Mapping[str, Any] | None = None,
    eval_data: Any = None,
    output_path: str | os.PathLike[str] | None = None,
) -> AutoResult:
    """Quantize ``model`` with one format per layer, the least output error within ``effective_bits``."""
    check_budget(effective_bits)
    if output_path is not None:
        check_output_path(model, Path(output_path))
    candidates = measure_candidates(model, calibration_data, formats, options, eval_data)
    result = choose_and_verify(candidates, effective_bits)
    if output_path is not None:
        save_model(result.result.model, output_path)
        result.result.output_path = Path(output_path)
    return result


def auto_sweep(
    model: Any,
    calibration_data: Any,
    budgets: Sequence[float],
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    options: QuantizeOptions | Mapping[str, Any] | None = None,
    eval_data: Any = None,
) -> list[AutoResult]:
    """:func:`auto_quantize` for each budget, the formats' models and estimates measured once."""
    for budget in budgets:
        check_budget(budget)
    candidates = measure_candidates(model, calibration_data, formats, options, eval_data)
    return [choose_and_verify(candidates, budget) for budget in budgets]


def check_budget(effective_bits: Any) -> None:
    if (
        isinstance(effective_bits, bool)
        or not isinstance(effective_bits, (int, float))
        or not math.isfinite(effective_bits)
        or effective_bits <= 0
    ):
        raise OnnxqError(
            f"--auto {effective_bits!r} is not a positive number of bits per weight", "pass e.g. --auto 6"
        )


def parse_formats(text: str) -> list[str]:
    """``--auto-formats fp8,int8,nvfp4``: the names, checked (see :func:`check_formats`)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return names


def check_formats(formats: Sequence[str], settings: QuantizeOptions) -> list[str]:
    names = list(formats)
    known = [*MODE_SPECS, FLOAT_FORMAT]
    for name in names:
        if name not in known:
            raise OnnxqError(
                f"--auto-formats names {name!r}, which is not a format", f"use some of {', '.join(known)}"
            )
    if len(set(names)) != len(names) or not [n for n in names if n != FLOAT_FORMAT]:
        raise OnnxqError(
            f"--auto-formats {','.join(names)} must list distinct formats, at least one of them quantized",
            "pass e.g. --auto-formats fp8,int8,nvfp4,int4,fp16",
        )
    for name in names:
        if name == FLOAT_FORMAT:
            continue
        spec = mode_spec(name)
        if settings.target not in spec.targets:
            raise OnnxqError(
                f"--auto-formats {name} is a TensorRT format, and the target is {settings.target}",
                f"drop {name} from --auto-formats, or use --target tensorrt",
            )
        if settings.target == "ort" and spec.block_weight == "int4":
            raise OnnxqError(
                f"--auto-formats {name} with --target ort: MatMulNBits replaces the layer and cannot be mixed",
                f"drop {name} from --auto-formats, or use --target tensorrt",
            )
    return names


# --- step 1 and 2: uniform models and per-layer estimates ---------------------------------------


def measure_candidates(
    model: Any,
    calibration_data: Any,
    formats: Sequence[str],
    options: QuantizeOptions | Mapping[str, Any] | None,
    eval_data: Any = None,
) -> Candidates:
    started = time.perf_counter()
    settings = _settings(options)
    names = check_formats(formats, settings)
    if settings.smoothquant is not None:
        raise OnnxqError(
            "--auto with --smoothquant: SmoothQuant rescales the float graph differently per format",
            "drop --smoothquant",
        )
    if getattr(settings, "fp4_plugin", False):
        raise OnnxqError(
            "--auto with --fp4-plugin: the plugin node replaces the GEMM, so formats cannot be mixed per layer",
            "drop --fp4-plugin",
        )
    fp32 = load_model(model)
    ir.passes.common.NameFixPass()(fp32)  # the names quantize gives unnamed nodes
    if eval_data is None:
        calibration, holdout, description = split_holdout(fp32, calibration_data)
    else:
        calibration, holdout, description = calibration_data, eval_data, "the evaluation data given"
    float_bits = FLOAT_BITS[high_precision_for(settings)]
    uniform = {
        name: _quantize_uniform(fp32, calibration, settings, name) for name in names if name != FLOAT_FORMAT
    }
    estimate_feeds = open_calibration_data(calibration, _input_specs(fp32), None, ESTIMATE_SAMPLES)
    layers, rest_noise = _estimate_layers(
        fp32, uniform, estimate_feeds, settings, float_bits, FLOAT_FORMAT in names
    )
    if not layers:
        raise OnnxqError(
            f"no format of {','.join(names)} quantizes a weight of this model",
            "use onnxq quantize --mode int8",
        )
    return Candidates(
        fp32, names, uniform, layers, rest_noise, float_bits, calibration, holdout, description,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _settings(options: QuantizeOptions | Mapping[str, Any] | None) -> QuantizeOptions:
    if isinstance(options, QuantizeOptions):
        return dataclasses.replace(options)
    values = dict(options or {})
    values.pop("mode", None)
    return QuantizeOptions(**values)


def _input_specs(model: ir.Model) -> Any:
    from onnxq.api import input_specs

    return input_specs(model)


def _quantize_uniform(fp32: ir.Model, data: Any, settings: QuantizeOptions, name: str) -> QuantizeResult:
    options = dataclasses.asdict(settings)
    options.pop("mode")
    if mode_spec(name).block_weight == "int4":
        asked = options.get("algo")
        options["algo"] = asked if asked in SPLICEABLE_INT4_ALGORITHMS else "awq-clip"
    else:
        options.update(algo=None, zero_point=False)
    if mode_spec(name).block_weight != "int4":
        options["block_size"] = None
    return quantize(fp32, mode=name, calibration_data=data, **options)


def _estimate_layers(
    fp32: ir.Model,
    uniform: dict[str, QuantizeResult],
    feeds: Any,
    settings: QuantizeOptions,
    float_bits: float,
    float_allowed: bool,
) -> tuple[list[AutoLayer], float]:
    """Per layer and format: stored bits and the measured noise increment; and the rest's noise."""
    calibration_settings = CalibrationSettings(
        providers=settings.providers, memory_limit_mb=settings.calib_memory_mb
    )
    outputs = [v.name or "" for v in fp32.graph.outputs]
    layers: dict[str, AutoLayer] = {}
    rest_noise = math.inf
    ops = {node.name: node.op_type for node in fp32.graph}
    for fmt, result in uniform.items():
        points = find_points(result.model)
        match_points(points, fp32, result.model)
        weights = _weight_layers(points)
        jobs: list[tuple[str | None, Callable[[str], bool]]] = [(None, _everything)]
        jobs += [(name, _all_but(name)) for name in weights]
        base = 0.0
        for start in range(0, len(jobs), VARIANTS_PER_PASS):
            chunk = jobs[start : start + VARIANTS_PER_PASS]
            models = [variant(result.model, points, to_float) for _, to_float in chunk]
            snrs = output_snrs(fp32, models, outputs, feeds, calibration_settings)
            del models
            for (name, _), snr in zip(chunk, snrs):
                if name is None:
                    rest_noise = min(rest_noise, noise_ratio(snr))
                    base = noise_ratio(snr)
                    continue
                params, bits = weights[name]
                layer = layers.setdefault(name, AutoLayer(name, ops.get(name, "?"), params, []))
                layer.options.append(FormatOption(fmt, bits, snr, max(noise_ratio(snr) - base, 0.0)))
    for layer in layers.values():
        if float_allowed:
            layer.options.append(FormatOption(FLOAT_FORMAT, float_bits, math.inf, 0.0))
    ordered = [layers[node.name] for node in fp32.graph if node.name in layers]
    return ordered, (0.0 if math.isinf(rest_noise) else rest_noise)


def _everything(_reader: str) -> bool:
    return True


def _all_but(layer: str) -> Callable[[str], bool]:
    """Readers to float: all but ``layer`` (the "only this layer quantized" variant)."""
    return lambda reader: reader != layer


def noise_ratio(snr_db: float) -> float:
    """Noise-to-signal power ratio of an SNR in dB (0 for an exact output, inf for a broken one)."""
    if math.isnan(snr_db):
        return math.inf
    return 10 ** (-snr_db / 10)


def snr_of(ratio: float) -> float:
    return math.inf if ratio <= 0 else -10 * math.log10(ratio)


def _weight_layers(points: list[QuantPoint]) -> dict[str, tuple[int, float]]:
    """Layer -> (weight parameters, stored bits per parameter) for layers reading a quantized weight."""
    found: dict[str, tuple[int, float]] = {}
    for point in points:
        if point.kind != "weight" or point.weight is None:
            continue
        elements = int(np.prod(point.weight.shape))
        bits = stored_bits(point.weight.dequantizer) / max(elements, 1)
        for reader, _ in point.readers[:1]:  # a shared weight is stored once: counted for its first reader
            params, old_bits = found.get(reader, (0, 0.0))
            total = params + elements
            found[reader] = (total, (params * old_bits + elements * bits) / total)
    return found


def stored_bits(dequantizer: ir.Node) -> float:
    """Bits a constant DequantizeLinear chain stores: codes, scales, zero points (scales that are
    themselves dequantized, as NVFP4's FP8 block scales, counted through their own chain)."""
    total = 0.0
    for value in dequantizer.inputs:
        if value is None:
            continue
        if value.const_value is not None:
            total += value.const_value.size * value.const_value.dtype.bitwidth
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            total += stored_bits(producer)
    return total


# --- step 3: the knapsack ------------------------------------------------------------------------


def solve_knapsack(
    costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int
) -> list[int] | None:
    """One option per group minimizing the summed error with summed cost <= ``capacity`` (integers
    >= 0); None when even the cheapest options exceed it. Deterministic: among equal errors the lower
    option index wins."""
    if sum(min(group) for group in costs) > capacity:
        return None
    best = np.zeros(capacity + 1)  # best[c]: least error with total cost <= c
    picks: list[np.ndarray] = []
    for group_costs, group_errors in zip(costs, errors):
        candidates = np.full((len(group_costs), capacity + 1), np.inf)
        for index, (cost, error) in enumerate(zip(group_costs, group_errors)):
            if cost <= capacity:
                candidates[index, cost:] = best[: capacity + 1 - cost] + min(error, HUGE_ERROR)
        pick = np.argmin(candidates, axis=0)  # first minimum: the lower index on ties
        best = candidates[pick, np.arange(capacity + 1)]
        picks.append(pick)
    chosen: list[int] = []
    remaining = capacity
    for group_costs, pick in zip(reversed(costs), reversed(picks)):
        index = int(pick[remaining])
        chosen.append(index)
        remaining -= group_costs[index]
    return chosen[::-1]


def brute_force_knapsack(
    costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int
) -> tuple[float, list[int]] | None:
    """The least summed error by trying every combination (a reference for small instances)."""
    best: tuple[float, list[int]] | None = None
    for combination in itertools.product(*(range(len(group)) for group in costs)):
        if sum(costs[g][i] for g, i in enumerate(combination)) > capacity:
            continue
        error = sum(errors[g][i] for g, i in enumerate(combination))
        if best is None or error < best[0]:
            best = (error, list(combination))
    return best


def choose_formats(candidates: Candidates, effective_bits: float) -> dict[str, str]:
    """Layer -> format within ``effective_bits`` (the knapsack over discretized bits)."""
    check_budget(effective_bits)
    total = candidates.params
    smallest = candidates.smallest_bits()
    unit = total / BITS_RESOLUTION  # bit-parameters per knapsack unit
    costs = [
        [math.ceil(layer.params * o.bits / unit - 1e-9) for o in layer.options] for layer in candidates.layers
    ]
    errors = [[o.noise for o in layer.options] for layer in candidates.layers]
    capacity = math.floor(effective_bits * BITS_RESOLUTION + 1e-9)
    chosen = solve_knapsack(costs, errors, capacity) if effective_bits >= smallest else None
    if chosen is None:
        raise OnnxqError(
            f"--auto {effective_bits:g} bits is below the smallest these layers allow with "
            f"{','.join(candidates.formats)}: {math.ceil(smallest * 100) / 100:.2f} bits per weight",
            f"pass --auto {math.ceil(smallest * 100) / 100:.2f} or more, or add a smaller format to --auto-formats",
        )
    return {layer.name: layer.options[index].fmt for layer, index in zip(candidates.layers, chosen)}


def predicted_snr(candidates: Candidates, assignment: Mapping[str, str]) -> float:
    noise = candidates.rest_noise + sum(
        layer.option(assignment[layer.name]).noise for layer in candidates.layers
    )
    return snr_of(noise)


def effective_bits_of(candidates: Candidates, assignment: Mapping[str, str]) -> float:
    bits = sum(layer.params * layer.option(assignment[layer.name]).bits for layer in candidates.layers)
    return bits / candidates.params


# --- step 4: the mixed model ---------------------------------------------------------------------


def choose_and_verify(candidates: Candidates, effective_bits: float) -> AutoResult:
    started = time.perf_counter()
    assignment = choose_formats(candidates, effective_bits)
    mixed = build_mixed(candidates, assignment)
    measured = compare(candidates.fp32, mixed.model, candidates.holdout).min_snr_db
    layers = [dataclasses.replace(layer, chosen=assignment[layer.name]) for layer in candidates.layers]
    bits = effective_bits_of(candidates, assignment)
    mixed.seconds = {"measure formats": candidates.seconds, "choose+verify": time.perf_counter() - started}
    return AutoResult(
        mixed, effective_bits, bits, predicted_snr(candidates, assignment), measured, layers,
        candidates.holdout_description, weight_bytes=bits * candidates.params / 8,
    )  # fmt: skip


def build_mixed(candidates: Candidates, assignment: Mapping[str, str]) -> QuantizeResult:
    """The base format's model with every other layer rewired to float and, unless it stays in high
    precision, given the quantizer chain its format's model built for it."""
    weight_by_format: dict[str, int] = {}
    for layer in candidates.layers:
        fmt = assignment[layer.name]
        weight_by_format[fmt] = weight_by_format.get(fmt, 0) + layer.params
    quantized = [f for f in candidates.uniform if f in weight_by_format] or list(candidates.uniform)
    base = max(quantized, key=lambda f: (weight_by_format.get(f, 0), -candidates.formats.index(f)))
    base_result = candidates.uniform[base]
    points = find_points(base_result.model)
    match_points(points, candidates.fp32, base_result.model)
    mixed = variant(base_result.model, points, lambda n: assignment.get(n) != base, runnable=False)
    float_names = {
        v.name or "" for v in values_by_name(candidates.fp32.graph).values() if v.const_value is None
    }
    for fmt, result in candidates.uniform.items():
        layers = {name for name, chosen in assignment.items() if chosen == fmt}
        if fmt != base and layers:
            _Transplant(mixed, result.model, float_names).layers(layers)
            _merge_opsets(mixed, result.model)
    clean_up(mixed)
    plan = _mixed_plan(candidates, assignment, base)
    result = QuantizeResult(mixed, plan, _merged_ranges(candidates, assignment, base))
    result.insertion = _insertion_stats(candidates, assignment, mixed)
    return result


def _insertion_stats(
    candidates: Candidates, assignment: Mapping[str, str], mixed: ir.Model
) -> InsertionStats:
    """What the summary shows: quantized tensors of the mixed model, and its chosen layers' weight bytes
    (before: float32; after: as stored)."""
    points = find_points(mixed)
    quantized = [x for x in candidates.layers if assignment[x.name] != FLOAT_FORMAT]
    return InsertionStats(
        weights=sum(1 for p in points if p.kind == "weight"),
        activations=sum(1 for p in points if p.kind == "activation"),
        weight_bytes_before=sum(x.params * FLOAT32_BYTES for x in quantized),
        weight_bytes_after=round(sum(x.params * x.option(assignment[x.name]).bits / 8 for x in quantized)),
    )


def _merge_opsets(target: ir.Model, source: ir.Model) -> None:
    for domain, version in source.opset_imports.items():
        target.opset_imports[domain] = max(target.opset_imports.get(domain, 0), version)
    target.ir_version = max(target.ir_version or 0, source.ir_version or 0)


class _Transplant:
    """Copies the quantizer chains ``source`` built for some layers into ``target``."""

    def __init__(self, target: ir.Model, source: ir.Model, float_names: set[str]) -> None:
        self.graph = target.graph
        self.source = source
        self.values = values_by_name(target.graph)
        self.float_names = float_names
        self.copied: dict[int, ir.Value] = {}

    def layers(self, names: set[str]) -> None:
        target_nodes = {node.name: node for node in self.graph}
        for point in find_points(self.source):
            for reader, index in point.readers:
                if reader not in names or reader not in target_nodes:
                    continue
                node = target_nodes[reader]
                source_node = next(n for n in self.source.graph if n.name == reader)
                value = source_node.inputs[index]
                assert value is not None
                copy = self.value(value, node)
                current = node.inputs[index]
                node.replace_input_with(index, self._cast(copy, current.dtype if current else None, node))

    def value(self, value: ir.Value, before: ir.Node) -> ir.Value:
        """``value`` of the source rebuilt in the target: float tensors by name, the rest copied."""
        key = id(value)
        if key not in self.copied:
            self.copied[key] = self._rebuild(value, before)
        return self.copied[key]

    def _rebuild(self, value: ir.Value, before: ir.Node) -> ir.Value:
        name = value.name or ""
        if name in self.values and (name in self.float_names or value.is_graph_input()):
            return self._cast(self.values[name], value.dtype, before)
        producer = value.producer()
        if producer is None:
            if value.const_value is None:
                raise ValueError(f"{name}: neither a constant nor a tensor of the float graph")
            copy = ir.Value(
                name=unique_name(self.graph, f"{name}_auto"), shape=value.shape, type=value.type,
                const_value=value.const_value,
            )  # fmt: skip
            self.graph.register_initializer(copy)
            return copy
        inputs = [None if v is None else self.value(v, before) for v in producer.inputs]
        node = ir.Node(
            producer.domain, producer.op_type, inputs,
            attributes=[ir.Attr(a.name, a.type, a.value) for a in producer.attributes.values()],
            num_outputs=len(producer.outputs), name=unique_name(self.graph, f"{producer.name}_auto"),
        )  # fmt: skip
        for out, original in zip(node.outputs, producer.outputs):
            out.name = unique_name(self.graph, f"{original.name}_auto")
            out.type, out.shape = original.type, original.shape
        self.graph.insert_before(before, node)
        self.values = values_by_name(self.graph)
        return node.outputs[producer.outputs.index(value)]

    def _cast(self, value: ir.Value, dtype: ir.DataType | None, before: ir.Node) -> ir.Value:
        if dtype is None or value.dtype is None or value.dtype == dtype:
            return value
        cast = ir.node("Cast", [value], attributes={"to": dtype}, name=unique_name(self.graph, "auto_cast"))
        cast.outputs[0].name = unique_name(self.graph, f"{value.name}_as_{dtype.name.lower()}")
        cast.outputs[0].dtype, cast.outputs[0].shape = dtype, value.shape
        self.graph.insert_before(before, cast)
        return cast.outputs[0]


def _mixed_plan(candidates: Candidates, assignment: Mapping[str, str], base: str) -> Any:
    """The base model's plan with each layer's decision saying which format AutoQuantize chose."""
    plan = dataclasses.replace(candidates.uniform[base].plan)
    plan.decisions = [dataclasses.replace(d) for d in plan.decisions]
    layers = {layer.name: layer for layer in candidates.layers}
    plan.blocks = [
        choice
        for fmt, result in candidates.uniform.items()
        for choice in result.plan.blocks
        if assignment.get(choice.node) == fmt
    ]
    quantized_somewhere = {
        d.node for result in candidates.uniform.values() for d in result.plan.decisions if d.quantized
    }
    for decision in plan.decisions:
        layer = layers.get(decision.node)
        if layer is None:
            if decision.node in quantized_somewhere:
                decision.skip(
                    "AutoQuantize keeps layers without weights in high precision", "auto: no weight"
                )
            continue
        option = layer.option(assignment[layer.name])
        text = f"AutoQuantize: {option.fmt} ({option.bits:.3g} bits/weight, only this layer {option.only_layer_db:.2f} dB)"
        if option.fmt == FLOAT_FORMAT:
            decision.skip(text, "auto: high precision")
        else:
            decision.quantized, decision.reason, decision.category = True, text, ""
    plan.notes = [*plan.notes, f"AutoQuantize base model: {base}"]
    return plan


def _merged_ranges(candidates: Candidates, assignment: Mapping[str, str], base: str) -> dict[str, Any]:
    ranges: dict[str, Any] = {}
    for fmt in [f for f in candidates.uniform if f != base] + [base]:
        if fmt == base or fmt in assignment.values():
            ranges.update(candidates.uniform[fmt].ranges)
    return ranges


# --- CLI glue ------------------------------------------------------------------------------------


def run_cli(args: Any, options: dict[str, Any], output: Any) -> AutoResult:
    """``onnxq quantize --auto``: the chosen model written to ``output``; the caller prints the summary."""
    if args.calib is None:
        raise OnnxqError(
            "--auto measures each layer's formats on data, and no --calib was given", "add --calib"
        )
    if getattr(args, "min_snr", None) is not None:
        raise OnnxqError("--auto and --min-snr both choose the layers' precision", "pass one of them")
    return auto_quantize(
        args.model, args.calib, effective_bits=args.auto, formats=parse_formats(args.auto_formats),
        options=options, eval_data=args.eval_data, output_path=output,
    )  # fmt: skip
