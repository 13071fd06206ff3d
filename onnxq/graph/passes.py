"""Graph clean-up passes run before placement, each small and in place on an ``ir.Model``.

The order matters: local functions inlined first (their nodes become plannable), then constants (so
weights are initializers, in subgraphs too), then Ifs with a constant condition inlined (a lifted
Constant condition is a known value), then BatchNorm folding (which needs constant Conv weights),
then the opset upgrade, the repair of declared shapes that inference contradicts, and the shape
inference that placement reads.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx.defs
import onnx_ir as ir
from onnx_ir.passes.common import (
    InlinePass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
    TopologicalSortPass,
)

from onnxq.errors import OnnxqError
from onnxq.model_io import convert_opset

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def inline_functions(model: ir.Model) -> int:
    """Inline calls of the model's local functions; return how many functions there were.

    ONNX Runtime inlines them itself when it loads the model, so the computation is unchanged; once
    inlined, their Conv/MatMul nodes are main-graph nodes that can be planned and calibrated. Cases:
    no functions (nothing done); inlining fails (functions kept: the plan lists their nodes as float).
    """
    count = len(model.functions)
    if not count:
        return 0
    try:
        InlinePass()(model)
    except Exception as error:  # an onnx_ir limitation must not stop quantization
        logger.warning("local functions kept (cannot inline them: %s); their nodes stay float", error)
        return 0
    return count - len(model.functions)


def lift_constant_nodes(model: ir.Model) -> int:
    """Turn ``Constant`` nodes into initializers so that their weights are quantized as weights.

    Cases: tensor ``value`` constants and scalar/list ``value_*`` constants are lifted; a Constant that
    is a graph output stays. Constants inside ``If``/``Loop``/``Scan`` bodies become initializers of
    that body (ONNX and ONNX Runtime accept subgraph initializers). Exporters and
    ``onnx.version_converter`` often emit weights this way; a quantizer that only looks at
    initializers would treat them as activations (per-tensor). Returns how many were lifted.
    """
    _check_constant_nodes(model)
    before = _count_constants(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    eliminate_identities(model)
    return before - _count_constants(model)


#: a Constant node holds its value in exactly one of these attributes, each of one attribute type
CONSTANT_ATTRIBUTES = {
    "value": ir.AttributeType.TENSOR,
    "sparse_value": ir.AttributeType.SPARSE_TENSOR,
    "value_float": ir.AttributeType.FLOAT,
    "value_floats": ir.AttributeType.FLOATS,
    "value_int": ir.AttributeType.INT,
    "value_ints": ir.AttributeType.INTS,
    "value_string": ir.AttributeType.STRING,
    "value_strings": ir.AttributeType.STRINGS,
}


def _check_constant_nodes(model: ir.Model) -> None:
    """A malformed Constant (no value attribute, several, or one of the wrong type) is a corrupt
    model: refused in one line naming the node, instead of failing deep inside a pass."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
            continue
        held = [(name, attribute.type) for name, attribute in node.attributes.items()]
        valid = [name for name, kind in held if CONSTANT_ATTRIBUTES.get(name) == kind]
        if len(held) != 1 or len(valid) != 1:
            found = ", ".join(f"{name} ({kind.name})" for name, kind in held) or "none"
            raise OnnxqError(
                f"Constant node {node.name!r} (output {node.outputs[0].name!r}) is malformed: it needs "
                f"exactly one value attribute of the right type, found {found}",
                "re-export the model; the file may be corrupt",
            )


def _count_constants(model: ir.Model) -> int:
    return sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "Constant")


def eliminate_identities(model: ir.Model) -> int:
    """Remove ``Identity`` nodes whose input can stand for their output; return how many.

    Cases: output used only inside the graph (uses rewired to the input, nested bodies included);
    output is a graph output and the input is computed by a node of the *same* graph (the input
    takes the output's name). Kept: input is a graph input or initializer and output a graph output;
    input comes from an enclosing graph (an ``If`` branch that returns an outer value: onnx_ir's
    IdentityEliminationPass moves the outer value into the branch's outputs, which breaks the
    model or raises "already an output of a different graph"); input is already a graph output.
    """
    removed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if _removable_identity(node):
            _remove_identity(node)
            removed += 1
    return removed


