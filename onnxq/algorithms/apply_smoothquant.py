"""Run SmoothQuant over a Q/DQ plan (int8, fp8): measure each GEMM activation, pick s, rewrite the model.

Which GEMMs: every MatMul/Gemm the plan quantizes (a quantized decision with its activation on input 0
and a constant weight on input 1, not a block-format choice). GEMMs reading the same activation (Q, K
and V) form one group and share one ``s``, computed from the largest weight row over all of them.
Groups are skipped, with the reason in the summary, when ``onnxq.graph.input_scaling`` cannot scale
them (Gemm transA=1, a non-constant or non-2-D weight, ...), when the activation shares one scale with
other tensors in the plan (Concat groups), when its statistics are not finite (or the data never
reached it), and (``auto``) when no smoothing measured better than every alpha. GEMMs inside control-
flow subgraphs are not considered (the calibrator reads top-level tensors only).

Known limit: when a group's GEMM is itself the linear producer another group folds ``1/s`` into, its
weight is quantized as ``diag(s_own) W diag(1/s_next)``, while its own ``s`` was chosen from ``W``
(exact in float either way; only ``auto``'s error estimate is off for such chains).

Statistics, collected on the unmodified model (smoothing upstream is exact in float, so each
activation's statistics afterwards are its own divided by its own ``s``):

- fixed alpha: per-channel minimum and maximum of each activation, reduced inside ONNX Runtime to two
  ``[K]`` vectors per run (``ReduceMin``/``ReduceMax`` over every row) and merged across runs: memory
  does not grow with the data, and min/max are exact, so the result is the same bit for bit whatever
  the batch size;
- ``auto``: the same ranges, plus the first rows of each activation through the streaming collector
  (``onnxq.calibration.activation_samples``; same rows for every batch size), on which
  :func:`onnxq.algorithms.smoothquant.search_alpha` measures every alpha of the grid.

Application: :func:`onnxq.graph.input_scaling.apply_input_scale` (weights' K rows times ``s``; ``1/s``
folded into the producer where it is a LayerNormalization, a constant Mul/Add chain or a linear layer,
otherwise an explicit ``Mul``). The plan follows renamed tensors: the inserted Mul's output becomes
the quantized activation of the group's GEMMs, and a weight that another node also read is copied
under a new name. Scales are all computed before any rewrite, from the original weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.algorithms.smoothquant import (
    AUTO,
    GEMM_OPS,
    Alpha,
    ChannelRange,
    QuantFormats,
    search_alpha,
    smoothing_scale,
    weight_row_amax,
)
from onnxq.calibration.calibrator import (
    CalibrationSettings,
    Calibrator,
    _NodeAdder,
    _progress,
    _run,
    _with_statistics,
)
from onnxq.calibration.data import CalibrationData
from onnxq.formats import get_format
from onnxq.formats.base import NumberFormat
from onnxq.graph.input_scaling import apply_input_scale, scaling_problem
from onnxq.placement.plan import NodeDecision, Plan

logger = logging.getLogger(__name__)

#: ReduceMin/ReduceMax take ``axes`` as an input from opset 18, as an attribute before
REDUCE_AXES_INPUT_OPSET = 18
_RANGE_SUFFIXES = ("__onnxq_smooth_low", "__onnxq_smooth_high")
ACTIVATION_INPUT = 0
WEIGHT_INPUT = 1


@dataclass
class SmoothedGroup:
    """One activation and the GEMMs that read it: what SmoothQuant did to them."""

    activation: str
    consumers: tuple[str, ...]
    alpha: float | None = None  #: None: left unsmoothed (``skipped`` says why)
    how: str = ""  #: where 1/s went, as ``InputScaling.how`` says it
    folded_into: str | None = None  #: the node that absorbed 1/s; None: an explicit Mul (or skipped)
    #: ``auto`` only: relative output error without smoothing and with the chosen alpha
    error_unsmoothed: float | None = None
    error: float | None = None
    skipped: str = ""
    scale_range: tuple[float, float] = (1.0, 1.0)

    def line(self) -> str:
        """One line for ``--explain``."""
        head = f"SmoothQuant {self.activation} -> {', '.join(self.consumers)}: "
        if self.alpha is None:
            return head + f"not smoothed ({self.skipped})"
        where = f"folded into {self.folded_into} ({self.how})" if self.folded_into else self.how
        line = (
            head
            + f"alpha {self.alpha:g}, s {self.scale_range[0]:.3g}..{self.scale_range[1]:.3g}, 1/s {where}"
        )
        if self.error is not None and self.error_unsmoothed is not None:
            line += f"; output error {self.error_unsmoothed:.3g} unsmoothed -> {self.error:.3g}"
        return line


@dataclass
class SmoothQuantSummary:
    alpha: Alpha
    groups: list[SmoothedGroup] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def smoothed(self) -> list[SmoothedGroup]:
        return [g for g in self.groups if g.alpha is not None]

    @property
    def explicit_muls(self) -> int:
        return sum(1 for g in self.smoothed if g.folded_into is None)

    def lines(self) -> list[str]:
        """A header and one line per group, for ``--explain``."""
        header = (
            f"SmoothQuant (alpha {self.alpha}): {len(self.smoothed)} of {len(self.groups)} activation groups "
            f"smoothed, {self.explicit_muls} with an explicit Mul, {self.seconds:.2f} s"
        )
        return [header, *(group.line() for group in self.groups)]


def run_smoothquant(
    model: ir.Model,
    plan: Plan,
    data: CalibrationData,
    settings: CalibrationSettings,
    alpha: Alpha,
    *,
    activation_format: NumberFormat | None = None,
    weight_format: NumberFormat | None = None,
    symmetric: bool = True,
) -> SmoothQuantSummary:
    """Smooth every GEMM group the plan quantizes; ``model`` and ``plan`` change in place.

    The formats (default: symmetric INT8) are those the model will be quantized in; ``auto`` measures
    each alpha's error in them.
    """
    started = time.perf_counter()
    summary = SmoothQuantSummary(alpha)
    formats = QuantFormats(
        activation_format or get_format("int8"), weight_format or get_format("int8"), symmetric
    )
    groups = gemm_groups(model, plan)
    summary.groups = [SmoothedGroup(a, tuple(names)) for a, names in groups.items()]
    candidates = [g for g in summary.groups if not _refuse(model, plan, g)]
    if not candidates:
        return summary
    nodes = {node.name: node for node in model.graph}
    channels = {g.activation: _weight_kn(nodes[g.consumers[0]]).shape[0] for g in candidates}
    ranges = collect_channel_ranges(model, channels, data, settings)
    rows = _rows(model, candidates, data, settings) if alpha == AUTO else {}
    scales = {}
    for group in candidates:
        if group.activation not in ranges:
            group.skipped = "the calibration data never reached it"
            continue
        found = _choose(
            group, nodes, ranges[group.activation], rows.get(group.activation), alpha, formats, plan
        )
        if found is not None:
            scales[group.activation] = found
    for group in candidates:
        if group.activation in scales:
            _apply(model, plan, group, nodes, scales[group.activation])
    summary.seconds = time.perf_counter() - started
    logger.info(
        "SmoothQuant: %d of %d groups smoothed (%d explicit Mul), %.2f s",
        len(summary.smoothed), len(summary.groups), summary.explicit_muls, summary.seconds,
    )  # fmt: skip
    return summary


# --- which GEMMs ------------------------------------------------------------------------------------


def gemm_groups(model: ir.Model, plan: Plan) -> dict[str, list[str]]:
    """Node names of the MatMul/Gemm nodes the plan quantizes with a constant weight, by activation."""
    nodes = {node.name: node for node in model.graph}
    block_nodes = {choice.node for choice in plan.blocks}
    groups: dict[str, list[str]] = {}
    for decision in plan.decisions:
        node = nodes.get(decision.node)
        if node is None or decision.node in block_nodes or not _quantized_gemm(decision, node):
            continue
        activation = node.inputs[ACTIVATION_INPUT]
        assert activation is not None and activation.name is not None
        groups.setdefault(activation.name, []).append(decision.node)
    return groups


def _quantized_gemm(decision: NodeDecision, node: ir.Node) -> bool:
    if not decision.quantized or node.op_type not in GEMM_OPS or node.domain not in ("", "ai.onnx"):
        return False
    if len(node.inputs) <= WEIGHT_INPUT or node.inputs[ACTIVATION_INPUT] is None:
        return False
    weight = node.inputs[WEIGHT_INPUT]
    if weight is None or weight.const_value is None or weight.is_graph_input():
        return False
    roles = {u.input_index: u.role for u in decision.uses}
    return roles.get(ACTIVATION_INPUT) == "activation" and roles.get(WEIGHT_INPUT) == "weight"


def _refuse(model: ir.Model, plan: Plan, group: SmoothedGroup) -> bool:
    """Marks the group skipped, with why, when it cannot be smoothed; True then."""
    problem = scaling_problem(model, group.activation, group.consumers)
    if problem is None and group.activation in plan.groups:
        problem = "its activation shares one scale with other tensors (Concat group)"
    if problem:
        group.skipped = problem
    return problem is not None


def _weight_kn(node: ir.Node) -> np.ndarray:
    """The consumer's weight as [K, N] float32 (Gemm transB=1 stores [N, K])."""
    weight = node.inputs[WEIGHT_INPUT]
    assert weight is not None and weight.const_value is not None
    array = weight.const_value.numpy().astype(np.float32)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0
    return np.ascontiguousarray(array.T) if transposed else array


