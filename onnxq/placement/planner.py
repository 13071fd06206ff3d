"""Build the placement plan: every candidate node gets a decision and a reason.

First pass, in topological order: the node's rule (first rule listing its op type) decides, after the
user's filters. Second pass, backwards: rules that depend on their neighbours (pooling, Concat).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir

from onnxq.placement.infinite import find_infinite_tensors
from onnxq.placement.matchers import MATCHERS, SECOND_PASS_KINDS, Context, Skip
from onnxq.placement.plan import NodeDecision, Plan
from onnxq.placement.rules import Rule, RuleSet


@dataclass(frozen=True)
class PlacementOptions:
    #: only these op types are quantized (None: all that the rules cover)
    op_types: tuple[str, ...] | None = None
    #: nodes whose name matches are left in float
    exclude_nodes: str | None = None
    #: quantize attention BMMs (MatMul of two activations)
    quantize_bmm: bool = True


def plan_placement(model: ir.Model, rules: RuleSet, options: PlacementOptions | None = None) -> Plan:
    options = options or PlacementOptions()
    graph = model.graph
    plan = Plan(target=rules.target)
    context = Context(
        graph=graph,
        plan=plan,
        infinite=find_infinite_tensors(graph),
        quantize_bmm=options.quantize_bmm,
        quantize_graph_outputs=rules.quantize_graph_outputs,
        order={node.name or "": index for index, node in enumerate(graph)},
    )
    plan.nonfinite.update(context.infinite)
    candidates = [(node, rule) for node in graph if (rule := rules.rule_for(node.op_type)) is not None]
    second_pass = []
    for node, rule in candidates:
        if rule.kind in SECOND_PASS_KINDS:
            second_pass.append((node, rule))
        else:
            plan.decisions.append(_decide(node, rule, context, options))
    for node, rule in reversed(second_pass):
        plan.decisions.append(_decide(node, rule, context, options))
    plan.decisions.sort(key=lambda d: context.order.get(d.node, -1))
    return plan


def _decide(node: ir.Node, rule: Rule, context: Context, options: PlacementOptions) -> NodeDecision:
    name = node.name or ""
    filtered = _user_filter(node, options)
    result = filtered or MATCHERS[rule.kind](node, rule, context)
    if isinstance(result, Skip):
        return NodeDecision(name, node.op_type, rule.name, False, result.reason, result.category)
    return NodeDecision(name, node.op_type, rule.name, True, _quantized_reason(rule), "", list(result))


def _user_filter(node: ir.Node, options: PlacementOptions) -> Skip | None:
    if options.op_types is not None and node.op_type not in options.op_types:
        return Skip(f"{node.op_type} not in --op-types", "excluded by user")
    if options.exclude_nodes and re.search(options.exclude_nodes, node.name or ""):
        return Skip(f"name matches --exclude-nodes {options.exclude_nodes!r}", "excluded by user")
    return None


def _quantized_reason(rule: Rule) -> str:
    return f"rule {rule.name} ({rule.kind})"
