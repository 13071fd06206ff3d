"""Turn a rule-set plan into a block-format plan for the mode's GEMMs (see ``onnxq.modes``).

The rule set places the base format (INT8/FP8) as usual; this pass then decides, for every MatMul/Gemm
of the main graph, whether its weight takes the mode's block format, and what its activation input
becomes. Every decision keeps a reason. Cases:

- a GEMM without a constant 2-D float weight (attention BMMs, weights computed at run time): keeps the
  rule set's decision in modes with a base format, stays float in weight-only modes;
- the output projection (the GEMM whose result reaches a graph output through nothing but layout ops
  and constant arithmetic: the lm_head of a decoder, a classifier's head): stays in high precision
  unless ``quantize_lm_head``;
- excluded by the user (``--op-types``, ``--exclude-nodes``) or inside a subgraph: untouched;
- INT4 for TensorRT with a K the block size does not divide: the largest power-of-two block size
  >= 16 that divides K is used (TensorRT reads whole blocks), else the GEMM keeps its rule decision;
  for ONNX Runtime any K works (MatMulNBits pads the last block);
- NVFP4/MXFP8 with K not a multiple of 16/32: the GEMM keeps the base format (FP8) or stays float;
- dynamic NVFP4/MXFP8 activations that TensorRT's DynamicQuantize layer cannot take (rank other than
  2 or 3, last axis dynamic or not a multiple of the block): the base format (FP8) when the rule set
  quantized that input, else float;
- Conv and the other rule-set nodes: base format (FP8 under nvfp4/w4a8/mxfp8: TensorRT has no FP4
  convolution; the reason says so), or float in weight-only modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.graph.block_weights import weight_problem
from onnxq.modes import ModeSpec
from onnxq.placement.plan import NodeDecision, Plan

GEMM_OPS = ("MatMul", "Gemm")
#: ops an output projection's result may pass through on its way to a graph output
LAYOUT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Softmax", "LogSoftmax"}
)
#: elementwise ops that keep a GEMM an output projection when their other input is a constant (bias, temperature)
CONSTANT_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})
MIN_POWER_OF_TWO_BLOCK = 16
WEIGHT_ONLY_CATEGORY = "weight-only mode"
OUTPUT_PROJECTION_CATEGORY = "output projection"


@dataclass
class BlockChoice:
    """One GEMM whose weight takes a block format, and what its activation input becomes."""

    node: str
    op_type: str
    weight: str
    weight_format: str
    block_size: int
    #: the weight's reduction axis (1 for Gemm transB=1, else 0)
    k_axis: int
    activation: str
    #: "float", "int8", "fp8" (placed by the base Q/DQ), "nvfp4" or "mxfp8" (dynamic, emitted here)
    activation_format: str
    algorithm: str = "rtn"
    zero_point: bool = False
    #: symmetric INT4 grid (``onnxq.formats.int4.INT4_GRIDS``): see ``int4_grid``
    int4_grid: str = "signed"
    #: AWQ clip ratio per block (scale shape of the weight as stored), None: no clipping
    clip_ratio: np.ndarray | None = field(default=None, repr=False)
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BlockOptions:
    target: str
    block_size: int
    algorithm: str
    zero_point: bool = False
    quantize_lm_head: bool = False


def apply_mode(model: ir.Model, plan: Plan, spec: ModeSpec, options: BlockOptions) -> None:
    """Rewrite ``plan`` in place for ``spec`` (a no-op for int8/fp8)."""
    if spec.block_weight is None:
        return
    projections = output_projections(model.graph)
    for node in model.graph:
        if node.op_type in GEMM_OPS and node.domain in ("", "ai.onnx"):
            _decide_gemm(node, plan, spec, options, node.name in projections)
    blocked = {choice.node for choice in plan.blocks}
    for decision in plan.decisions:
        if decision.node in blocked or not decision.quantized:
            continue
        if spec.weight_only:
            decision.skip(f"--mode {spec.name} quantizes only MatMul/Gemm weights", WEIGHT_ONLY_CATEGORY)
        elif decision.op_type in ("Conv", "ConvTranspose") and spec.block_weight in ("nvfp4", "mxfp8"):
            decision.reason += f"; {spec.base} (TensorRT has no {spec.block_weight} convolution)"


def _decide_gemm(node: ir.Node, plan: Plan, spec: ModeSpec, options: BlockOptions, projection: bool) -> None:
    decision = plan.decision(node.name or "")
    if decision is None:  # a custom rule set without a MatMul/Gemm rule
        decision = NodeDecision(node.name or "", node.op_type, "block weights", False, "")
        plan.decisions.append(decision)
    if decision.category in ("excluded by user", "inside subgraph", "inside function"):
        return
    problem = weight_problem(node)
    if problem:
        if spec.weight_only:
            decision.skip(
                f"{problem}; --mode {spec.name} quantizes only constant weights", WEIGHT_ONLY_CATEGORY
            )
        return
    if projection and not options.quantize_lm_head:
        decision.skip(
            "output projection (lm_head/classifier head) stays in high precision (--quantize-lm-head quantizes it)",
            OUTPUT_PROJECTION_CATEGORY,
        )
        return
    k_axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1 else 0
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    k = int(weight.const_value.shape.numpy()[k_axis])
    block_size, why_not = _block_size(spec, options, k)
    if block_size is None:
        _keep_or_skip(decision, spec, why_not or "")
        return
    activation = node.inputs[0]
    assert activation is not None
    activation_format, notes = _activation_format(decision, spec, activation, plan)
    weight_format = "uint4" if spec.block_weight == "int4" and options.zero_point else spec.block_weight
    assert weight_format is not None
    choice = BlockChoice(
        node.name or "", node.op_type, weight.name or "", weight_format, block_size, k_axis,
        activation.name or "", activation_format,
        algorithm=options.algorithm if spec.block_weight == "int4" else "rtn",
        zero_point=options.zero_point and spec.block_weight == "int4", int4_grid=int4_grid(options.target),
        details=notes,
    )  # fmt: skip
    if block_size != options.block_size and spec.fixed_block_size is None:
        choice.details.append(f"block {block_size}: K = {k} is not a multiple of {options.block_size}")
    plan.blocks.append(choice)
    kept = [u for u in decision.uses if u.role == "activation" and activation_format in ("int8", "fp8")]
    decision.quantized, decision.category, decision.uses = True, "", kept
    decision.reason = describe(choice)


def int4_grid(target: str) -> str:
    """ONNX Runtime: its own quantizer's grid ("full", negative scales allowed: the same bytes as
    MatMul4BitsQuantizer's RTN); TensorRT: "signed" (positive scales only; the extreme lands on -8 or 7
    by its sign, never clipped). RTN output SNR, benchmark decoder / 2.4 GB linear stack: amax/7 9.65 /
    10.48 dB, amax/8 10.82 / 6.05 (clipping positive extremes biases a deep stack), signed 10.40 / 11.15,
    full 11.05 / 11.43."""
    return "full" if target == "ort" else "signed"


def _block_size(spec: ModeSpec, options: BlockOptions, k: int) -> tuple[int | None, str | None]:
    """(block size to use, None) or (None, why the weight cannot take the block format)."""
    if spec.fixed_block_size is not None:
        if k % spec.fixed_block_size:
            return (
                None,
                f"K = {k} is not a multiple of the {spec.block_weight} block size {spec.fixed_block_size}",
            )
        return spec.fixed_block_size, None
    if options.target == "ort" or k % options.block_size == 0:
        return options.block_size, None
    size = options.block_size
    while size >= MIN_POWER_OF_TWO_BLOCK and k % size:
        size //= 2
    if size >= MIN_POWER_OF_TWO_BLOCK:
        return size, None
    return (
        None,
        f"K = {k} has no power-of-two block >= {MIN_POWER_OF_TWO_BLOCK} (TensorRT reads whole blocks)",
    )


def _keep_or_skip(decision: NodeDecision, spec: ModeSpec, why: str) -> None:
    """A weight that cannot take the block format keeps the base format where the mode has one."""
    if spec.weight_only or not decision.quantized:
        decision.skip(why, "block size")
    else:
        decision.reason += f"; {spec.base} instead of {spec.block_weight}: {why}"


def _activation_format(
    decision: NodeDecision, spec: ModeSpec, activation: ir.Value, plan: Plan
) -> tuple[str, list[str]]:
    base_placed = decision.quantized and any(
        u.role == "activation" and u.tensor == activation.name for u in decision.uses
    )
    base = spec.base if base_placed and spec.base else "float"
    if spec.gemm_activation == "float":
        return "float", []
    if spec.gemm_activation == "base":
        return base, [] if base_placed else [
            f"activation float: {decision.reason or 'not placed by the rule set'}"
        ]
    if activation.name in plan.nonfinite:
        return "float", [f"activation float: it can carry inf ({plan.nonfinite[activation.name]})"]
    from onnxq.graph.dynamic_quantize import dynamic_quantize_problem

    problem = dynamic_quantize_problem(activation, spec.gemm_activation)
    if problem:
        return base, [f"activation {base} instead of dynamic {spec.gemm_activation}: {problem}"]
    return spec.gemm_activation, []


def describe(choice: BlockChoice) -> str:
    """One line for the plan: the weight format, block, algorithm and the activation's format."""
    algorithm = f", {choice.algorithm}" if choice.weight_format in ("int4", "uint4") else ""
    activation = choice.activation_format + (
        " dynamic" if choice.activation_format in ("nvfp4", "mxfp8") else ""
    )
    text = f"weight {choice.weight_format} block {choice.block_size}{algorithm}; activation {activation}"
    return "; ".join([text, *choice.details])


