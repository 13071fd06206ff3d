"""Compare a quantized model with its original on the same inputs: SNR, cosine, max abs error.

Metrics are accumulated batch by batch (sums of squares and products), so any amount of data fits in
memory. Positions where both outputs hold the same non-finite value (e.g. masked logits at -inf) count
as exact; any other non-finite disagreement makes the SNR -inf.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.api import input_specs
from onnxq.calibration.data import InputSpec, open_calibration_data
from onnxq.errors import OnnxqError
from onnxq.model_io import load_model
from onnxq.output_check import has_float8
from onnxq.runtime import make_session

#: reference magnitudes below this count as zero for the "nearly all zeros" warning
NEAR_ZERO = 1e-6
#: share of near-zero reference values above which an output's SNR says little
MOSTLY_ZERO_SHARE = 0.99


def snr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): 3 dB per halving of the error energy; inf when exact, -inf when there
    is no signal but some noise."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class OutputMetrics:
    """Running sums for one output; the metrics are properties."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    quantized_energy: float = 0.0
    max_abs_error: float = 0.0
    mismatched_nonfinite: int = 0
    elements: int = 0
    #: reference values whose magnitude is below NEAR_ZERO (an all-zero output makes SNR meaningless)
    near_zero: int = 0

    def add(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        reference = reference.astype(np.float64)
        quantized = quantized.astype(np.float64)
        both_same = (reference == quantized) & ~np.isfinite(reference)
        finite = np.isfinite(reference) & np.isfinite(quantized)
        self.mismatched_nonfinite += int((~finite & ~both_same).sum())
        ref, quant = reference[finite], quantized[finite]
        error = quant - ref
        self.signal += float(ref @ ref)
        self.noise += float(error @ error)
        self.dot += float(ref @ quant)
        self.quantized_energy += float(quant @ quant)
        self.max_abs_error = max(self.max_abs_error, float(np.abs(error).max(initial=0.0)))
        self.elements += reference.size
        self.near_zero += int((np.abs(reference) < NEAR_ZERO).sum())

    @property
    def snr_db(self) -> float:
        """See :func:`snr_db`; -inf when a non-finite value appeared where the reference had none."""
        return -math.inf if self.mismatched_nonfinite else snr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        denominator = math.sqrt(self.signal * self.quantized_energy)
        return self.dot / denominator if denominator > 0 else (1.0 if self.noise == 0 else 0.0)


@dataclass
class CompareResult:
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    ort_fusions: bool = False
    samples: int = 0
    #: what the figures do not say (printed by the CLI)
    warnings: list[str] = field(default_factory=list)

    @property
    def min_snr_db(self) -> float:
        return min(m.snr_db for m in self.outputs.values())


def compare(
    reference: Any,
    quantized: Any,
    data: Any,
    *,
    providers: Sequence[str] | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    ort_fusions: bool = False,
) -> CompareResult:
    """Run both models on ``data`` (any calibration data source) and measure each output's error.

    By default the quantized model runs with its Q/DQ as written (what TensorRT reproduces);
    ``ort_fusions`` runs it with ONNX Runtime's fused CPU integer kernels, as an ORT deployment would.
    """
    with tempfile.TemporaryDirectory(prefix="onnxq-compare-") as folder:
        return _compare(
            reference, quantized, data, Path(folder), providers, batch_size, max_samples, ort_fusions
        )


def _compare(
    reference: Any,
    quantized: Any,
    data: Any,
    folder: Path,
    providers: Sequence[str] | None,
    batch_size: int | None,
    max_samples: int | None,
    ort_fusions: bool,
) -> CompareResult:
    reference_model, quantized_model = load_model(reference), load_model(quantized)
    emulated = ""
    if _needs_emulation(quantized_model):
        emulated, quantized_model = _emulated(quantized_model, folder)
    names = [v.name or "" for v in reference_model.graph.outputs]
    quantized_names = [v.name or "" for v in quantized_model.graph.outputs]
    if names != quantized_names:
        raise OnnxqError(
            f"the models' outputs differ: {names} vs {quantized_names}",
            "compare a model with its own quantized version",
        )
    specs = input_specs(reference_model)
    _check_same_inputs(specs, input_specs(quantized_model))
    feeds = open_calibration_data(data, specs, batch_size, max_samples)
    reference_session = make_session(reference_model, providers)
    quantized_session = make_session(quantized_model, providers, fused_kernels=ort_fusions)
    result = CompareResult({name: OutputMetrics() for name in names}, ort_fusions=ort_fusions)
    for feed in feeds.batches():
        expected = reference_session.run(names, feed)
        actual = quantized_session.run(names, feed)
        for name, ref, quant in zip(names, expected, actual):
            result.outputs[name].add(np.asarray(ref), np.asarray(quant))
        result.samples += feeds.samples_in(feed)  # 1 per feed where feeds run as they are
    result.warnings = _warnings(result, quantized_model)
    if emulated:
        result.warnings.append(
            f"the quantized model holds {emulated}; ONNX Runtime's CPU build cannot run it, so it ran emulated "
            "with standard ops (onnxq emulate), equal to ONNX's reference implementation"
        )
    return result


def _needs_emulation(model: ir.Model) -> bool:
    from onnxq.emulate import needs_emulation

    return needs_emulation(model)


def _emulated(model: ir.Model, folder: Path) -> tuple[str, ir.Model]:
    """(what was emulated, the emulated model): FP4/MXFP8 parts rewritten into standard ops, written to
    ``folder`` one weight at a time (the folded float weights are lazy) and read back memory-mapped, so
    a model over 2 GB is never held whole or serialized as one protobuf."""
    from onnxq.emulate import emulate

    stats = emulate(model)
    path = folder / "emulated.onnx"
    ir.save(model, path, external_data="emulated.onnx.data")
    return stats.describe(), load_model(path)


def _check_same_inputs(reference: list[InputSpec], quantized: list[InputSpec]) -> None:
    """Both models must take the same feeds: same input names, each with the same dtype."""
    expected = {spec.name: spec.dtype for spec in reference}
    actual = {spec.name: spec.dtype for spec in quantized}
    if expected.keys() != actual.keys():
        raise OnnxqError(
            f"the models take different inputs: {sorted(expected)} vs {sorted(actual)}",
            "compare a model with its own quantized version",
        )
    differing = [f"{n}: {expected[n]} vs {actual[n]}" for n in expected if expected[n] != actual[n]]
    if differing:
        raise OnnxqError(
            f"the models' inputs have different types ({'; '.join(differing)})",
            "compare a model with its own quantized version",
        )


def _warnings(result: CompareResult, quantized: ir.Model) -> list[str]:
    warnings = []
    for name, metrics in result.outputs.items():
        if metrics.elements and metrics.near_zero >= MOSTLY_ZERO_SHARE * metrics.elements:
            share = 100.0 * metrics.near_zero / metrics.elements
            warnings.append(
                f"output {name!r}: {share:.1f}% of the FP32 values are zero, so its SNR says little; "
                "judge it by the max abs error or compare on inputs that exercise it"
            )
    if has_float8(quantized) and any(node.op_type in _CONV_OPS for node in quantized.graph):
        warnings.append(
            "FP8 figures are for Q/DQ as written (ONNX Runtime at BASIC optimization); a default ONNX "
            "Runtime 1.32 CPU session miscomputes FP8 Q/DQ->Conv (extended fusions) and gives far lower SNR"
        )
    return warnings


_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
