"""Streaming collection of MatMul input activations for AWQ: per-channel mean |x| and the first rows.

For every tensor (the last axis is the channel axis K, every leading axis is flattened into rows),
one pass through ONNX Runtime yields an :class:`ActivationSample`: the mean |x| of each channel over
every row seen, and the first ``rows_per_tensor`` rows in sample order.

Built on the streaming calibrator (:mod:`onnxq.calibration.calibrator`):

- A sizing pass reads only each tensor's shape (a ``Shape`` output, a few integers per run), giving
  elements per sample and the channel count.
- Memory: ``ROWS_MEMORY_SHARE`` of ``settings.memory_limit_mb`` holds the rows kept across the whole
  collection (rows per tensor are reduced to fit, logged at info level); the rest bounds one run's
  outputs: tensors are fetched in groups and batches split into runs (``Calibrator._plan_runs``).
- Batch-size invariance, bit for bit: each sample's float64 partial sums are computed from that
  sample's rows alone and added in sample order; rows come from the first samples. Samples are
  found by cutting a run's rows into ``samples_in(feed)`` equal consecutive parts (true for
  [B, ..., K] and for [B * S, K] after a reshape). A tensor whose rows do not divide by the samples
  of the run (it does not carry the batch) is taken as one part per run, which is exact for the
  mean but its float64 rounding then depends on the batch size.
- As-is data (inputs that share no sample axis, see :mod:`onnxq.calibration.data`): every feed is
  one sample, its whole tensor one part.
- Non-finite values (attention masks hold -inf): skipped in the mean (counted per channel, so a
  channel's mean is over its finite values), and rows holding any are not kept. A channel with no
  finite value has mean 0.

Errors: a tensor name that is not in the graph, or ``rows_per_tensor`` < 0, raise ValueError; a
tensor whose channel count changes between runs raises ValueError.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.calibration.calibrator import (
    FLOAT_BYTES,
    CalibrationSettings,
    Calibrator,
    _NodeAdder,
    _progress,
    _run,
    _with_outputs,
    _with_statistics,
)
from onnxq.calibration.data import CalibrationData
from onnxq.graph.passes import values_by_name

logger = logging.getLogger(__name__)

#: rows kept per tensor by default: AWQ's output error is measured on these
DEFAULT_ROWS = 512
#: part of the memory limit given to the rows kept across the collection; runs get the rest
ROWS_MEMORY_SHARE = 0.5
_SHAPE_SUFFIX = "__onnxq_shape"


@dataclass
class ActivationSample:
    """What AWQ needs of one activation tensor."""

    channel_mean_abs: np.ndarray  # [K] float32: mean |x| per channel over every row seen
    rows: np.ndarray  # [R, K] float32: the first finite rows, in sample order
    rows_seen: int


@dataclass(frozen=True)
class _TensorSize:
    """Largest elements per sample over the data, and the channel count (last axis)."""

    per_sample: float
    channels: int


class _Accumulator:
    """Running float64 sums and finite counts per channel, and the first rows, for one tensor."""

    def __init__(self, name: str, channels: int, max_rows: int) -> None:
        self.name = name
        self.channels = channels
        self.max_rows = max_rows
        self.total = np.zeros(channels, np.float64)
        self.finite = np.zeros(channels, np.int64)
        self.kept: list[np.ndarray] = []
        self.kept_rows = 0
        self.rows_seen = 0

    def add_run(self, array: np.ndarray, samples: int) -> None:
        """One run's tensor holding ``samples`` samples, split into per-sample parts in order."""
        rows = self._as_rows(array)
        per_sample, remainder = divmod(rows.shape[0], samples)
        if remainder or not per_sample:
            logger.debug("%s: %d rows do not split into %d samples", self.name, rows.shape[0], samples)
            self._add_sample(rows)
            return
        for index in range(samples):
            self._add_sample(rows[index * per_sample : (index + 1) * per_sample])

    def _as_rows(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array)
        channels = values.shape[-1] if values.ndim else 1
        if channels != self.channels:
            raise ValueError(f"tensor {self.name!r} has {channels} channels in a run, {self.channels} before")
        return values.reshape(-1, self.channels)

    def _add_sample(self, rows: np.ndarray) -> None:
        """Adds one sample's partial sums; the same rows always give the same float64 sums."""
        values = rows.astype(np.float32, copy=False)
        finite = np.isfinite(values)
        magnitudes = np.where(finite, np.abs(values), np.float32(0)).astype(np.float64)
        self.total += magnitudes.sum(axis=0)
        self.finite += finite.sum(axis=0)
        self.rows_seen += values.shape[0]
        if self.kept_rows < self.max_rows:
            clean = values[finite.all(axis=1)][: self.max_rows - self.kept_rows]
            self.kept.append(np.array(clean, np.float32))
            self.kept_rows += clean.shape[0]

    def result(self) -> ActivationSample:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.finite > 0, self.total / np.maximum(self.finite, 1), 0.0)
        rows = np.concatenate(self.kept) if self.kept else np.zeros((0, self.channels), np.float32)
        return ActivationSample(mean.astype(np.float32), rows, self.rows_seen)


