"""Replace NVFP4 weight GEMMs (onnxq's nvfp4 weight form) by FP4 GEMM TensorRT plugin nodes.

The pattern, as :func:`onnxq.graph.fp4_weights.insert_nvfp4_weight` writes it::

    S_fp8 --DQ(., g)--> s --DQ(W_fp4, s, axis, block_size=16)--> W' [--Cast(fp16/bf16)--] --> MatMul(X, W')
                                                                                          --> Gemm(X, W', C)

becomes ``Fp4GemmPlugin(X, w_packed, scales, g[, bias])`` (op_type, domain, version and attributes from
the description file), with W transposed to [N, K] (K contiguous) and packed two codes per byte.

Cases handled:
- MatMul with W [K, N] (blocks along axis 0); Gemm with transB=0 (W [K, N], axis 0) or transB=1
  (W [N, K], axis 1), transA=0, alpha=1, and C absent or a constant [N]/[1, N] with beta=1 (it becomes
  the plugin's bias, in X's type);
- X in float16/bfloat16 (the plugin's types); X in float32 gets ``Cast`` to float16 before the plugin and
  back to float32 after it (counted in ``summary.float32_casts``; TensorRT wants FP16 there anyway);
- one weight feeding several GEMMs: one packed initializer, several plugin nodes;
- the DQ chain, the Cast and the FP4/FP8 initializers are removed once nothing else reads them.

Left as they are, with the reason in ``summary.skipped``: X of rank outside the plugin's range or of
unknown type, K not a multiple of ``rules.k_multiple``, a zero point on the DQ, a non-constant global
scale, Gemm with transA, alpha != 1, or a C that is not a constant bias. Main graph only (onnxq plans
block weights in the main graph only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN
from onnxq.graph.passes import DEFAULT_DOMAINS, add_initializer, forget_names, unique_name
from onnxq.plugins.description import PluginDescription, fp4_gemm_description, type_problem
from onnxq.plugins.fp4_gemm import pack_fp4_weight

#: ONNX type names of the description file, by onnx_ir type
TYPE_NAMES: dict[ir.DataType, str] = {
    ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16", ir.DataType.FLOAT: "float",
    ir.DataType.UINT8: "uint8", ir.DataType.FLOAT8E4M3FN: "float8e4m3fn",
}  # fmt: skip
#: activations the plugin does not take but onnxq feeds through a Cast to float16
CAST_TO_FLOAT16 = frozenset({ir.DataType.FLOAT})


@dataclass
class ReplaceSummary:
    #: GEMM node name -> plugin node name
    replaced: dict[str, str] = field(default_factory=dict)
    #: GEMM node name -> why it stayed as it was
    skipped: dict[str, str] = field(default_factory=dict)
    #: plugin nodes whose float32 activations go through Cast to float16 and back
    float32_casts: int = 0

    def describe(self) -> str:
        line = f"{len(self.replaced)} FP4 GEMMs replaced by the plugin"
        if self.float32_casts:
            line += f" ({self.float32_casts} with float32 activations cast to float16)"
        return line + (f", {len(self.skipped)} left as they were" if self.skipped else "")


@dataclass(frozen=True)
class _Fp4Weight:
    """One matched DQ chain: W' = [Cast](DQ(W_fp4, DQ(S_fp8, g)))."""

    values: ir.Value
    scales: ir.Value
    global_scale: ir.Value
    k_axis: int
    chain: tuple[ir.Node, ...]


def replace_fp4_gemms(model: ir.Model, description: PluginDescription | None = None) -> ReplaceSummary:
    """Replace each NVFP4-weight MatMul/Gemm of ``model`` (in place) by the plugin node; see the module doc."""
    description = description or fp4_gemm_description()
    graph = model.graph
    forget_names(graph)
    summary = ReplaceSummary()
    packed_cache: dict[tuple[int, int], tuple[ir.Value, ir.Value, int, int]] = {}
    for node in [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in DEFAULT_DOMAINS]:
        weight = _match_weight(node)
        if weight is None:
            continue
        name = node.name or node.op_type
        problem = _gemm_problem(node, weight, description)
        if problem:
            summary.skipped[name] = problem
            continue
        key = (id(weight.values), weight.k_axis)
        if key not in packed_cache:
            packed_cache[key] = _packed_weight(graph, weight)
        plugin = _insert_plugin(graph, node, weight, packed_cache[key], description, summary)
        summary.replaced[name] = plugin.name or ""
        _remove_unused(graph, list(weight.chain))
    if summary.replaced:
        model.opset_imports[description.onnx_domain] = description.onnx_domain_version
    return summary


