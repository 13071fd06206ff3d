"""Evaluate FP4 GEMM plugin nodes on ONNX Runtime CPU: rewrite each into standard ops, in place.

``Fp4GemmPlugin(X, w_packed, scales, g[, bias])`` becomes
``Cast(Add(MatMul(Cast(X, float32), W32), bias32), X's type)`` where W32 [K, N] is the float32
dequantized weight (:func:`onnxq.plugins.fp4_gemm.dequantize_fp4_weight`, transposed): the numbers of
:func:`onnxq.plugins.fp4_gemm.fp4_gemm_reference` (float32 accumulation, one rounding to X's type),
up to the summation order of ONNX Runtime's float32 MatMul.

Cases: with and without bias; X already float32 (no Cast); a plugin node whose weight inputs are not
constants is an OnnxqError naming the node. The plugin's opset import is dropped once unused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph.passes import add_initializer, forget_names, unique_name
from onnxq.plugins.description import PluginDescription, fp4_gemm_description
from onnxq.plugins.fp4_gemm import dequantize_fp4_weight


def emulate_fp4_gemm_plugins(model: ir.Model, description: PluginDescription | None = None) -> int:
    """Rewrite every FP4 GEMM plugin node of the main graph into standard ops; return how many."""
    description = description or fp4_gemm_description()
    graph = model.graph
    forget_names(graph)
    nodes = [n for n in graph if n.domain == description.onnx_domain and n.op_type == description.name]
    for node in nodes:
        _emulate_one(graph, node)
    if nodes and not any(n.domain == description.onnx_domain for n in graph):
        model.opset_imports.pop(description.onnx_domain, None)
    return len(nodes)


def _constant(node: ir.Node, index: int) -> np.ndarray:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.const_value is None:
        raise OnnxqError(
            f"cannot emulate plugin node {node.name}: its input {index} is not a constant",
            "feed the plugin's weights, scales and bias from initializers",
        )
    return value.const_value.numpy()


def _emulate_one(graph: ir.Graph, node: ir.Node) -> None:
    x = node.inputs[0]
    assert x is not None
    weight = dequantize_fp4_weight(_constant(node, 1), _constant(node, 2), _constant(node, 3))
    label = node.name or "fp4_gemm"
    new_nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: int) -> ir.Value:
        created = ir.node(
            op_type, inputs, attributes=attributes or None, name=unique_name(graph, f"{label}_{suffix}")
        )
        created.outputs[0].name = unique_name(graph, f"{label}_{suffix}")
        new_nodes.append(created)
        return created.outputs[0]

    x32 = x if x.dtype == ir.DataType.FLOAT else op("Cast", [x], "float32", to=ir.DataType.FLOAT.value)
    w32 = add_initializer(graph, f"{label}_weight_float32", np.ascontiguousarray(weight.T))
    y = op("MatMul", [x32, w32], "matmul")
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        bias32 = add_initializer(graph, f"{label}_bias_float32", _constant(node, 4).astype(np.float32))
        y = op("Add", [y, bias32], "bias")
    if x.dtype != ir.DataType.FLOAT:
        assert x.dtype is not None
        y = op("Cast", [y], "output", to=x.dtype.value)
    graph.insert_before(node, new_nodes)
    output = node.outputs[0]
    name = output.name
    ir.convenience.replace_all_uses_with(output, y, replace_graph_outputs=True)
    output.name = None
    y.name = name
    y.type, y.shape = output.type, output.shape
    inputs = [v for v in node.inputs[1:] if v is not None]
    graph.remove(node, safe=True)
    for value in inputs:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name or "")