def collect_activation_samples(
    model: ir.Model,
    tensors: list[str],
    data: CalibrationData,
    settings: CalibrationSettings,
    rows_per_tensor: int = DEFAULT_ROWS,
) -> dict[str, ActivationSample]:
    """Mean |x| per channel and the first rows of every tensor in ``tensors`` over ``data``."""
    if rows_per_tensor < 0:
        raise ValueError(f"rows per tensor must be >= 0, got {rows_per_tensor}")
    names = list(dict.fromkeys(tensors))
    missing = [t for t in names if t not in values_by_name(model.graph)]
    if missing:
        raise ValueError(f"tensors not in the graph: {missing}")
    run_limit = settings.memory_limit_mb * (1 - ROWS_MEMORY_SHARE)
    calibrator = Calibrator(model, names, data, dataclasses.replace(settings, memory_limit_mb=run_limit))
    sizes = _tensor_sizes(calibrator, names)
    rows = _rows_within_budget(rows_per_tensor, sizes, settings.memory_limit_mb * ROWS_MEMORY_SHARE)
    accumulators = {t: _Accumulator(t, sizes[t].channels, rows) for t in names}
    per_sample = {t: sizes[t].per_sample for t in names}
    runs = calibrator._plan_runs(names, per_sample, FLOAT_BYTES)
    for index, (group, samples_per_run) in enumerate(runs):
        session = calibrator._session(_with_outputs(calibrator.model, group))
        part = f", group {index + 1}/{len(runs)}" if len(runs) > 1 else ""
        for feed in calibrator._feeds(f"AWQ activations{part}", samples_per_run):
            samples = data.samples_in(feed)
            for tensor, array in zip(group, _run(session, group, feed)):
                accumulators[tensor].add_run(array, samples)
        del session
    return {t: accumulators[t].result() for t in names}


def _tensor_sizes(calibrator: Calibrator, tensors: list[str]) -> dict[str, _TensorSize]:
    """Sizing pass: each tensor's shape per run (``Shape`` outputs only, so memory stays tiny)."""

    def build(value: ir.Value, prefix: str) -> tuple[list[ir.Node], list[ir.Value]]:
        adder = _NodeAdder(prefix)
        return adder.nodes, [adder.add("Shape", [value])]

    augmented, outputs = _with_statistics(calibrator.model, tensors, build, (_SHAPE_SUFFIX,))
    session = calibrator._session(augmented)
    names = [outputs[t][0] for t in tensors]
    per_sample: dict[str, float] = {}
    channels: dict[str, int] = {}
    data = calibrator.data
    for feed in _progress(data, "AWQ activation sizes", calibrator.settings.progress):
        samples = data.samples_in(feed)
        for tensor, shape in zip(tensors, _run(session, names, feed)):
            dims = [int(d) for d in np.asarray(shape).reshape(-1)]
            per_sample[tensor] = max(per_sample.get(tensor, 0.0), math.prod(dims) / samples)
            channels.setdefault(tensor, dims[-1] if dims else 1)
    del session
    return {t: _TensorSize(per_sample.get(t, 0.0), channels.get(t, 1)) for t in tensors}


def _rows_within_budget(requested: int, sizes: dict[str, _TensorSize], budget_mb: float) -> int:
    """``requested`` rows per tensor, fewer when the rows of every tensor would not fit ``budget_mb``."""
    row_bytes = FLOAT_BYTES * sum(size.channels for size in sizes.values())
    affordable = int(budget_mb * 1024 * 1024 // row_bytes) if row_bytes else requested
    if affordable >= requested:
        return requested
    logger.info(
        "AWQ keeps %d activation rows per tensor instead of %d: %d tensors' rows must fit %.1f MB "
        "(%.0f%% of the calibration memory limit; raise --calib-memory for more)",
        affordable,
        requested,
        len(sizes),
        budget_mb,
        100 * ROWS_MEMORY_SHARE,
    )
    return affordable