# --- statistics -------------------------------------------------------------------------------------


def collect_channel_ranges(
    model: ir.Model, channels: dict[str, int], data: CalibrationData, settings: CalibrationSettings
) -> dict[str, ChannelRange]:
    """Per-channel minimum and maximum over ``data`` of every tensor in ``channels`` (name -> K)."""
    tensors = list(channels)
    calibrator = Calibrator(model, tensors, data, settings)
    opset = calibrator.model.opset_imports.get("", 0)

    def build(value: ir.Value, prefix: str) -> tuple[list[ir.Node], list[ir.Value]]:
        return _range_nodes(value, prefix, channels[value.name or ""], opset)

    augmented, outputs = _with_statistics(calibrator.model, tensors, build, _RANGE_SUFFIXES)
    session = calibrator._session(augmented)
    names = [name for tensor in tensors for name in outputs[tensor]]
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    for feed in _progress(data, "SmoothQuant ranges", settings.progress):
        results = dict(zip(names, _run(session, names, feed)))
        for tensor in tensors:
            low, high = (np.asarray(results[name], np.float32) for name in outputs[tensor])
            lows[tensor] = np.minimum(lows[tensor], low) if tensor in lows else low
            highs[tensor] = np.maximum(highs[tensor], high) if tensor in highs else high
    del session
    return {t: ChannelRange(lows[t], highs[t]) for t in tensors if t in lows}


