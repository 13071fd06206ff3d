"""``build_report``: per quantized tensor and per layer, how much accuracy a quantized model lost where.

Steps (memory bounded as in calibration: tensors are compared as the data streams, never all held):

1. the quantized tensors are read back from the Q/DQ graph and matched with the FP32 model
   (:mod:`onnxq.report.points`); weights are compared at once, from their constants;
2. models with FP4/MXFP8 parts are emulated (:func:`onnxq.emulate.emulate`) so ONNX Runtime CPU runs them;
3. a statistics pass (the calibrator's pass 1, scalars only) gives each activation's observed range
   and size per sample; activations are then split into groups whose outputs fit ``memory_mb`` and
   each group streams the data through both models once (:class:`onnxq.report.metrics.TensorMetrics`);
   the first group also measures the model outputs;
4. sensitivity per layer (a node reading quantized inputs): the cheap estimate is the lowest local
   SNR among its inputs (the noise its own quantizers add); the ``exact_layers`` worst by that
   estimate get two exact runs each: output SNR with only that layer quantized and with only that
   layer left in float. Both variants are edits of the quantized graph (a reader is rewired from the
   dequantized value to the float one: the quantizer's input, or the FP32 weight), no re-quantization.

Refused with one line: models taking different inputs or giving different outputs, a quantized model
without recognizable quantizers, models sharing no quantized tensor besides their graph inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.api import input_specs
from onnxq.calibration.calibrator import (
    DEFAULT_MEMORY_LIMIT_MB,
    CalibrationSettings,
    Calibrator,
    check_memory_limit,
    group_by_size,
)
from onnxq.calibration.data import CalibrationData, open_calibration_data
from onnxq.comparison import OutputMetrics
from onnxq.emulate import emulate, needs_emulation
from onnxq.errors import OnnxqError
from onnxq.graph.passes import add_initializer, clean_up, unique_name, values_by_name
from onnxq.model_io import clone_model, load_model
from onnxq.report.metrics import TensorMetrics
from onnxq.report.points import QuantPoint, find_points, layers_of, match_points
from onnxq.runtime import make_session

#: layers (worst cheap estimates first) that get the two exact sensitivity runs
DEFAULT_EXACT_LAYERS = 5
#: variant sessions open at once during sensitivity runs (each holds a copy of the weights)
VARIANTS_PER_PASS = 4
#: per activation element and sample: FP32 tensor, quantizer input, dequantized value (float32 each)
OUTPUT_BYTES_PER_ELEMENT = 3 * 4
FIX_CORRESPOND = "give the FP32 model and the model onnxq quantized from it"


@dataclass
class TensorReport:
    point: QuantPoint
    metrics: TensorMetrics
    #: observed range of the quantizer's input (activations: over the data; weights: the FP32 weight)
    observed: tuple[float, float] = (math.nan, math.nan)

    @property
    def name(self) -> str:
        return self.point.name

    @property
    def clip_range(self) -> tuple[float, float] | None:
        """Activations: the Q's range; weights: the widest range among channels/blocks."""
        return self.point.clip_range


@dataclass
class LayerReport:
    name: str
    op_type: str
    order: int
    tensors: list[str]
    #: lowest local SNR among the layer's quantized inputs (dB)
    estimate_db: float
    only_quantized_db: float | None = None
    only_float_db: float | None = None
    note: str = ""


@dataclass
class Report:
    fp32_path: str
    quantized_path: str
    samples: int = 0
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    tensors: list[TensorReport] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def output_snr_db(self) -> float:
        """The lowest SNR among the model's outputs."""
        return min((m.snr_db for m in self.outputs.values()), default=math.nan)

    def ranked_layers(self) -> list[LayerReport]:
        """Worst first: exact "only this layer quantized" SNR where measured, then the estimate."""
        measured = [x for x in self.layers if x.only_quantized_db is not None]
        rest = [x for x in self.layers if x.only_quantized_db is None]
        measured.sort(key=lambda x: (x.only_quantized_db, x.order))
        rest.sort(key=lambda x: (x.estimate_db, x.order))
        return measured + rest

    def ranked_tensors(self) -> list[TensorReport]:
        """Worst first by the noise the tensor's own quantizer adds (local SNR)."""
        return sorted(self.tensors, key=lambda t: (t.metrics.local_snr_db, t.point.order))