def _removable_identity(node: ir.Node) -> bool:
    if node.op_type != "Identity" or node.domain not in DEFAULT_DOMAINS:
        return False
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return False
    source, output = node.inputs[0], node.outputs[0]
    if not output.is_graph_output():
        return True
    producer = source.producer()
    return (
        producer is not None
        and producer.graph is node.graph
        and not source.is_graph_output()
        and source.name is not None
    )


def _remove_identity(node: ir.Node) -> None:
    source, output = node.inputs[0], node.outputs[0]
    assert source is not None and node.graph is not None
    if source.type is None:
        source.type = output.type
    if source.shape is None:
        source.shape = output.shape
    was_output, name = output.is_graph_output(), output.name
    output.replace_all_uses_with(source, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    if was_output:  # the graph's output keeps its name
        source.name = name


def inline_constant_ifs(model: ir.Model) -> int:
    """Replace each main-graph ``If`` whose condition is a constant by the branch it always takes.

    Its nodes then sit in the main graph, where they can be planned and calibrated (ONNX Runtime
    cannot fetch tensors inside a branch). Cases: condition computed at run time (kept); constant
    true/false (inlined, nested Ifs of that branch included, as they then reach the main graph);
    a branch output that is an outer value or a branch initializer (an Identity keeps the If's
    output name). Ends: every round removes one If and adds none that was not already in the model.
    """
    inlined = 0
    while (node := _constant_if(model.graph)) is not None:
        condition = node.inputs[0]
        assert condition is not None and condition.const_value is not None
        taken = "then_branch" if bool(condition.const_value.numpy().reshape(-1)[0]) else "else_branch"
        _inline_branch(model.graph, node, node.attributes[taken].as_graph())
        inlined += 1
    if inlined:
        eliminate_identities(model)
    return inlined


def _constant_if(graph: ir.Graph) -> ir.Node | None:
    for node in graph:
        if node.op_type == "If" and node.domain in DEFAULT_DOMAINS and node.inputs:
            condition = node.inputs[0]
            if (
                condition is not None
                and condition.const_value is not None
                and condition.const_value.size == 1
            ):
                return node
    return None


def _inline_branch(graph: ir.Graph, node: ir.Node, branch: ir.Graph) -> None:
    forget_names(graph)
    results = list(branch.outputs)
    branch.outputs.clear()  # a value may be the output of one graph only
    for name in list(branch.initializers):
        value = branch.initializers.pop(name)
        value.name = unique_name(graph, name)
        graph.register_initializer(value)
    moved = list(branch)
    branch.remove(moved)
    for inner in moved:
        inner.name = unique_name(graph, inner.name or inner.op_type)
    graph.insert_before(node, moved)
    renames = []
    for output, result in zip(node.outputs, results):
        identity = ir.node("Identity", [result], name=unique_name(graph, f"{node.name or 'If'}_inlined"))
        identity.outputs[0].type, identity.outputs[0].shape = output.type, output.shape
        graph.insert_before(node, identity)
        output.replace_all_uses_with(identity.outputs[0], replace_graph_outputs=True)
        renames.append((identity.outputs[0], output.name))
    graph.remove(node, safe=True)
    for value, if_name in renames:  # the If's outputs keep their names (graph outputs included)
        value.name = if_name


def fold_batch_norm(model: ir.Model) -> int:
    """Fold inference-mode BatchNormalization into the Conv before it.

    Cases folded: Conv with constant weight (and optional constant bias) whose only consumer is a
    BatchNormalization with constant scale/bias/mean/var and one output. Anything else is left alone
    (TensorRT fuses such BN itself; quantizing around it is still correct).
    """
    forget_names(model.graph)
    folded = 0
    for batch_norm in [n for n in model.graph if n.op_type == "BatchNormalization"]:
        conv = batch_norm.inputs[0].producer() if batch_norm.inputs[0] is not None else None
        if conv is not None and _can_fold(conv, batch_norm):
            _fold_pair(model.graph, conv, batch_norm)
            folded += 1
    return folded


def _can_fold(conv: ir.Node, batch_norm: ir.Node) -> bool:
    if conv.op_type != "Conv" or len(conv.outputs[0].uses()) != 1 or len(batch_norm.outputs) != 1:
        return False
    if conv.outputs[0].is_graph_output():
        return False
    constants = [*conv.inputs[1:], *batch_norm.inputs[1:5]]
    return all(v is not None and v.const_value is not None for v in constants)


def _fold_pair(graph: ir.Graph, conv: ir.Node, batch_norm: ir.Node) -> None:
    scale, bias, mean, var = (_array(v) for v in batch_norm.inputs[1:5])
    epsilon = batch_norm.attributes.get_float("epsilon", 1e-5)
    factor = scale / np.sqrt(var + epsilon)
    weight = _array(conv.inputs[1])
    conv_bias = _array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else 0.0
    new_weight = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
    new_bias = ((conv_bias - mean) * factor + bias).astype(weight.dtype)
    weight_value = add_initializer(graph, f"{conv.name or conv.outputs[0].name}_bn_folded_weight", new_weight)
    bias_value = add_initializer(graph, f"{conv.name or conv.outputs[0].name}_bn_folded_bias", new_bias)
    conv.replace_input_with(1, weight_value)
    if len(conv.inputs) > 2:
        conv.replace_input_with(2, bias_value)
    else:
        conv.resize_inputs(3)
        conv.replace_input_with(2, bias_value)
    output_name = batch_norm.outputs[0].name
    was_graph_output = batch_norm.outputs[0].is_graph_output()
    batch_norm.outputs[0].replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
    graph.remove(batch_norm, safe=True)
    if was_graph_output:  # the model's output keeps its name
        conv.outputs[0].name = output_name


def _array(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None
    return value.const_value.numpy()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array`` under a unique name derived from ``name``, typed and shaped."""
    name = unique_name(graph, name)
    stored = np.array(array, order="C")  # ascontiguousarray would make 0-d arrays 1-d
    tensor = ir.tensor(stored, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(stored.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


_NAMES_KEY = "onnxq_names"


def forget_names(graph: ir.Graph) -> None:
    """Drop the name cache: passes call this first, since other code may have added values since."""
    graph.meta.pop(_NAMES_KEY, None)


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value or node name not yet used in ``graph`` (deterministic: base, base_1, base_2...).

    Taken names are scanned once and cached; names handed out here join the cache. A pass that
    adds values calls ``forget_names`` first and then names everything it adds through here.
    """
    taken: set[str] | None = graph.meta.get(_NAMES_KEY)
    if taken is None:
        taken = _all_value_names(graph)
        graph.meta[_NAMES_KEY] = taken
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph: inputs, initializers and node outputs."""
    values = {v.name: v for v in graph.inputs if v.name}
    values.update({v.name: v for v in graph.initializers.values() if v.name})
    values.update({v.name: v for node in graph for v in node.outputs if v.name})
    return values


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` right after ``value`` is computed (first in the graph for a graph input)."""
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)


def _all_value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    names |= {v.name for node in graph for v in node.outputs}
    names |= {node.name for node in graph if node.name}
    return {n for n in names if n}


def upgrade_opset(model: ir.Model, target: int) -> bool:
    """Raise the default-domain opset to ``target``; return whether it changed.

    Cases: already at or above ``target`` (no change); every op used has the same schema at both
    opsets (only the import is bumped, which keeps external weights untouched); otherwise the ONNX
    version converter rewrites the graph, and a failure is an error rather than an invalid model.
    """
    current = default_opset(model)
    if current >= target:
        return False
    changed_ops = sorted(
        {
            n.op_type
            for n in model.graph
            if n.domain in DEFAULT_DOMAINS and _schema_changes(n.op_type, current, target)
        }
    )
    if not changed_ops:
        model.opset_imports[""] = target
        return True
    logger.info(
        "converting opset %d -> %d (ops with new schemas: %s)", current, target, ", ".join(changed_ops)
    )
    _convert_with_onnx(model, target, changed_ops)
    return True


def _schema_changes(op_type: str, old: int, new: int) -> bool:
    try:
        return (
            onnx.defs.get_schema(op_type, old).since_version
            != onnx.defs.get_schema(op_type, new).since_version
        )
    except onnx.defs.SchemaError:
        return True


def _convert_with_onnx(model: ir.Model, target: int, changed_ops: list[str]) -> None:
    try:
        converted = convert_opset(model, target)
    except Exception as error:
        raise OnnxqError(
            f"cannot upgrade the model from opset {default_opset(model)} to {target} (ops {', '.join(changed_ops)}): {error}",
            f"re-export the model at opset >= {target}",
        ) from error
    model.graph = converted.graph
    model.opset_imports[""] = target
    lift_constant_nodes(model)


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference merged into the IR (weights are not serialized for it)."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)


#: graph meta key: notes for the plan, left by passes (``placement.planner`` copies them to ``Plan.notes``)
NOTES_KEY = "onnxq_notes"


def add_note(model: ir.Model, note: str) -> None:
    model.graph.meta.setdefault(NOTES_KEY, []).append(note)


def notes(model: ir.Model) -> list[str]:
    return list(model.graph.meta.get(NOTES_KEY, []))


def repair_declared_shapes(model: ir.Model) -> list[str]:
    """Replace declared shapes of computed values that ONNX shape inference contradicts; return notes.

    Some exporters declare output/value_info shapes the graph does not produce; the strict checker
    then rejects the quantized model ("Inferred shape and existing shape differ"). Every node output
    (graph outputs included, subgraphs too) is inferred afresh without its declared shape, then:
    inferred nothing (declared shape kept, negative dims made dynamic); agrees (declared and inferred
    merged, static dims win); contradicts (different rank or a different static dim: the inferred
    shape replaces it, and a note says so). Dtypes are kept; graph inputs are the model's contract
    and are not touched. Each note is also left on the model for the plan (see ``notes``).
    """
    declared = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.shape is not None:
                declared[value] = value.shape
                value.shape = None
    if not declared:
        return []
    found: list[str] = []
    # A value inference left unknown may become known once its neighbours' shapes are back (an exporter's
    # declared shape upstream feeds what inference cannot derive): a second round re-infers those.
    for round_number in range(1, REPAIR_ROUNDS + 1):
        infer_shapes(model)
        unknown = _merge_declared(declared, found)
        if not unknown or round_number == REPAIR_ROUNDS:
            break
        declared = {value: value.shape for value in unknown if value.shape is not None}
        for value in declared:
            value.shape = None
    for note in found:
        add_note(model, note)
    if found:
        logger.info("%d declared shapes contradicted by shape inference were replaced", len(found))
    return found


#: inference rounds of ``repair_declared_shapes``: the first without any declared shape, the second
#: with the merged shapes back and only the still-unknown values cleared
REPAIR_ROUNDS = 2


def _merge_declared(declared: dict[ir.Value, ir.Shape], found: list[str]) -> list[ir.Value]:
    """Merge inferred shapes into declared ones (notes for contradictions); the values inferred nothing."""
    unknown = []
    for value, shape in declared.items():
        if value.shape is None:
            unknown.append(value)
        merged = _merged_shape(shape, value.shape)
        if merged is None:  # contradiction: keep what inference says the graph computes
            found.append(
                f"declared shape {_shape_text(shape)} of {value.name} contradicts the inferred "
                f"{_shape_text(value.shape)}: replaced"
            )
            continue
        value.shape = merged
    return unknown


def _merged_shape(declared: ir.Shape, inferred: ir.Shape | None) -> ir.Shape | None:
    """Declared and inferred dims merged (static first), or None when they contradict each other."""
    mine = [d if not (isinstance(d, int) and d < 0) else ir.SymbolicDim(None) for d in declared]
    if inferred is None:
        return ir.Shape(mine)
    if len(mine) != len(inferred):
        return None
    merged: list[int | ir.SymbolicDim] = []
    for left, right in zip(mine, inferred):
        if isinstance(left, int) and isinstance(right, int) and left != right:
            return None
        if isinstance(left, int) or isinstance(right, int):
            merged.append(left if isinstance(left, int) else right)
        else:  # both symbolic: a named dim tells more than an anonymous one
            merged.append(left if left.value is not None else right)
    return ir.Shape(merged)


def _shape_text(shape: ir.Shape | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def clean_up(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
