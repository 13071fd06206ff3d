"""Graph clean-up passes run before placement, each small and in place on an ``ir.Model``.

The order matters: constants first (so weights are initializers), then BatchNorm folding (which needs
constant Conv weights), then the opset upgrade and shape inference that placement reads.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx.defs
import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
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


def lift_constant_nodes(model: ir.Model) -> int:
    """Turn ``Constant`` nodes into initializers so that their weights are quantized as weights.

    Cases: tensor ``value`` constants and scalar/list ``value_*`` constants are lifted; a Constant that
    is a graph output stays. Exporters and ``onnx.version_converter`` often emit weights this way; a
    quantizer that only looks at initializers would treat them as activations (per-tensor).
    """
    before = sum(1 for n in model.graph if n.op_type == "Constant")
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    IdentityEliminationPass()(model)
    return before - sum(1 for n in model.graph if n.op_type == "Constant")


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
    weight_value = _new_initializer(
        graph, f"{conv.name or conv.outputs[0].name}_bn_folded_weight", new_weight
    )
    bias_value = _new_initializer(graph, f"{conv.name or conv.outputs[0].name}_bn_folded_bias", new_bias)
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


def _new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
    )
    value.const_value = ir.tensor(array, name=name)
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


def clean_up(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
