"""Run AWQ over a block plan: read each INT4 GEMM's input activations, search, and write the result.

GEMMs reading the same activation (Q, K and V projections) share one per-channel scale, so they are
searched together. The scale is applied exactly in float before anything is quantized: weights rows
times ``s``, the activation divided by ``s`` (folded into the producer where it is a scaling op,
otherwise an explicit ``Mul``; see ``onnxq.graph.input_scaling``). Clip ratios are kept on the plan's
choices and used when the weights are written. Each group's search is one line in the plan
(``BlockChoice.details``) and one log line: alpha, output MSE against RTN, seconds.

Activations are read through the streaming calibrator (``collect_activation_samples``): memory bounded
by ``--calib-memory``, results the same for every batch size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.algorithms import awq
from onnxq.algorithms.awq import AwqResult
from onnxq.calibration.calibrator import CalibrationSettings
from onnxq.calibration.data import CalibrationData
from onnxq.placement.block_plan import BlockChoice
from onnxq.placement.plan import Plan

logger = logging.getLogger(__name__)


@dataclass
class AwqSummary:
    groups: int = 0
    gemms: int = 0
    seconds: float = 0.0
    #: (activation, MSE of RTN, MSE of AWQ) per group
    errors: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def seconds_per_gemm(self) -> float:
        return self.seconds / self.gemms if self.gemms else 0.0


def run_awq(model: ir.Model, plan: Plan, data: CalibrationData, settings: CalibrationSettings) -> AwqSummary:
    """Search and apply AWQ for every INT4 choice whose algorithm is an AWQ one; ``model`` changes in place."""
    from onnxq.calibration.activation_samples import collect_activation_samples

    groups = _groups([c for c in plan.blocks if c.algorithm in awq.AWQ_ALGORITHMS])
    summary = AwqSummary()
    if not groups:
        return summary
    started = time.perf_counter()
    samples = collect_activation_samples(model, list(groups), data, settings)
    nodes = {node.name: node for node in model.graph}
    for activation, choices in groups.items():
        weights = [_weight_kn(nodes[c.node], c.k_axis) for c in choices]
        first = choices[0]
        result = awq.search(
            weights,
            samples[activation],
            first.algorithm,
            first.block_size,
            first.zero_point,
            grid=first.int4_grid,
        )
        _apply(model, plan, activation, choices, result)
        summary.errors.append((activation, result.error_rtn, result.error))
        summary.gemms += len(choices)
    summary.groups = len(groups)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "AWQ: %d GEMMs in %d groups, %.2f s (%.3f s per GEMM)",
        summary.gemms, summary.groups, summary.seconds, summary.seconds_per_gemm,
    )  # fmt: skip
    return summary


def _groups(choices: list[BlockChoice]) -> dict[str, list[BlockChoice]]:
    """Choices by the activation they read (one search each; one run uses one algorithm, block size and
    zero point for every choice, so the first choice of a group speaks for all)."""
    groups: dict[str, list[BlockChoice]] = {}
    for choice in choices:
        groups.setdefault(choice.activation, []).append(choice)
    return groups


def _weight_kn(node: ir.Node, k_axis: int) -> np.ndarray:
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    array = weight.const_value.numpy().astype(np.float32)
    return np.ascontiguousarray(array.T) if k_axis == 1 else array


def _apply(
    model: ir.Model, plan: Plan, activation: str, choices: list[BlockChoice], result: AwqResult
) -> None:
    """Scale the weights and the activation (exact in float), keep the clip ratios, note the figures."""
    from onnxq.graph.block_emit import transpose_clip
    from onnxq.graph.input_scaling import apply_input_scale

    gain = (
        10 * np.log10(result.error_rtn / result.error) if result.error > 0 and result.error_rtn > 0 else 0.0
    )
    line = (
        f"AWQ ({choices[0].algorithm}): output MSE {result.error_rtn:.3g} (rtn) -> {result.error:.3g}, "
        f"{gain:.2f} dB better"
    )
    if result.input_scale is not None:
        names = [c.node for c in choices]
        scaling = apply_input_scale(model, activation, names, result.input_scale)
        line += f"; alpha {result.alpha}, 1/s into {scaling.how}"
        if scaling.new_input != activation:
            plan.rename_tensor(activation, scaling.new_input, set(names))
    for choice, clip in zip(choices, result.clip_ratios):
        clip_note = ""
        if clip is not None:
            choice.clip_ratio = transpose_clip(clip, choice.k_axis)
            clip_note = f"; clip ratios {float(clip.min()):.2f}-{float(clip.max()):.2f}"
        choice.details.append(line + clip_note)
