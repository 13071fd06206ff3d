"""Insert QuantizeLinear/DequantizeLinear for a plan.

Weights are stored already quantized (INT8/FP8 initializer + DequantizeLinear), not as float + Q -> DQ,
so the file shrinks and no runtime has to fold anything. Activations get a Q -> DQ pair whose output
replaces the tensor only at the consumer inputs the plan names (or at all consumers for an output
quantized for ONNX Runtime's QLinear fusions).

Scales have the tensor's own float type (float16 scales for a float16 tensor), so DequantizeLinear
outputs the type its consumer had. QuantizeLinear takes float16/bfloat16 only from opset 19: callers
raise the opset to :func:`required_opset` before inserting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq.formats import get_format
from onnxq.formats.base import NumberFormat, QuantParams
from onnxq.graph.passes import (
    add_initializer,
    forget_names,
    insert_after_producer,
    unique_name,
    values_by_name,
)
from onnxq.placement.plan import QuantizedTensor

#: float types that QuantizeLinear/DequantizeLinear accept only from opset 19 (scale of the same type)
LOW_PRECISION_FLOATS = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
LOW_PRECISION_FLOAT_OPSET = 19


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
    """Rewrite ``model`` in place; activations without parameters are skipped (left float).

    Raises ValueError for a float16/bfloat16 tensor in a model below opset 19 (the Q/DQ would be invalid).
    """
    graph = model.graph
    forget_names(graph)
    nodes = {node.name: node for node in graph}
    values = values_by_name(graph)
    stats = InsertionStats()
    for tensor in tensors:
        value = values[tensor.name]
        _check_opset(model, value)
        consumers = _consumers(value, tensor, nodes)
        if tensor.role == "weight":
            fmt = _weight_format(tensor, weight_format)
            _quantize_weight(graph, value, tensor.axis, consumers, fmt, stats)
        elif tensor.name in activation_params:
            _quantize_activation(graph, value, consumers, activation_params[tensor.name], activation_format)
            stats.activations += 1
    return stats


def required_opset(model: ir.Model) -> int:
    """Lowest default-domain opset the Q/DQ of ``model`` needs for its float types: 19 when any tensor
    (graph inputs, initializers, typed values, Cast/Constant targets, subgraphs included) is
    float16/bfloat16, else 0 (no requirement)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        values = [*graph.inputs, *graph.initializers.values()]
        values += [output for node in graph for output in node.outputs]
        if any(v.dtype in LOW_PRECISION_FLOATS for v in values):
            return LOW_PRECISION_FLOAT_OPSET
        if any(_makes_low_precision(node) for node in graph):
            return LOW_PRECISION_FLOAT_OPSET
    return 0


def _makes_low_precision(node: ir.Node) -> bool:
    """A Cast to, or a Constant holding, float16/bfloat16 (types not inferred yet). Malformed
    attributes (wrong attribute type, unknown type code) count as not low precision: never a crash."""
    attribute = node.attributes.get({"Cast": "to", "Constant": "value"}.get(node.op_type, ""))
    if attribute is None:
        return False
    if attribute.type == ir.AttributeType.INT:
        return attribute.value in {t.value for t in LOW_PRECISION_FLOATS}
    if attribute.type == ir.AttributeType.TENSOR:
        return attribute.value.dtype in LOW_PRECISION_FLOATS
    return False


def _check_opset(model: ir.Model, value: ir.Value) -> None:
    opset = model.opset_imports.get("", 0)
    if value.dtype in LOW_PRECISION_FLOATS and opset < LOW_PRECISION_FLOAT_OPSET:
        raise ValueError(
            f"{value.name} is {value.dtype.name}: QuantizeLinear/DequantizeLinear take it only from opset "
            f"{LOW_PRECISION_FLOAT_OPSET} (the model has {opset}); raise the opset first"
        )


def scale_in_type(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``scale`` in the tensor's float type, clamped to that type's normal range.

    Cases: float32 (unchanged: formats already keep scales >= float32's smallest normal); float16 (a
    scale below 2**-14 would be subnormal, i.e. lose precision down to one significant bit, or flush
    to 0 in runtimes that drop subnormals, and ``x / 0`` is inf; above 65504 it would be inf);
    bfloat16 (same exponent range as float32, only rounded).
    """
    info = ml_dtypes.finfo(dtype)
    clamped = np.clip(np.asarray(scale, np.float32), float(info.smallest_normal), float(info.max))
    return clamped.astype(dtype)


def params_in_type(params: QuantParams, dtype: np.dtype) -> QuantParams:
    """``params`` with the scale the graph will store: quantizing with it keeps codes and DQ consistent."""
    return replace(params, scale=scale_in_type(params.scale, dtype))


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
    scale = add_initializer(graph, f"{base}_scale", scale_in_type(params.scale, _float_dtype(value)))
    zero_point = add_initializer(graph, f"{base}_zero_point", params.zero_point.astype(fmt.numpy_dtype))
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
    weight32 = weight.astype(np.float32)
    # codes are computed with the scale as stored (float16 rounds it), so DQ gives back these very values
    params = params_in_type(fmt.weight_params(weight32, axis), weight.dtype)
    quantized = add_initializer(graph, f"{value.name}_quantized", fmt.quantize(weight32, params))
    scale = add_initializer(graph, f"{value.name}_scale", params.scale)
    zero_point = add_initializer(graph, f"{value.name}_zero_point", params.zero_point.astype(fmt.numpy_dtype))
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
    del weight, weight32  # the last view of a memory-mapped weight: release() below can then unmap it
    _release(value)


def _release(value: ir.Value) -> None:
    """Drop an unused float weight, and free the pages of memory-mapped external data."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    if not value.uses() and value.graph is not None and not value.is_graph_output():
        value.graph.initializers.pop(value.name or "", None)


def _float_dtype(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