def build_report(
    fp32_path: Any,
    quantized_path: Any,
    data: Any,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_LIMIT_MB,
    exact_layers: int = DEFAULT_EXACT_LAYERS,
    providers: Sequence[str] | None = None,
) -> Report:
    """Measure ``quantized_path`` against ``fp32_path`` on ``data`` (any calibration data source)."""
    check_memory_limit(memory_mb)
    if isinstance(exact_layers, bool) or not isinstance(exact_layers, int) or exact_layers < 0:
        raise OnnxqError(f"exact layers {exact_layers!r} is not a count", "pass an integer >= 0")
    fp32, quantized = load_model(fp32_path), load_model(quantized_path)
    ir.passes.common.NameFixPass()(fp32)  # the names ``onnxq quantize`` gives unnamed nodes
    _check_correspond(fp32, quantized)
    points = _matched_points(fp32, quantized)
    report = Report(str(fp32_path), str(quantized_path))
    report.notes = _notes(quantized, points)
    runnable = _runnable(quantized, report)
    feeds = open_calibration_data(data, input_specs(fp32), batch_size, max_samples)
    settings = CalibrationSettings(providers=providers, memory_limit_mb=memory_mb)
    report.tensors = _weight_reports(points) + _activation_reports(
        fp32, runnable, points, feeds, settings, report
    )
    report.tensors.sort(key=lambda t: t.point.order)
    report.layers = _layer_estimates(quantized, report.tensors)
    _exact_sensitivity(fp32, quantized, report, feeds, settings, exact_layers)
    return report


def _check_correspond(fp32: ir.Model, quantized: ir.Model) -> None:
    expected = {s.name: s.dtype for s in input_specs(fp32)}
    actual = {s.name: s.dtype for s in input_specs(quantized)}
    if expected != actual:
        raise OnnxqError(
            f"the models take different inputs: {sorted(expected)} vs {sorted(actual)}", FIX_CORRESPOND
        )
    outputs = [v.name for v in fp32.graph.outputs]
    quantized_outputs = [v.name for v in quantized.graph.outputs]
    if outputs != quantized_outputs:
        raise OnnxqError(f"the models' outputs differ: {outputs} vs {quantized_outputs}", FIX_CORRESPOND)


def _matched_points(fp32: ir.Model, quantized: ir.Model) -> list[QuantPoint]:
    points = find_points(quantized)
    if not points:
        raise OnnxqError(
            "the quantized model holds no QuantizeLinear/DequantizeLinear onnxq can read",
            "give a model written by onnxq quantize (Q/DQ form; MatMulNBits is not read)",
        )
    match_points(points, fp32, quantized)
    # the graph inputs are shared by any two models that take the same feeds: they prove nothing
    inputs = {v.name for v in fp32.graph.inputs}
    if not any(p.fp32_name and p.fp32_name not in inputs for p in points):
        unmatched = [p.name for p in points if not p.fp32_name]
        raise OnnxqError(
            f"the models share no quantized tensor besides their inputs ({len(unmatched)} of {len(points)} "
            f"unmatched, e.g. {unmatched[0] if unmatched else points[0].name!r})",
            FIX_CORRESPOND,
        )
    return points


def _notes(quantized: ir.Model, points: list[QuantPoint]) -> list[str]:
    notes = [f"{p.kind} {p.name!r} not compared: {p.match}" for p in points if not p.fp32_name]
    nbits = sum(1 for node in quantized.graph if node.op_type == "MatMulNBits")
    if nbits:
        notes.append(f"{nbits} MatMulNBits nodes (ORT INT4 weights) are not read by the report")
    return notes