def _range_nodes(value: ir.Value, prefix: str, k: int, opset: int) -> tuple[list[ir.Node], list[ir.Value]]:
    """``Reshape(x, [-1, K])`` then ReduceMin/ReduceMax over the rows: two [K] vectors."""
    adder = _NodeAdder(prefix)
    shape = adder.add("Constant", [], value=ir.tensor(np.array([-1, k], np.int64)))
    flat = adder.add("Reshape", [adder.as_float(value), shape])
    if opset >= REDUCE_AXES_INPUT_OPSET:
        axes = adder.add("Constant", [], value=ir.tensor(np.array([0], np.int64)))
        results = [adder.add(op, [flat, axes], keepdims=0) for op in ("ReduceMin", "ReduceMax")]
    else:
        results = [adder.add(op, [flat], axes=[0], keepdims=0) for op in ("ReduceMin", "ReduceMax")]
    return adder.nodes, results


def _rows(
    model: ir.Model, groups: list[SmoothedGroup], data: CalibrationData, settings: CalibrationSettings
) -> dict[str, np.ndarray]:
    from onnxq.calibration.activation_samples import collect_activation_samples

    samples = collect_activation_samples(model, [g.activation for g in groups], data, settings)
    return {name: sample.rows for name, sample in samples.items()}


# --- choosing and applying s ------------------------------------------------------------------------


def _choose(
    group: SmoothedGroup,
    nodes: dict[str | None, ir.Node],
    channel_range: ChannelRange,
    rows: np.ndarray | None,
    alpha: Alpha,
    formats: QuantFormats,
    plan: Plan,
) -> np.ndarray | None:
    """The group's s, or None (the group marked skipped, with why)."""
    if not (np.all(np.isfinite(channel_range.low)) and np.all(np.isfinite(channel_range.high))):
        group.skipped = "its calibration range holds non-finite values"
        return None
    weights = [_weight_kn(nodes[name]) for name in group.consumers]
    if alpha != AUTO:
        group.alpha = float(alpha)
        return smoothing_scale(channel_range.amax, weight_row_amax(weights), group.alpha)
    if rows is None or rows.shape[0] == 0:
        group.skipped = "auto: no finite activation rows to measure on"
        return None
    found = search_alpha(rows, weights, channel_range, _group_formats(formats, plan, group))
    group.error_unsmoothed, group.error = found.error_unsmoothed, found.error
    if found.alpha is None:
        group.skipped = f"auto: no alpha beat no smoothing (output error {found.error_unsmoothed:.3g})"
        return None
    group.alpha = found.alpha
    return found.scale


def _group_formats(formats: QuantFormats, plan: Plan, group: SmoothedGroup) -> QuantFormats:
    """The rule's own weight grid (e.g. 7-bit ``int8_reduced`` for ONNX Runtime) where it names one."""
    decision = plan.decision(group.consumers[0])
    uses = decision.uses if decision is not None else []
    named = next((u.int8_weight_format for u in uses if u.role == "weight" and u.int8_weight_format), None)
    if named is None or formats.weight.name != "int8":
        return formats
    return QuantFormats(formats.activation, get_format(named), formats.symmetric)


def _apply(
    model: ir.Model, plan: Plan, group: SmoothedGroup, nodes: dict[str | None, ir.Node], scale: np.ndarray
) -> None:
    names = list(group.consumers)
    weights_before = {name: _input_name(nodes[name], WEIGHT_INPUT) for name in names}
    scaling = apply_input_scale(model, group.activation, names, scale)
    if scaling.new_input != group.activation:
        plan.rename_tensor(group.activation, scaling.new_input, set(names))
    for name in names:
        after = _input_name(nodes[name], WEIGHT_INPUT)
        if after != weights_before[name]:  # the weight was shared with a node outside the group: copied
            plan.rename_tensor(weights_before[name], after, {name})
    group.how, group.folded_into = scaling.how, scaling.folded_into
    group.scale_range = (float(scale.min()), float(scale.max()))


def _input_name(node: ir.Node, index: int) -> str:
    value = node.inputs[index]
    return value.name or "" if value is not None else ""
