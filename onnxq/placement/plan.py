"""The placement plan: a decision with a reason for every candidate node, and the tensors to quantize."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from onnxq.placement.block_plan import BlockChoice

Role = Literal["weight", "activation"]


@dataclass(frozen=True)
class TensorUse:
    """One tensor to quantize for one consumer input (``input_index`` None: for all its consumers)."""

    tensor: str
    role: Role
    node: str
    input_index: int | None
    axis: int | None = None
    #: storage grid for INT8 weights when the rule asks for another one (e.g. "int8_reduced")
    int8_weight_format: str | None = None


@dataclass
class NodeDecision:
    node: str
    op_type: str
    rule: str
    quantized: bool
    reason: str
    #: short reason class for summaries ("small conv", "can carry inf", ...); the reason has the details
    category: str = ""
    uses: list[TensorUse] = field(default_factory=list)

    def skip(self, reason: str, category: str) -> None:
        self.quantized, self.reason, self.category, self.uses = False, reason, category, []


@dataclass(frozen=True)
class QuantizedTensor:
    """Everything the inserter needs to know about one tensor."""

    name: str
    role: Role
    axis: int | None
    consumers: frozenset[tuple[str, int]]
    all_consumers: bool
    group: str | None
    int8_weight_format: str | None = None


@dataclass
class Plan:
    target: str
    decisions: list[NodeDecision] = field(default_factory=list)
    #: tensor name -> shared-scale group name (Concat inputs and output share one scale)
    groups: dict[str, str] = field(default_factory=dict)
    #: tensors that can carry +/-inf, found statically or during calibration, with why
    nonfinite: dict[str, str] = field(default_factory=dict)
    #: what the clean-up passes changed that the user should know (declared shapes dropped, ...)
    notes: list[str] = field(default_factory=list)
    #: GEMMs whose weights take a block format (INT4, NVFP4, MXFP8), see ``onnxq.placement.block_plan``
    blocks: list[BlockChoice] = field(default_factory=list)

    def join_group(self, tensors: list[str]) -> None:
        """Put ``tensors`` (and every tensor already grouped with one of them) in one scale group."""
        joined = set(tensors) | {
            t for t, g in self.groups.items() if g in {self.groups.get(x) for x in tensors}
        }
        name = "group:" + min(joined)
        for tensor in joined:
            self.groups[tensor] = name

    def decision(self, node: str) -> NodeDecision | None:
        return next((d for d in self.decisions if d.node == node), None)

    def quantized_nodes(self) -> list[NodeDecision]:
        return [d for d in self.decisions if d.quantized]

    def is_quantized(self, tensor: str) -> bool:
        return any(u.tensor == tensor for d in self.decisions for u in d.uses)

    def activation_tensors(self) -> list[str]:
        """Activation tensors to calibrate, in plan order, without repeats."""
        names = (u.tensor for d in self.decisions for u in d.uses if u.role == "activation")
        return list(dict.fromkeys(names))

    def runs_awq(self) -> bool:
        """Whether any block weight is searched by AWQ (which reads the calibration data)."""
        return any(c.algorithm.startswith("awq") for c in self.blocks)

    def dynamic_activation_tensors(self) -> list[str]:
        """Activations quantized per block at run time whose global scale needs calibration (NVFP4)."""
        return list(dict.fromkeys(c.activation for c in self.blocks if c.activation_format == "nvfp4"))

    def drop_tensor(self, tensor: str, reason: str, category: str) -> None:
        """Leave ``tensor`` unquantized, and with it every node that needed it quantized.

        A GEMM whose dynamic NVFP4 activation is ``tensor`` keeps its block weight; its activation
        becomes float."""
        for decision in self.decisions:
            if any(u.tensor == tensor for u in decision.uses):
                decision.skip(reason, category)
        for choice in self.blocks:
            if choice.activation == tensor and choice.activation_format in ("nvfp4", "mxfp8"):
                choice.activation_format = "float"
                choice.details.append(f"activation float: {reason}")

    def rename_tensor(self, old: str, new: str, nodes: set[str]) -> None:
        """``nodes`` now read ``new`` where they read ``old`` (a Mul was inserted between)."""
        for decision in self.decisions:
            if decision.node in nodes:
                decision.uses = [replace(u, tensor=new) if u.tensor == old else u for u in decision.uses]
        for choice in self.blocks:
            if choice.node in nodes and choice.activation == old:
                choice.activation = new

    def tensors(self) -> list[QuantizedTensor]:
        """One entry per tensor and axis: a weight shared by consumers with different output-channel
        axes (MatMul and Gemm transB=1) gets one DequantizeLinear per axis."""
        merged: dict[tuple[str, int | None, str | None], list[TensorUse]] = {}
        for decision in self.decisions:
            for use in decision.uses:
                merged.setdefault((use.tensor, use.axis, use.int8_weight_format), []).append(use)
        return [self._merge(key[0], uses) for key, uses in merged.items()]

    def _merge(self, name: str, uses: list[TensorUse]) -> QuantizedTensor:
        consumers = frozenset((u.node, u.input_index) for u in uses if u.input_index is not None)
        all_consumers = any(u.input_index is None for u in uses)
        first = uses[0]
        group = self.groups.get(name)
        return QuantizedTensor(
            name, first.role, first.axis, consumers, all_consumers, group, first.int8_weight_format
        )

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(quantized nodes per op type, skipped nodes per reason) for the summary table."""
        quantized: dict[str, int] = {}
        skipped: dict[str, int] = {}
        for d in self.decisions:
            if d.quantized:
                quantized[d.op_type] = quantized.get(d.op_type, 0) + 1
            else:
                skipped[d.category] = skipped.get(d.category, 0) + 1
        return quantized, skipped