def _runnable(quantized: ir.Model, report: Report) -> ir.Model:
    if not needs_emulation(quantized):
        return quantized
    runnable = clone_model(quantized)
    stats = emulate(runnable)
    report.notes.append(f"ran emulated with standard ops (onnxq emulate): {stats.describe()}")
    return runnable


# --- weights -------------------------------------------------------------------------------------


def _weight_reports(points: list[QuantPoint]) -> list[TensorReport]:
    """Weights compared from their constants, one at a time (nothing but the figures is kept)."""
    reports = []
    for point in points:
        arrays = point.weight
        fp32 = arrays.fp32() if arrays is not None else None
        if arrays is None or fp32 is None:
            continue
        weight = fp32.astype(np.float32)
        observed = (float(weight.min(initial=0.0)), float(weight.max(initial=0.0)))
        limits = arrays.limits()
        point.clip_range = limits[2] if limits is not None else None
        clip = point.clip_range or observed
        metrics = TensorMetrics()
        metrics.start_histogram(min(observed[0], clip[0]), max(observed[1], clip[1]))
        metrics.add(weight, weight, arrays.dequantized().astype(np.float32), limits[:2] if limits else None)
        reports.append(TensorReport(point, metrics, observed))
        del fp32, weight, limits
    return reports


# --- activations ---------------------------------------------------------------------------------


@dataclass
class _Streamed:
    """One activation: the names of its three tensors in the models that stream them."""

    report: TensorReport
    fp32_name: str
    source: str
    seen: str


def _activation_reports(
    fp32: ir.Model,
    runnable: ir.Model,
    points: list[QuantPoint],
    feeds: CalibrationData,
    settings: CalibrationSettings,
    report: Report,
) -> list[TensorReport]:
    runnable = clone_model(runnable)  # seen values get names below
    streamed = [
        _Streamed(TensorReport(p, TensorMetrics()), p.fp32_name, p.name, _seen_name(runnable, p))
        for p in points
        if p.kind == "activation" and p.fp32_name
    ]
    inputs = {v.name for v in runnable.graph.inputs}
    sources = list(dict.fromkeys(s.source for s in streamed if s.source not in inputs))
    stats, per_sample = (
        Calibrator(runnable, sources, feeds, settings).collect_stats() if sources else ({}, {})
    )
    for item in streamed:
        found = stats.get(item.source)
        low, high = (
            (float(found.low), float(found.high)) if found and found.has_data else (math.nan, math.nan)
        )
        if math.isnan(low):  # a graph input: its range shows in the first batch only, use the clip range
            low, high = item.report.point.clip_range or (math.nan, math.nan)
        item.report.observed = (low, high)
        clip = item.report.point.clip_range or (low, high)
        item.report.metrics.start_histogram(min(low, clip[0]), max(high, clip[1]))
        per_sample.setdefault(item.source, 0.0)
    groups = group_by_size(
        [s.source for s in streamed] or [""], per_sample, settings.memory_limit_mb, OUTPUT_BYTES_PER_ELEMENT
    )
    for index, group in enumerate(groups):
        members = [s for s in streamed if s.source in set(group)]
        sample_bytes = OUTPUT_BYTES_PER_ELEMENT * sum(per_sample.get(s.source, 0.0) for s in members)
        _stream_group(fp32, runnable, members, feeds, settings, report if index == 0 else None, sample_bytes)
    return [s.report for s in streamed]


def _seen_name(runnable: ir.Model, point: QuantPoint) -> str:
    """The value the first reader reads in the runnable model (named here when emulation left it unnamed)."""
    reader, index = point.readers[0]
    node = next(n for n in runnable.graph if n.name == reader)
    value = node.inputs[index]
    assert value is not None
    if not value.name:
        value.name = unique_name(runnable.graph, f"{point.name}_seen_by_report")
    return value.name


