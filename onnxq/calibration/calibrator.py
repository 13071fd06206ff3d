"""Streaming two-pass calibration through ONNX Runtime.

Pass 1 reduces each calibrated tensor inside the session (min, max, sum, size), so only scalars leave
ONNX Runtime; a tensor whose reductions are not finite held NaN/inf and is measured again exactly
(finite range, count of non-finite values) in numpy. Methods that need a histogram run pass 2: inside
the session each element becomes its uint16 bin over [0, amax of pass 1], the bins leave in tensor
groups whose per-batch size fits ``memory_limit_mb``, and numpy counts them. Between batches only these per-tensor
statistics are kept, so memory does not grow with the number of samples and the result is the same,
bit for bit, whatever the batch size or order.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxq.calibration.data import CalibrationData
from onnxq.calibration.methods import CalibrationMethod
from onnxq.calibration.statistics import AbsHistogram, TensorStats
from onnxq.choices import DEFAULT_CALIB_MEMORY_MB
from onnxq.errors import OnnxqError
from onnxq.formats.base import NumberFormat
from onnxq.graph.passes import infer_shapes, insert_after_producer, values_by_name
from onnxq.model_io import clone_model
from onnxq.progress import track
from onnxq.runtime import make_session

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_MB = DEFAULT_CALIB_MEMORY_MB
#: pass 2 receives one uint16 histogram bin per element
BIN_INDEX_BYTES = 2
FLOAT_BYTES = 4
_SUFFIXES = ("__onnxq_min", "__onnxq_max", "__onnxq_sum", "__onnxq_size")

Progress = Callable[[str, int | None], Iterator[dict[str, np.ndarray]]]


@dataclass
class TensorRange:
    """Observed statistics of one tensor and the range calibration chose for it."""

    stats: TensorStats
    chosen_low: float
    chosen_high: float
    source: str = "calibration"

    @property
    def nonfinite(self) -> int:
        return int(self.stats.nonfinite)


def check_memory_limit(megabytes: Any) -> float:
    """The calibration memory limit in MB, refused unless a finite number > 0.

    Cases: 0, negative, NaN, inf, bool or non-numbers -> OnnxqError (a limit of 0 or NaN would make
    every run hold one sample and every tensor its own group, or compare as never exceeded).
    """
    try:
        value = float(megabytes)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(megabytes, bool) or not math.isfinite(value) or value <= 0:
        raise OnnxqError(
            f"calibration memory limit {megabytes!r} MB is not a positive number",
            f"pass --calib-memory a number of megabytes above 0 (default {DEFAULT_MEMORY_LIMIT_MB})",
        )
    return value


@dataclass
class CalibrationSettings:
    providers: Sequence[str] | None = None
    custom_ops: Sequence[str] = ()
    memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB
    progress: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        self.memory_limit_mb = check_memory_limit(self.memory_limit_mb)


@dataclass
class Calibrator:
    """Runs both passes over ``data`` for ``tensors`` of ``model`` (which it does not modify)."""

    model: ir.Model
    tensors: list[str]
    data: CalibrationData
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self) -> None:
        values = values_by_name(self.model.graph)
        if any(values[t].dtype is None for t in self.tensors if t in values):
            # ONNX Runtime plans memory far worse for a graph without types (measured, 12-layer
            # encoder, 445 tensors, batch 32: pass 1 at 2285 MB untyped vs 671 MB typed)
            self.model = clone_model(self.model)
            infer_shapes(self.model)

    def _session(self, model: ir.Model) -> Any:
        settings = self.settings
        return make_session(model, settings.providers, settings.custom_ops, settings.threads, streaming=True)

    def collect_stats(self) -> tuple[dict[str, TensorStats], dict[str, float]]:
        """Pass 1: per-tensor statistics and the largest element count per sample.

        The session reduces every tensor to min, max, sum and size (a few cheap full-tensor
        reductions). A non-finite sum, min or max means the batch held NaN/inf (or the float32 sum
        overflowed): such tensors are measured again exactly, element by element, in numpy.
        """
        augmented, outputs = _with_reductions(self.model, self.tensors)
        session = self._session(augmented)
        stats: dict[str, TensorStats] = {}
        per_sample: dict[str, float] = {}
        suspicious: set[str] = set()
        names = [name for tensor in self.tensors for name in outputs[tensor]]
        for feed in _progress(self.data, "calibration pass 1 (ranges)", self.settings.progress):
            results = dict(zip(names, _run(session, names, feed)))
            rows = self.data.samples_in(feed)
            for tensor in self.tensors:
                low, high, total, size = (float(results[name]) for name in outputs[tensor])
                per_sample[tensor] = max(per_sample.get(tensor, 0.0), size / rows)
                if not all(math.isfinite(v) for v in (low, high, total)):
                    suspicious.add(tensor)
                    continue
                batch = (
                    TensorStats(low=low + 0.0, high=high + 0.0, count=int(size)) if size else TensorStats()
                )
                stats[tensor] = stats[tensor].merge(batch) if tensor in stats else batch
        del session
        stats.update(self._exact_stats([t for t in self.tensors if t in suspicious], per_sample))
        return {t: stats.get(t, TensorStats()) for t in self.tensors}, per_sample

    def _exact_stats(self, tensors: list[str], per_sample: dict[str, float]) -> dict[str, TensorStats]:
        """Finite min/max and non-finite counts of whole tensors, for those pass 1 flagged."""
        stats: dict[str, TensorStats] = {}
        for group, rows in self._plan_runs(tensors, per_sample, FLOAT_BYTES):
            session = self._session(_with_outputs(self.model, group))
            for feed in self._feeds("calibration pass 1b (non-finite)", rows):
                for tensor, array in zip(group, _run(session, group, feed)):
                    batch = TensorStats.of(array)
                    stats[tensor] = stats[tensor].merge(batch) if tensor in stats else batch
            del session
        return stats

    def _plan_runs(
        self, tensors: list[str], per_sample: dict[str, float], bytes_per_element: int
    ) -> list[tuple[list[str], int]]:
        """Tensor groups, and samples per run, keeping each run's outputs under the memory limit.

        Batches are split into fewer samples first (the model still runs once per sample); only
        when one sample's tensors exceed the limit are the tensors split into groups, each group
        a run of the model over all data.
        """
        limit = self.settings.memory_limit_mb * 1024 * 1024
        groups = group_by_size(tensors, per_sample, self.settings.memory_limit_mb, bytes_per_element)
        plans = []
        for group in groups:
            sample_bytes = bytes_per_element * sum(per_sample[t] for t in group)
            plans.append((group, max(1, int(limit // sample_bytes)) if sample_bytes else 1 << 30))
        return plans

    def _feeds(self, label: str, rows: int) -> Iterator[dict[str, np.ndarray]]:
        for feed in _progress(self.data, label, self.settings.progress):
            yield from self.data.split(feed, rows)

    def collect_histograms(
        self, stats: dict[str, TensorStats], per_sample: dict[str, float]
    ) -> dict[str, AbsHistogram]:
        """Pass 2: fixed-range |x| histograms, tensors grouped to fit the memory limit.

        Tensors that held NaN/inf are left out: they stay unquantized whatever their histogram.
        """
        histograms = {
            t: AbsHistogram(stats[t].amax)
            for t in self.tensors
            if stats[t].has_data and not stats[t].nonfinite
        }
        tensors = [t for t in self.tensors if t in histograms]
        runs = self._plan_runs(tensors, per_sample, BIN_INDEX_BYTES)
        for index, (group, rows) in enumerate(runs):
            augmented, outputs = _with_bin_indices(self.model, {t: histograms[t] for t in group})
            session = self._session(augmented)
            part = f", group {index + 1}/{len(runs)}" if len(runs) > 1 else ""
            for feed in self._feeds(f"calibration pass 2 (histograms{part})", rows):
                for tensor, indices in zip(group, _run(session, outputs, feed)):
                    histograms[tensor].add_bin_indices(indices)
            del session
        return histograms


def calibrate(
    model: ir.Model,
    tensors: list[str],
    data: CalibrationData,
    method: CalibrationMethod,
    fmt: NumberFormat,
    settings: CalibrationSettings | None = None,
) -> dict[str, TensorRange]:
    """Ranges for ``tensors``: observed statistics and the symmetric clip chosen by ``method``."""
    return calibrate_candidates(model, tensors, data, [method], fmt, settings)[method.name]


def calibrate_candidates(
    model: ir.Model,
    tensors: list[str],
    data: CalibrationData,
    methods: Sequence[CalibrationMethod],
    fmt: NumberFormat,
    settings: CalibrationSettings | None = None,
) -> dict[str, dict[str, TensorRange]]:
    """Per method name, the ranges that method chooses for ``tensors``, from one pair of passes.

    Every method reads the same statistics: pass 1 runs once, and pass 2 (the histograms) once when
    any method needs it, so comparing methods costs no extra pass over the data.
    """
    calibrator = Calibrator(model, tensors, data, settings or CalibrationSettings())
    stats, per_sample = calibrator.collect_stats()
    needs_histogram = any(method.needs_histogram for method in methods)
    histograms = calibrator.collect_histograms(stats, per_sample) if needs_histogram else {}
    candidates: dict[str, dict[str, TensorRange]] = {}
    for method in methods:
        ranges = {}
        for tensor in tensors:
            threshold = _threshold(method, stats[tensor], histograms.get(tensor), fmt)
            low, high = clip_range(stats[tensor], threshold)
            ranges[tensor] = TensorRange(stats[tensor], low, high, f"calibration ({method.name})")
        candidates[method.name] = ranges
    return candidates


def _threshold(
    method: CalibrationMethod, stats: TensorStats, histogram: AbsHistogram | None, fmt: NumberFormat
) -> float:
    if not stats.has_data:
        return 0.0
    if stats.nonfinite and histogram is None:
        return stats.amax  # it held NaN/inf: left unquantized, its finite range is only reported
    return method.threshold(stats, histogram, fmt)


def clip_range(stats: TensorStats, threshold: float) -> tuple[float, float]:
    """The observed [low, high] clipped to the symmetric threshold a method chose."""
    if not stats.has_data:
        return 0.0, 0.0
    return max(float(stats.low), -threshold), min(float(stats.high), threshold)


def group_by_size(
    tensors: list[str], elements: dict[str, float], limit_mb: float, bytes_per_element: int = 4
) -> list[list[str]]:
    """Consecutive groups whose output bytes (``elements`` each) stay under ``limit_mb``; at least one tensor each."""
    limit = limit_mb * 1024 * 1024
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0.0
    for tensor in tensors:
        size = float(bytes_per_element * elements.get(tensor, 0))
        if current and used + size > limit:
            groups.append(current)
            current, used = [], 0.0
        current.append(tensor)
        used += size
    return [*groups, current] if current else groups


#: ORT's status message names the failing node: "... while running Gather node. Name:'g' Status Message: ..."
_ORT_RUN_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    *(
        getattr(_ort_state, name)
        for name in ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "EPFail")
        if isinstance(getattr(_ort_state, name, None), type)
    ),
)
_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'(?: Status Message: (.*))?", re.DOTALL)


def _run(session: Any, outputs: list[str], feed: dict[str, np.ndarray]) -> list[Any]:
    """``session.run`` with ONNX Runtime's run-time failures reported as one user-facing line.

    A model that loaded but fails on a feed is nearly always fed data it cannot take (a Gather id
    beyond its table, a shape that does not broadcast). ORT raises its own pybind types (Fail,
    InvalidArgument, RuntimeException, ...), which derive from Exception only, so they are listed.
    """
    try:
        result: list[Any] = session.run(outputs, feed)
    except _ORT_RUN_ERRORS as error:
        raise _run_error(error, feed) from error
    return result


def _run_error(error: Exception, feed: dict[str, np.ndarray]) -> OnnxqError:
    message = " ".join(str(error).split())
    shapes = ", ".join(f"{name} {list(array.shape)} {array.dtype}" for name, array in feed.items())
    found = _ORT_NODE.search(message)
    where = f"node '{found.group(2)}' ({found.group(1)})" if found else "the model"
    detail = (found.group(3) if found and found.group(3) else message).strip()
    hint = "integer inputs (token ids, indices) must lie within the tables the model looks them up in"
    return OnnxqError(
        f"ONNX Runtime failed running {where} on the calibration data (feed {shapes}): {detail}",
        f"check the calibration data against what the model accepts: {hint}; shapes must fit the model",
    )


def _progress(data: CalibrationData, label: str, interactive: bool) -> Iterator[dict[str, np.ndarray]]:
    """A bar in a terminal, rate-limited log lines elsewhere (see ``onnxq.progress``)."""
    return track(data.batches(), label, data.num_batches, interactive=interactive, unit="batches")


def _with_outputs(model: ir.Model, tensors: list[str]) -> ir.Model:
    """A copy of ``model`` whose outputs are exactly ``tensors`` (ONNX Runtime frees everything else)."""
    copy = clone_model(model)
    values = values_by_name(copy.graph)
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(values[t] for t in tensors)
    return copy


def _with_bin_indices(model: ir.Model, histograms: dict[str, AbsHistogram]) -> tuple[ir.Model, list[str]]:
    """A copy of ``model`` that outputs, per tensor, the histogram bin of every element (uint16).

    Binning inside the session sends 2 bytes per element out of ONNX Runtime instead of 4 and leaves
    numpy only a ``bincount``. Each element's bin depends on that element alone, so the counts are
    the same whatever the batch size.
    """

    def build(value: ir.Value, prefix: str) -> tuple[list[ir.Node], list[ir.Value]]:
        nodes, result = _bin_index_nodes(value, prefix, histograms[value.name or ""])
        return nodes, [result]

    copy, outputs = _with_statistics(model, list(histograms), build, ("__onnxq_bins",))
    return copy, [outputs[t][0] for t in histograms]


def _bin_index_nodes(value: ir.Value, prefix: str, histogram: AbsHistogram) -> tuple[list[ir.Node], ir.Value]:
    """``min(|x| * bins / amax, bins - 1)`` cast to uint16: the cast truncates, i.e. floors |x|'s bin.

    Only finite tensors get here (pass 1 left out the others), so no NaN/inf masking is needed.
    """
    adder = _NodeAdder(prefix)
    bins = histogram.num_bins
    scale = np.float32(bins / histogram.amax) if histogram.amax > 0 else np.float32(0.0)
    x = adder.as_float(value)
    scaled = adder.add("Mul", [adder.add("Abs", [x]), adder.constant(scale)])
    clamped = adder.add("Min", [scaled, adder.constant(np.float32(bins - 1))])
    return adder.nodes, adder.add("Cast", [clamped], to=ir.DataType.UINT16)


def _with_reductions(model: ir.Model, tensors: list[str]) -> tuple[ir.Model, dict[str, tuple[str, ...]]]:
    """A copy of ``model`` that outputs, per tensor, its min, max, sum and size."""
    return _with_statistics(model, tensors, _reduction_nodes, _SUFFIXES)


StatisticNodes = Callable[[ir.Value, str], tuple[list[ir.Node], list[ir.Value]]]


def _with_statistics(
    model: ir.Model, tensors: list[str], build: StatisticNodes, suffixes: tuple[str, ...]
) -> tuple[ir.Model, dict[str, tuple[str, ...]]]:
    """A copy of ``model`` whose only outputs are ``build``'s results for every tensor, named
    ``<tensor><suffix>``; returns the output names per tensor. The nodes sit right after the
    tensor's producer, so the graph lists them in the order they can run."""
    copy = clone_model(model)
    values = values_by_name(copy.graph)
    outputs: dict[str, tuple[str, ...]] = {}
    copy.graph.outputs.clear()
    for index, tensor in enumerate(tensors):
        nodes, results = build(values[tensor], f"onnxq_calib_{index}")
        insert_after_producer(copy.graph, values[tensor], nodes)
        for result, suffix in zip(results, suffixes):
            result.name = f"{tensor}{suffix}"
        copy.graph.outputs.extend(results)
        outputs[tensor] = tuple(r.name or "" for r in results)
    return copy, outputs


