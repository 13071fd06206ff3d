"""Insert QuantizeLinear/DequantizeLinear for a plan.

Weights are stored already quantized (INT8/FP8 initializer + DequantizeLinear), not as float + Q -> DQ,
so the file shrinks and no runtime has to fold anything. Activations get a Q -> DQ pair whose output
replaces the tensor only at the consumer inputs the plan names (or at all consumers for an output
quantized for ONNX Runtime's QLinear fusions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.formats import get_format
from onnxq.formats.base import NumberFormat, QuantParams
from onnxq.graph.passes import forget_names, insert_after_producer, unique_name, values_by_name
from onnxq.placement.plan import QuantizedTensor


@dataclass
class InsertionStats:
    weights: int = 0
    activations: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


def insert_qdq(
    model: ir.Model,
    tensors: list[QuantizedTensor],
    activation_params: dict[str, QuantParams],
    activation_format: NumberFormat,
    weight_format: NumberFormat,
) -> InsertionStats:
    """Rewrite ``model`` in place; activations without parameters are skipped (left float)."""
    graph = model.graph
    forget_names(graph)
    nodes = {node.name: node for node in graph}
    values = values_by_name(graph)
    stats = InsertionStats()
    for tensor in tensors:
        value = values[tensor.name]
        consumers = _consumers(value, tensor, nodes)
        if tensor.role == "weight":
            fmt = _weight_format(tensor, weight_format)
            _quantize_weight(graph, value, tensor.axis, consumers, fmt, stats)
        elif tensor.name in activation_params:
            _quantize_activation(graph, value, consumers, activation_params[tensor.name], activation_format)
            stats.activations += 1
    return stats


def _weight_format(tensor: QuantizedTensor, default: NumberFormat) -> NumberFormat:
    """The rule's INT8 storage grid applies only when weights are INT8 at all."""
    if tensor.int8_weight_format and default.name == "int8":
        return get_format(tensor.int8_weight_format)
    return default


def _consumers(
    value: ir.Value, tensor: QuantizedTensor, nodes: dict[str | None, ir.Node]
) -> list[tuple[ir.Node, int]]:
    if tensor.all_consumers:
        return [(use.node, use.idx) for use in value.uses()]
    return sorted(
        ((nodes[name], index) for name, index in tensor.consumers), key=lambda c: (c[0].name or "", c[1])
    )


def _quantize_activation(
    graph: ir.Graph,
    value: ir.Value,
    consumers: list[tuple[ir.Node, int]],
    params: QuantParams,
    fmt: NumberFormat,
) -> None:
    base = value.name or "tensor"
    scale = _constant(graph, f"{base}_scale", params.scale.astype(_float_dtype(value)))
    zero_point = _constant(graph, f"{base}_zero_point", params.zero_point.astype(fmt.numpy_dtype))
    quantize = ir.node(
        "QuantizeLinear", [value, scale, zero_point], name=unique_name(graph, f"{base}_QuantizeLinear")
    )
    quantize.outputs[0].name = unique_name(graph, f"{base}_quantized")
    dequantize = ir.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale, zero_point],
        name=unique_name(graph, f"{base}_DequantizeLinear"),
    )
    dequantized = dequantize.outputs[0]
    dequantized.name = unique_name(graph, f"{base}_dequantized")
    dequantized.type, dequantized.shape = value.type, value.shape
    quantize.outputs[0].type, quantize.outputs[0].shape = ir.TensorType(fmt.onnx_dtype), value.shape
    insert_after_producer(graph, value, [quantize, dequantize])
    for node, index in consumers:
        node.replace_input_with(index, dequantized)


def _quantize_weight(
    graph: ir.Graph,
    value: ir.Value,
    axis: int | None,
    consumers: list[tuple[ir.Node, int]],
    fmt: NumberFormat,
    stats: InsertionStats,
) -> None:
    assert value.const_value is not None
    weight = value.const_value.numpy()
    params = fmt.weight_params(weight.astype(np.float32), axis)
    quantized = _constant(graph, f"{value.name}_quantized", fmt.quantize(weight.astype(np.float32), params))
    scale = _constant(graph, f"{value.name}_scale", params.scale.astype(weight.dtype))
    zero_point = _constant(graph, f"{value.name}_zero_point", params.zero_point.astype(fmt.numpy_dtype))
    attributes = {"axis": params.axis} if params.axis is not None else {}
    dequantize = ir.node(
        "DequantizeLinear", [quantized, scale, zero_point], attributes=attributes,
        name=unique_name(graph, f"{value.name}_DequantizeLinear"),
    )  # fmt: skip
    dequantize.outputs[0].name = unique_name(graph, f"{value.name}_dequantized")
    dequantize.outputs[0].type, dequantize.outputs[0].shape = value.type, value.shape
    graph.insert_before(consumers[0][0], dequantize)
    for node, index in consumers:
        node.replace_input_with(index, dequantize.outputs[0])
    stats.weights += 1
    stats.weight_bytes_before += value.const_value.nbytes
    stats.weight_bytes_after += quantized.const_value.nbytes if quantized.const_value is not None else 0
    del weight  # the last view of a memory-mapped weight: release() below can then unmap it
    _release(value)


def _release(value: ir.Value) -> None:
    """Drop an unused float weight, and free the pages of memory-mapped external data."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    if not value.uses() and value.graph is not None and not value.is_graph_output():
        value.graph.initializers.pop(value.name or "", None)


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, name)
    tensor = ir.tensor(np.array(array, order="C"), name=name)  # ascontiguousarray would make 0-d arrays 1-d
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _float_dtype(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