def _stream_group(
    fp32: ir.Model,
    runnable: ir.Model,
    members: list[_Streamed],
    feeds: CalibrationData,
    settings: CalibrationSettings,
    report: Report | None,
    sample_bytes: float,
) -> None:
    """One pass over the data for ``members`` (and the model outputs when ``report`` is given)."""
    outputs = [v.name or "" for v in fp32.graph.outputs] if report is not None else []
    fp32_names = list(dict.fromkeys([*outputs, *(s.fp32_name for s in members)]))
    quantized_names = list(dict.fromkeys([*outputs, *(n for s in members for n in (s.source, s.seen))]))
    reference = _Runner(fp32, fp32_names, settings)
    quantized = _Runner(runnable, quantized_names, settings)
    if report is not None:
        report.outputs = {name: OutputMetrics() for name in outputs}
    for feed in _split_feeds(feeds, settings, sample_bytes):
        expected = reference.run(feed)
        actual = quantized.run(feed)
        for item in members:
            item.report.metrics.add(
                expected[item.fp32_name],
                actual[item.source],
                actual[item.seen],
                item.report.point.clip_limits,
            )
        if report is not None:
            for name in outputs:
                report.outputs[name].add(expected[name], actual[name])
            report.samples += feeds.samples_in(feed)


def _split_feeds(feeds: CalibrationData, settings: CalibrationSettings, sample_bytes: float) -> Iterator[Any]:
    limit = settings.memory_limit_mb * 1024 * 1024
    rows = max(1, int(limit // sample_bytes)) if sample_bytes else 1 << 30
    for feed in feeds.batches():
        yield from feeds.split(feed, rows)


class _Runner:
    """A session whose outputs are ``names``; graph inputs among them are answered from the feed."""

    def __init__(self, model: ir.Model, names: list[str], settings: CalibrationSettings) -> None:
        inputs = {v.name for v in model.graph.inputs}
        self.names = names
        self.computed = [n for n in names if n not in inputs]
        self.session = make_session(
            _with_outputs(model, self.computed), settings.providers, fused_kernels=False
        )

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = dict(zip(self.computed, self.session.run(self.computed, feed))) if self.computed else {}
        return {name: np.asarray(results[name] if name in results else feed[name]) for name in self.names}


def _with_outputs(model: ir.Model, names: list[str]) -> ir.Model:
    copy = clone_model(model)
    values = values_by_name(copy.graph)
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(values[name] for name in names)
    return copy


# --- sensitivity ---------------------------------------------------------------------------------


def _layer_estimates(quantized: ir.Model, tensors: list[TensorReport]) -> list[LayerReport]:
    ops = {node.name: node.op_type for node in quantized.graph}
    points = [t.point for t in tensors]
    layers = []
    for order, name in enumerate(layers_of(points)):
        own = [t for t in tensors if any(r[0] == name for r in t.point.readers)]
        estimate = min(t.metrics.local_snr_db for t in own)
        layers.append(LayerReport(name, ops.get(name, "?"), order, [t.name for t in own], estimate))
    return layers


def _exact_sensitivity(
    fp32: ir.Model,
    quantized: ir.Model,
    report: Report,
    feeds: CalibrationData,
    settings: CalibrationSettings,
    exact_layers: int,
) -> None:
    worst = sorted(report.layers, key=lambda x: (x.estimate_db, x.order))[:exact_layers]
    points = [t.point for t in report.tensors]
    variants: list[tuple[LayerReport, str, ir.Model]] = []
    for layer in worst:
        variants.append(
            (layer, "only_quantized", variant(quantized, points, lambda n, _l=layer.name: n != _l))
        )
        variants.append((layer, "only_float", variant(quantized, points, lambda n, _l=layer.name: n == _l)))
    outputs = [v.name or "" for v in fp32.graph.outputs]
    for start in range(0, len(variants), VARIANTS_PER_PASS):
        chunk = variants[start : start + VARIANTS_PER_PASS]
        results = output_snrs(fp32, [model for _, _, model in chunk], outputs, feeds, settings)
        for (layer, which, _), snr in zip(chunk, results):
            setattr(layer, f"{which}_db", snr)
    for layer in worst:
        kept = [
            t.point.name
            for t in report.tensors
            if t.point.weight is not None and t.point.weight.fp32_value is None
        ]
        if any(name in layer.tensors for name in kept):
            layer.note = "a weight without FP32 counterpart stayed quantized in both runs"


def variant(
    quantized: ir.Model, points: list[QuantPoint], to_float: Any, *, runnable: bool = True
) -> ir.Model:
    """A copy of ``quantized`` whose readers ``to_float(reader)`` read float values instead of
    dequantized ones (the quantizer's input, or the matched FP32 weight); dead Q/DQ removed.
    ``runnable``: FP4/MXFP8 parts emulated with standard ops (off: kept in their TensorRT form)."""
    model = clone_model(quantized)
    nodes = {node.name: node for node in model.graph}
    values = values_by_name(model.graph)
    for point in points:
        replacement: ir.Value | None = None
        for reader, index in point.readers:
            if not to_float(reader):
                continue
            node = nodes[reader]
            if replacement is None:
                replacement = _float_value(model, values, point)
            if replacement is not None:
                node.replace_input_with(index, _as_type(model.graph, replacement, node, node.inputs[index]))
    clean_up(model)
    if runnable and needs_emulation(model):
        emulate(model)
    return model


def _as_type(graph: ir.Graph, value: ir.Value, reader: ir.Node, current: ir.Value | None) -> ir.Value:
    """``value`` cast to the type the reader read (block quantizers read float32 and a Cast after
    their dequantizer gives a float16 rest its type)."""
    if current is None or current.dtype is None or value.dtype is None or current.dtype == value.dtype:
        return value
    cast = ir.node("Cast", [value], attributes={"to": current.dtype}, name=unique_name(graph, "report_cast"))
    cast.outputs[0].name = unique_name(graph, f"{value.name}_as_{current.dtype.name.lower()}")
    cast.outputs[0].type, cast.outputs[0].shape = current.type, current.shape
    graph.insert_before(reader, cast)
    return cast.outputs[0]


def _float_value(model: ir.Model, values: dict[str, ir.Value], point: QuantPoint) -> ir.Value | None:
    if point.kind == "activation":
        return values[point.name]
    arrays = point.weight
    if arrays is None or arrays.fp32_value is None:
        return None  # no float counterpart: the weight stays quantized
    source = arrays.fp32_value.const_value
    shareable = (
        source is not None
        and not isinstance(source, ir.ExternalTensor)
        and arrays.fold_factor is None
        and source.dtype.numpy() == arrays.dtype
    )
    if source is not None and shareable:
        # the FP32 model's own tensor, shared, not copied (external ones are read into the variant:
        # its session reads external data from the quantized model's folder only)
        value = ir.Value(
            name=unique_name(model.graph, f"{point.fp32_name}_float"), shape=ir.Shape(arrays.shape),
            type=ir.TensorType(source.dtype), const_value=source,
        )  # fmt: skip
        model.graph.register_initializer(value)
        return value
    fp32 = arrays.fp32()
    assert fp32 is not None
    return add_initializer(model.graph, f"{point.fp32_name}_float", fp32.astype(arrays.dtype))


def output_snrs(
    fp32: ir.Model,
    variants: list[ir.Model],
    outputs: list[str],
    feeds: CalibrationData,
    settings: CalibrationSettings,
) -> list[float]:
    """Each variant's lowest output SNR against FP32, one pass over the data for all of them."""
    reference = _Runner(fp32, outputs, settings)
    runners = [_Runner(model, outputs, settings) for model in variants]
    metrics = [{name: OutputMetrics() for name in outputs} for _ in variants]
    for feed in feeds.batches():
        expected = reference.run(feed)
        for runner, sums in zip(runners, metrics):
            actual = runner.run(feed)
            for name in outputs:
                sums[name].add(expected[name], actual[name])
    return [min(m.snr_db for m in sums.values()) for sums in metrics]