def _reduction_nodes(value: ir.Value, prefix: str) -> tuple[list[ir.Node], list[ir.Value]]:
    """Min, max, sum and size of the tensor: the sum is NaN or inf when any element is."""
    adder = _NodeAdder(prefix)
    x = adder.as_float(value)
    results = [
        adder.add("ReduceMin", [x], keepdims=0),
        adder.add("ReduceMax", [x], keepdims=0),
        adder.add("ReduceSum", [x], keepdims=0),
        adder.add("Size", [x]),
    ]
    return adder.nodes, results


class _NodeAdder:
    """Builds a chain of uniquely named nodes for an augmented calibration model."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[ir.Node] = []

    def add(self, op: str, inputs: list[ir.Value], **attributes: object) -> ir.Value:
        name = f"{self.prefix}_{len(self.nodes)}_{op}"
        node = ir.node(op, inputs, attributes=attributes, name=name)  # type: ignore[arg-type]
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def as_float(self, value: ir.Value) -> ir.Value:
        """float32 view of the tensor; an unknown type counts as float32 (``quantize`` infers types
        first). A needless float->float Cast is not free: measured on a 12-layer encoder, 445
        tensors, batch 32: 2287 MB instead of 671 MB in pass 1."""
        if value.dtype in (None, ir.DataType.FLOAT):
            return value
        return self.add("Cast", [value], to=ir.DataType.FLOAT)

    def constant(self, scalar: np.floating) -> ir.Value:
        return self.add("Constant", [], value=ir.tensor(np.array(scalar, dtype=np.float32)))