# --- matching -------------------------------------------------------------------------------------


def _match_weight(node: ir.Node) -> _Fp4Weight | None:
    """The NVFP4 DQ chain feeding the GEMM's second input, or None when it is not one."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    chain: list[ir.Node] = []
    producer = node.inputs[1].producer()
    if producer is not None and producer.op_type == "Cast" and producer.domain in DEFAULT_DOMAINS:
        chain.append(producer)
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if not _is_dq(producer):
        return None
    assert producer is not None
    values, scale = producer.inputs[0], producer.inputs[1]
    if (
        values is None
        or values.const_value is None
        or values.dtype != ir.DataType.FLOAT4E2M1
        or scale is None
    ):
        return None
    scale_dq = scale.producer()
    if not _is_dq(scale_dq):
        return None
    assert scale_dq is not None
    scales, global_scale = scale_dq.inputs[0], scale_dq.inputs[1]
    if scales is None or scales.const_value is None or scales.dtype != ir.DataType.FLOAT8E4M3FN:
        return None
    if global_scale is None:
        return None
    chain = [*chain, producer, scale_dq]
    k_axis = producer.attributes.get_int("axis", 1) % 2
    return _Fp4Weight(values, scales, global_scale, k_axis, tuple(chain))


def _is_dq(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS


def _gemm_problem(node: ir.Node, weight: _Fp4Weight, description: PluginDescription) -> str | None:
    """Why this GEMM cannot become the plugin node (one line), or None."""
    value_dq, scale_dq = weight.chain[-2], weight.chain[-1]
    if any(len(dq.inputs) > 2 and dq.inputs[2] is not None for dq in (value_dq, scale_dq)):
        return "its DequantizeLinear has a zero point"
    if value_dq.attributes.get_int("block_size", 0) != description.block_size:
        return f"block size {value_dq.attributes.get_int('block_size', 0)}, the plugin takes {description.block_size}"
    g = weight.global_scale.const_value
    if g is None or g.size != 1:
        return "its global scale is not a constant scalar"
    x = node.inputs[0]
    if x is None or x.dtype is None:
        return "its activation has no known type"
    x_spec = description.inputs[description.input_index("x")]
    rank = len(x.shape) if x.shape is not None else None
    if rank is None or not (x_spec.min_rank or 0) <= rank <= (x_spec.max_rank or rank):
        return f"its activation has rank {rank}, the plugin takes {x_spec.min_rank}..{x_spec.max_rank}"
    k = weight.values.const_value.shape.numpy()[weight.k_axis] if weight.values.const_value is not None else 0
    if k % description.k_multiple:
        return f"K = {k} is not a multiple of {description.k_multiple}"
    expected_axis = 0 if node.op_type == "MatMul" or not node.attributes.get_int("transB", 0) else 1
    if weight.k_axis != expected_axis:
        return "its FP4 blocks do not run along the GEMM's reduction axis"
    if node.op_type == "Gemm":
        problem = _gemm_attribute_problem(node)
        if problem:
            return problem
    x_type = _plugin_x_type(x.dtype)
    types = [TYPE_NAMES.get(x_type, str(x_type)), "uint8", "float8e4m3fn", "float"]
    if _bias(node) is not None:
        types.append(types[0])
    return type_problem(description, [*types, types[0]])


def _gemm_attribute_problem(node: ir.Node) -> str | None:
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if node.attributes.get_float("alpha", 1.0) != 1.0:
        return "Gemm with alpha != 1"
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None
    if c.const_value is None or node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm whose C is not a constant bias with beta = 1"
    n = node.outputs[0].shape[-1] if node.outputs[0].shape is not None else None
    shape = tuple(c.const_value.shape)
    if shape not in ((n,), (1, n)):
        return f"Gemm whose C {list(shape)} is not a bias of N values"
    return None


def _plugin_x_type(dtype: ir.DataType) -> ir.DataType:
    return ir.DataType.FLOAT16 if dtype in CAST_TO_FLOAT16 else dtype


def _bias(node: ir.Node) -> ir.Value | None:
    if node.op_type != "Gemm" or len(node.inputs) < 3:
        return None
    return node.inputs[2]


# --- rewriting ------------------------------------------------------------------------------------


def _packed_weight(graph: ir.Graph, weight: _Fp4Weight) -> tuple[ir.Value, ir.Value, int, int]:
    """(w_packed uint8 [N, K/2], scales FP8 [N, K/16], N, K) initializers, W transposed to [N, K]."""
    assert weight.values.const_value is not None and weight.scales.const_value is not None
    values = weight.values.const_value.numpy()
    scales = weight.scales.const_value.numpy().astype(FLOAT8_E4M3FN)
    if weight.k_axis == 0:  # MatMul W[K, N]: the plugin reads rows of K
        values, scales = values.T, scales.T
    n, k = values.shape
    base = weight.values.name or "weight"
    packed = add_initializer(graph, f"{base}_packed", pack_fp4_weight(values))
    scales_nk = add_initializer(graph, f"{base}_scales_nk", np.ascontiguousarray(scales))
    return packed, scales_nk, n, k


def _insert_plugin(
    graph: ir.Graph,
    node: ir.Node,
    weight: _Fp4Weight,
    packed: tuple[ir.Value, ir.Value, int, int],
    description: PluginDescription,
    summary: ReplaceSummary,
) -> ir.Node:
    w_packed, scales, n, k = packed
    x = node.inputs[0]
    assert x is not None and x.dtype is not None
    output = node.outputs[0]
    plugin_type = _plugin_x_type(x.dtype)
    before: list[ir.Node] = []
    if plugin_type != x.dtype:
        before.append(_cast(graph, x, plugin_type, f"{node.name}_input"))
        x = before[-1].outputs[0]
    inputs: list[ir.Value | None] = [x, w_packed, scales, weight.global_scale]
    bias = _bias(node)
    if bias is not None:
        inputs.append(_bias_initializer(graph, bias, plugin_type, n))
    attributes = description.onnx_attributes({"k": k, "n": n})
    plugin = ir.node(
        description.name, inputs, attributes=attributes, domain=description.onnx_domain,
        name=unique_name(graph, f"{node.name or node.op_type}_{description.name}"),
    )  # fmt: skip
    result = plugin.outputs[0]
    result.type, result.shape = ir.TensorType(plugin_type), output.shape
    after: list[ir.Node] = []
    if plugin_type != output.dtype:
        assert output.dtype is not None
        after.append(_cast(graph, result, output.dtype, f"{node.name}_output"))
        result = after[-1].outputs[0]
        summary.float32_casts += 1
    graph.insert_before(node, [*before, plugin, *after])
    name = output.name
    ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
    output.name = None
    result.name = name
    result.type, result.shape = output.type, output.shape
    replaced_inputs = [v for v in node.inputs[2:] if v is not None]  # Gemm's C, now the bias copy
    graph.remove(node, safe=True)
    _drop_unread_initializers(graph, replaced_inputs)
    return plugin


def _cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType, label: str) -> ir.Node:
    cast = ir.node("Cast", [value], attributes={"to": dtype.value}, name=unique_name(graph, f"{label}_Cast"))
    cast.outputs[0].name = unique_name(graph, f"{label}_{dtype.name.lower()}")
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
    return cast


def _bias_initializer(graph: ir.Graph, bias: ir.Value, dtype: ir.DataType, n: int) -> ir.Value:
    assert bias.const_value is not None
    array = bias.const_value.numpy().reshape(n).astype(dtype.numpy())
    return add_initializer(graph, f"{bias.name or 'bias'}_{dtype.name.lower()}", array)


def _remove_unused(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove the chain nodes nothing reads any more, then initializers left unread."""
    inputs: list[ir.Value] = []
    for node in nodes:
        if node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs.extend(v for v in node.inputs if v is not None)
        graph.remove(node, safe=True)
    _drop_unread_initializers(graph, inputs)


def _drop_unread_initializers(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name or "")
