"""Streaming two-pass calibration through ONNX Runtime.

Pass 1 reduces each calibrated tensor inside the session (finite min, finite max, count of NaN/inf,
element count), so only scalars leave ONNX Runtime. Methods that need a histogram run pass 2: the
tensors are exposed as outputs in groups whose per-batch size fits ``memory_limit_mb``, and each batch
is folded into fixed-range histograms over [0, amax of pass 1]. Between batches only these per-tensor
statistics are kept, so memory does not grow with the number of samples and the result is the same,
bit for bit, whatever the batch size or order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import CalibrationData
from onnxq.calibration.methods import CalibrationMethod
from onnxq.calibration.statistics import AbsHistogram, TensorStats
from onnxq.formats.base import NumberFormat
from onnxq.graph.passes import values_by_name
from onnxq.model_io import clone_model
from onnxq.runtime import make_session

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_MB = 1024
_SUFFIXES = ("__onnxq_min", "__onnxq_max", "__onnxq_nonfinite", "__onnxq_size")

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


@dataclass
class CalibrationSettings:
    providers: Sequence[str] | None = None
    custom_ops: Sequence[str] = ()
    memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB
    progress: bool = False
    threads: int | None = None


@dataclass
class Calibrator:
    """Runs both passes over ``data`` for ``tensors`` of ``model`` (which it does not modify)."""

    model: ir.Model
    tensors: list[str]
    data: CalibrationData
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)

    def collect_stats(self) -> tuple[dict[str, TensorStats], dict[str, int]]:
        """Pass 1: per-tensor statistics and the largest element count seen per batch."""
        augmented, outputs = _with_reductions(self.model, self.tensors)
        session = make_session(
            augmented, self.settings.providers, self.settings.custom_ops, self.settings.threads
        )
        stats: dict[str, TensorStats] = {}
        largest: dict[str, int] = {}
        names = [name for tensor in self.tensors for name in outputs[tensor]]
        for feed in _progress(self.data, "calibration pass 1 (ranges)", self.settings.progress):
            results = dict(zip(names, session.run(names, feed)))
            for tensor in self.tensors:
                low, high, nonfinite, size = (results[name] for name in outputs[tensor])
                batch = _stats_from_reductions(float(low), float(high), int(nonfinite), int(size))
                stats[tensor] = stats[tensor].merge(batch) if tensor in stats else batch
                largest[tensor] = max(largest.get(tensor, 0), int(size))
        return stats, largest

    def collect_histograms(
        self, stats: dict[str, TensorStats], largest: dict[str, int]
    ) -> dict[str, AbsHistogram]:
        """Pass 2: fixed-range |x| histograms, tensors grouped to fit the memory limit."""
        histograms = {t: AbsHistogram(stats[t].amax) for t in self.tensors if stats[t].has_data}
        groups = group_by_size(
            [t for t in self.tensors if t in histograms], largest, self.settings.memory_limit_mb
        )
        for index, group in enumerate(groups):
            augmented = _with_outputs(self.model, group)
            session = make_session(
                augmented, self.settings.providers, self.settings.custom_ops, self.settings.threads
            )
            label = f"calibration pass 2 (histograms{f', group {index + 1}/{len(groups)}' if len(groups) > 1 else ''})"
            for feed in _progress(self.data, label, self.settings.progress):
                for tensor, array in zip(group, session.run(group, feed)):
                    histograms[tensor].add(array)
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
    calibrator = Calibrator(model, tensors, data, settings or CalibrationSettings())
    stats, largest = calibrator.collect_stats()
    histograms = calibrator.collect_histograms(stats, largest) if method.needs_histogram else {}
    ranges = {}
    for tensor in tensors:
        threshold = (
            method.threshold(stats[tensor], histograms.get(tensor), fmt) if stats[tensor].has_data else 0.0
        )
        low, high = clip_range(stats[tensor], threshold)
        ranges[tensor] = TensorRange(stats[tensor], low, high, f"calibration ({method.name})")
    return ranges


def clip_range(stats: TensorStats, threshold: float) -> tuple[float, float]:
    """The observed [low, high] clipped to the symmetric threshold a method chose."""
    if not stats.has_data:
        return 0.0, 0.0
    return max(float(stats.low), -threshold), min(float(stats.high), threshold)


def group_by_size(tensors: list[str], elements: dict[str, int], limit_mb: float) -> list[list[str]]:
    """Consecutive groups whose float32 bytes per batch stay under ``limit_mb`` (at least one tensor each)."""
    limit = limit_mb * 1024 * 1024
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0.0
    for tensor in tensors:
        size = 4.0 * elements.get(tensor, 0)
        if current and used + size > limit:
            groups.append(current)
            current, used = [], 0.0
        current.append(tensor)
        used += size
    return [*groups, current] if current else groups


def _stats_from_reductions(low: float, high: float, nonfinite: int, size: int) -> TensorStats:
    finite = size - nonfinite
    if finite == 0:
        return TensorStats(nonfinite=nonfinite)
    # + 0.0 turns -0.0 into 0.0, as TensorStats.of does, so the result is bit-identical to it
    return TensorStats(low=low + 0.0, high=high + 0.0, nonfinite=nonfinite, count=finite)


def _progress(data: CalibrationData, label: str, enabled: bool) -> Iterator[dict[str, np.ndarray]]:
    if not enabled:
        yield from data.batches()
        return
    from rich.progress import Progress as RichProgress

    with RichProgress(transient=True) as progress:
        task = progress.add_task(label, total=data.num_batches)
        for feed in data.batches():
            yield feed
            progress.advance(task)


def _with_outputs(model: ir.Model, tensors: list[str]) -> ir.Model:
    """A copy of ``model`` whose outputs are exactly ``tensors`` (ORT then frees everything else)."""
    copy = clone_model(model)
    values = values_by_name(copy.graph)
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(values[t] for t in tensors)
    return copy


def _with_reductions(model: ir.Model, tensors: list[str]) -> tuple[ir.Model, dict[str, tuple[str, ...]]]:
    """A copy of ``model`` that outputs, per tensor, finite min/max, non-finite count and size."""
    copy = clone_model(model)
    values = values_by_name(copy.graph)
    outputs: dict[str, tuple[str, ...]] = {}
    copy.graph.outputs.clear()
    for index, tensor in enumerate(tensors):
        nodes, results = _reduction_nodes(values[tensor], f"onnxq_calib_{index}")
        copy.graph.extend(nodes)
        for result, suffix in zip(results, _SUFFIXES):
            result.name = f"{tensor}{suffix}"
        copy.graph.outputs.extend(results)
        outputs[tensor] = tuple(r.name or "" for r in results)
    return copy, outputs


def _reduction_nodes(value: ir.Value, prefix: str) -> tuple[list[ir.Node], list[ir.Value]]:
    """Nodes computing min/max over the finite values (non-finite ones read as 0), their count and size."""
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], **attributes: object) -> ir.Value:
        name = f"{prefix}_{len(nodes)}_{op}"
        node = ir.node(op, inputs, attributes=attributes, name=name)  # type: ignore[arg-type]
        node.outputs[0].name = name
        nodes.append(node)
        return node.outputs[0]

    zero = add("Constant", [], value=ir.tensor(np.array(0.0, np.float32)))
    x = add("Cast", [value], to=ir.DataType.FLOAT) if value.dtype != ir.DataType.FLOAT else value
    nonfinite = add("Or", [add("IsInf", [x]), add("IsNaN", [x])])
    finite = add("Where", [nonfinite, zero, x])
    results = [
        add("ReduceMin", [finite], keepdims=0),
        add("ReduceMax", [finite], keepdims=0),
        add("ReduceSum", [add("Cast", [nonfinite], to=ir.DataType.INT64)], keepdims=0),
        add("Size", [x]),
    ]
    return nodes, results