def output_projections(graph: ir.Graph) -> set[str]:
    """Names of the GEMMs whose results reach a graph output through layout ops and constant arithmetic only."""
    found: set[str] = set()
    for output in graph.outputs:
        value: ir.Value | None = output
        for _ in range(64):  # a chain of layout ops is short; the bound keeps a cycle-free walk finite
            producer = value.producer() if value is not None else None
            if producer is None:
                break
            if producer.op_type in GEMM_OPS:
                found.add(producer.name or "")
                break
            value = _through(producer)
    return found


def _through(node: ir.Node) -> ir.Value | None:
    """The input a layout op or constant arithmetic passes its data through, else None."""
    if node.op_type in LAYOUT_OPS:
        return node.inputs[0] if node.inputs else None
    if node.op_type in CONSTANT_ARITHMETIC and len(node.inputs) == 2:
        first, second = node.inputs
        if second is not None and second.const_value is not None:
            return first
        if first is not None and first.const_value is not None and node.op_type in ("Add", "Mul"):
            return second
    return None


def refresh_reasons(plan: Plan) -> None:
    """Write each block choice's current description (after AWQ added its figures) into its decision."""
    for choice in plan.blocks:
        decision = plan.decision(choice.node)
        if decision is not None:
            decision.reason = describe(choice)
