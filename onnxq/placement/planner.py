"""Build the placement plan: every candidate node gets a decision and a reason.

First pass, in topological order: the node's rule (first rule listing its op type) decides, after the
user's filters. Second pass, backwards: rules that depend on their neighbours (pooling, Concat).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import onnx_ir as ir

from onnxq.graph import passes
from onnxq.placement.infinite import find_infinite_tensors
from onnxq.placement.matchers import MATCHERS, SECOND_PASS_KINDS, Context, Skip
from onnxq.placement.plan import NodeDecision, Plan
from onnxq.placement.rules import Rule, RuleSet

logger = logging.getLogger(__name__)

SUBGRAPH_REASON = "subgraph tensors cannot be calibrated through ONNX Runtime"
FUNCTION_REASON = "function bodies are not quantized"


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
    nested = nested_decisions(model, rules)
    plan.decisions += nested
    plan.notes += passes.notes(model)
    if nested:
        plan.notes.append(_nested_note(nested))
        logger.warning("%s (see --explain)", plan.notes[-1])
    return plan


def _nested_note(nested: list[NodeDecision]) -> str:
    """One line for the plan's notes: how many nodes stay float inside bodies and functions, and why."""
    in_functions = sum(1 for d in nested if d.category == "inside function")
    in_bodies = len(nested) - in_functions
    parts = [f"{in_bodies} inside If/Loop/Scan bodies ({SUBGRAPH_REASON})"] if in_bodies else []
    parts += [f"{in_functions} inside local functions ({FUNCTION_REASON})"] if in_functions else []
    return f"{len(nested)} candidate nodes stay float: {'; '.join(parts)}"


def nested_decisions(model: ir.Model, rules: RuleSet) -> list[NodeDecision]:
    """Nodes a rule covers inside ``If``/``Loop``/``Scan`` bodies and local functions: left float.

    ONNX Runtime can only fetch main-graph tensors, so activations inside a body cannot be
    calibrated; each such node is listed with where it sits, so the plan says why it stays float.
    Cases: bodies of main-graph nodes (nested bodies named by their innermost owner); function
    bodies (and bodies inside them).
    """
    decisions: list[NodeDecision] = []
    for node in model.graph:
        decisions += _body_decisions(node, rules)
    for function in model.functions.values():
        where = f"inside local function '{function.domain}:{function.name}'"
        for index, inner in enumerate(function):
            decisions += _decisions_for(inner, index, where, "inside function", FUNCTION_REASON, rules)
            decisions += _body_decisions(inner, rules)
    return decisions


def _body_decisions(owner: ir.Node, rules: RuleSet) -> list[NodeDecision]:
    decisions: list[NodeDecision] = []
    for attribute_name, body in _bodies(owner):
        where = f"inside {owner.op_type} body '{attribute_name}' of node {owner.name}"
        for index, node in enumerate(body):
            decisions += _decisions_for(node, index, where, "inside subgraph", SUBGRAPH_REASON, rules)
            decisions += _body_decisions(node, rules)
    return decisions


def _bodies(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    bodies: list[tuple[str, ir.Graph]] = []
    for name, attribute in node.attributes.items():
        if attribute.type == ir.AttributeType.GRAPH:
            bodies.append((name, attribute.as_graph()))
        elif attribute.type == ir.AttributeType.GRAPHS:
            bodies += [(f"{name}[{i}]", graph) for i, graph in enumerate(attribute.as_graphs())]
    return bodies


def _decisions_for(
    node: ir.Node, index: int, where: str, category: str, why: str, rules: RuleSet
) -> list[NodeDecision]:
    rule = rules.rule_for(node.op_type)
    if rule is None:
        return []
    name = node.name or f"{where}#{index}"
    return [NodeDecision(name, node.op_type, rule.name, False, f"{where}: {why}", category)]


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
