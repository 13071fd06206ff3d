"""Block-scaled MatMul weights in TensorRT's form (NVFP4, MXFP8), and their emulation for ONNX Runtime CPU.

NVFP4 weight W[K, N] (the MatMul's second input; blocks of 16 along K, axis 0)::

    W_fp4 (FLOAT4E2M1) ---------------------------------> DequantizeLinear(axis=0, block_size=16) -> W'
    block_scale (FLOAT8E4M3FN) -> DequantizeLinear(., global_scale FLOAT) -^

DequantizeLinear takes no FP8 scale, so the FP8 block scales are themselves dequantized by the FP32
global scale first (two chained standard DQs, what TensorRT's ONNX parser reads). Opset 23, IR >= 11.

MXFP8 weight: ``DequantizeLinear(W_fp8, scale_e8m0, axis=0, block_size=32, output_dtype=FLOAT)``,
opset 24. A float16/bfloat16 weight gets a ``Cast`` back to its type after the DQ (TensorRT's form:
scales in float32, the GEMM in half precision).

TensorRT needs whole blocks, so a weight whose K the block size does not divide is refused (skipped,
with the reason, by :func:`quantize_matmul_weights`) rather than padded: padding K would change the
MatMul's shape, and a partial last block, though valid ONNX, is not what TensorRT's FP4 GEMM takes.

:func:`emulate_fp4_weights` folds those DQ chains into float initializers (numpy, the same float32
products as DequantizeLinear), since ONNX Runtime's CPU build has no FLOAT4E2M1 kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.formats.e8m0 import e8m0_to_float32
from onnxq.formats.granularity import Granularity
from onnxq.formats.mxfp8 import MXFP8_BLOCK_SIZE, MXFP8_MIN_OPSET, quantize_mxfp8
from onnxq.formats.nvfp4 import NVFP4_BLOCK_SIZE, NVFP4_MIN_IR_VERSION, NVFP4_MIN_OPSET, quantize_nvfp4
from onnxq.graph.passes import add_initializer, forget_names, unique_name, upgrade_opset

BlockFormat = Literal["nvfp4", "mxfp8"]
BLOCK_SIZE: dict[str, int] = {"nvfp4": NVFP4_BLOCK_SIZE, "mxfp8": MXFP8_BLOCK_SIZE}
MIN_OPSET: dict[str, int] = {"nvfp4": NVFP4_MIN_OPSET, "mxfp8": MXFP8_MIN_OPSET}
#: FLOAT4E2M1 and FLOAT8E8M0 tensors need IR version 11
MIN_IR_VERSION = NVFP4_MIN_IR_VERSION
FLOAT_WEIGHTS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
#: DQ inputs ONNX Runtime's CPU build cannot run: FP4 values or E8M0 scales
_UNRUNNABLE = frozenset({ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E8M0})
#: the reduction axis of a MatMul weight W[K, N]
WEIGHT_AXIS = 0


@dataclass
class BlockWeightStats:
    weights: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    #: weight name -> why it stayed float
    skipped: dict[str, str] = field(default_factory=dict)


def matmul_weights(graph: ir.Graph) -> list[ir.Value]:
    """Constant second inputs of the graph's MatMul nodes, each once, in graph order."""
    seen: dict[int, ir.Value] = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            value = node.inputs[1]
            if value is not None and value.const_value is not None:
                seen.setdefault(id(value), value)
    return list(seen.values())


def weight_problem(value: ir.Value, fmt: BlockFormat, k_axis: int = WEIGHT_AXIS) -> str | None:
    """Why ``value`` cannot take the ``fmt`` weight form (one line), or None when it can.

    Cases: not float32/float16/bfloat16; not 2-D ([K, N], or [N, K] with ``k_axis`` 1 for a Gemm with
    transB=1); K not a multiple of the block size (TensorRT needs whole blocks); a graph output (it must
    stay float); a graph input with a default value (old exporters list initializers as inputs: the user
    may feed another weight at run time).
    """
    shape = value.const_value.shape if value.const_value is not None else value.shape
    block = BLOCK_SIZE[fmt]
    if value.dtype not in FLOAT_WEIGHTS:
        return f"{fmt} weights must be float32/float16/bfloat16, {value.name} is {value.dtype}"
    dims = [d if isinstance(d, int) else None for d in shape] if shape is not None else []
    if len(dims) != 2 or None in dims:
        return f"{fmt} weights must be 2-D [K, N] MatMul weights, {value.name} has shape {shape}"
    if int(dims[k_axis] or 0) % block:
        return f"K = {dims[k_axis]} of {value.name} is not a multiple of the {fmt} block size {block}"
    if value.is_graph_output():
        return f"{value.name} is a graph output"
    if value.is_graph_input():
        return f"{value.name} is a graph input (an initializer the user can override at run time)"
    return None


def quantize_matmul_weights(
    model: ir.Model, fmt: BlockFormat, names: Iterable[str] | None = None
) -> BlockWeightStats:
    """Give the MatMul weights of ``model`` (only ``names`` when given) the ``fmt`` form, in place.

    Raises the opset to the format's (23 NVFP4, 24 MXFP8) and the IR version to >= 11 first. Weights
    that cannot take the form stay float and are listed in ``stats.skipped`` with the reason.
    """
    if fmt not in BLOCK_SIZE:
        raise ValueError(f"unknown block weight format {fmt!r}, expected one of {sorted(BLOCK_SIZE)}")
    wanted = None if names is None else set(names)
    upgrade_opset(model, MIN_OPSET[fmt])
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
    insert = insert_nvfp4_weight if fmt == "nvfp4" else insert_mxfp8_weight
    stats = BlockWeightStats()
    for value in matmul_weights(model.graph):
        if wanted is not None and value.name not in wanted:
            continue
        problem = weight_problem(value, fmt)
        if problem:
            stats.skipped[value.name or ""] = problem
            continue
        assert value.const_value is not None
        stats.weight_bytes_before += value.const_value.nbytes
        stored = quantized_inputs(insert(model.graph, value))
        stats.weight_bytes_after += sum(v.const_value.nbytes for v in stored if v.const_value is not None)
        stats.weights += 1
    return stats


def insert_nvfp4_weight(
    graph: ir.Graph, value: ir.Value, consumers: Sequence[ir.Node] | None = None, k_axis: int = WEIGHT_AXIS
) -> ir.Value:
    """Feed ``consumers`` (default: every reader) of the constant GEMM weight ``value`` its NVFP4 two-DQ
    chain instead, blocks along ``k_axis``; return W'. Other readers keep the float weight.

    Raises OnnxqError when :func:`weight_problem` has a reason, ValueError for NaN/inf weights.
    """
    _require_weight(value, "nvfp4", k_axis)
    assert value.const_value is not None
    q = quantize_nvfp4(value.const_value.numpy().astype(np.float32), k_axis)
    forget_names(graph)
    base = value.name or "weight"
    values = add_initializer(graph, f"{base}_fp4", q.values)
    block_scales = add_initializer(graph, f"{base}_block_scale", q.block_scales)
    global_scale = add_initializer(graph, f"{base}_global_scale", q.global_scale)
    scale_dq = _node(graph, f"{base}_scale_DequantizeLinear", [block_scales, global_scale], {})
    scale_dq.outputs[0].name = unique_name(graph, f"{base}_scale")
    _typed(scale_dq.outputs[0], ir.DataType.FLOAT, q.block_scales.shape)
    attributes = Granularity.block(k_axis, q.block_size).qdq_attributes(2)
    weight_dq = _node(graph, f"{base}_DequantizeLinear", [values, scale_dq.outputs[0]], attributes)
    return _rewire(graph, value, [scale_dq, weight_dq], consumers)


def insert_mxfp8_weight(
    graph: ir.Graph, value: ir.Value, consumers: Sequence[ir.Node] | None = None, k_axis: int = WEIGHT_AXIS
) -> ir.Value:
    """Feed ``consumers`` (default: every reader) of the constant GEMM weight ``value`` its MXFP8 DQ; return W'."""
    _require_weight(value, "mxfp8", k_axis)
    assert value.const_value is not None
    q = quantize_mxfp8(value.const_value.numpy().astype(np.float32), k_axis)
    forget_names(graph)
    base = value.name or "weight"
    values = add_initializer(graph, f"{base}_fp8", q.values)
    scales = add_initializer(graph, f"{base}_scale", q.scales)
    attributes = Granularity.block(k_axis, q.block_size).qdq_attributes(2)
    # without output_dtype the output would take the scale's type, E8M0, which the checker rejects
    attributes["output_dtype"] = ir.DataType.FLOAT.value
    weight_dq = _node(graph, f"{base}_DequantizeLinear", [values, scales], attributes)
    return _rewire(graph, value, [weight_dq], consumers)


def _require_weight(value: ir.Value, fmt: BlockFormat, k_axis: int = WEIGHT_AXIS) -> None:
    problem = weight_problem(value, fmt, k_axis)
    if problem:
        raise OnnxqError(problem, "keep this MatMul in higher precision (leave it out of the plan)")


def _rewire(
    graph: ir.Graph, weight: ir.Value, nodes: list[ir.Node], consumers: Sequence[ir.Node] | None = None
) -> ir.Value:
    """Put ``nodes`` (+ a Cast back for half-precision weights) before the first of ``consumers``
    (default: every reader of ``weight``), route their uses of ``weight`` to the result, and drop the
    float initializer once nothing reads it."""
    result = nodes[-1].outputs[0]
    result.name = unique_name(graph, f"{weight.name or 'weight'}_dequantized")
    _typed(result, ir.DataType.FLOAT, weight.shape)
    if weight.dtype != ir.DataType.FLOAT:
        assert weight.dtype is not None
        cast = _node(graph, f"{weight.name}_Cast", [result], {"to": weight.dtype.value}, "Cast")
        cast.outputs[0].name = unique_name(graph, f"{weight.name}_dequantized_{weight.dtype.name.lower()}")
        _typed(cast.outputs[0], weight.dtype, weight.shape)
        nodes, result = [*nodes, cast], cast.outputs[0]
    readers = (
        {id(node) for node in consumers} if consumers is not None else {id(u.node) for u in weight.uses()}
    )
    first = next(node for node in graph if id(node) in readers)
    graph.insert_before(first, nodes)
    for use in list(weight.uses()):
        if use.node not in nodes and id(use.node) in readers:
            use.node.replace_input_with(use.idx, result)
    if not any(use.node not in nodes for use in weight.uses()):
        graph.initializers.pop(weight.name or "", None)
    return result


def quantized_inputs(result: ir.Value) -> list[ir.Value]:
    """The initializers that the DQ chain ending in ``result`` reads (for byte counts)."""
    found: list[ir.Value] = []
    pending = [result]
    while pending:
        producer = pending.pop().producer()
        if producer is None:
            continue
        for value in producer.inputs:
            if value is None:
                continue
            if value.const_value is not None:
                found.append(value)
            else:
                pending.append(value)
    return found


def _node(
    graph: ir.Graph,
    name: str,
    inputs: list[ir.Value],
    attributes: dict[str, int],
    op_type: str = "DequantizeLinear",
) -> ir.Node:
    return ir.node(op_type, inputs, attributes=attributes, name=unique_name(graph, name))


def _typed(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | tuple[int, ...] | None) -> None:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape) if isinstance(shape, tuple) else shape


# --- emulation -------------------------------------------------------------------------------------


def emulate_fp4_weights(model: ir.Model) -> int:
    """Fold every DequantizeLinear that ONNX Runtime CPU cannot run into a float initializer; return how many.

    Folded: a DQ with constant FLOAT4E2M1 values or FLOAT8E8M0 scales, whose scale is a constant or
    the output of a DQ of constants (the NVFP4 chain). The numbers are ``dequantize_linear`` below,
    the same float32 products as ``onnx.reference``. Inputs left unused (FP4 values, scales, the
    scale DQ) are removed. Main graph only: block weights are not planned inside subgraphs.

    The float initializers are lazy: each is computed when it is read (by a save, one tensor at a
    time, or by ``numpy()``) and not kept, so emulating a model over 2 GB holds one weight at a time.
    """
    graph = model.graph
    forget_names(graph)
    folded = 0
    for node in [n for n in graph if _foldable(n)]:
        spec = _snapshot(node)
        output = node.outputs[0]
        name = output.name or unique_name(graph, "dequantized_weight")
        shape = ir.Shape(spec.shape)
        tensor = ir.LazyTensor(
            functools.partial(_folded_tensor, spec), dtype=spec.dtype, shape=shape, name=name
        )
        replacement = ir.Value(shape=shape, type=ir.TensorType(spec.dtype), const_value=tensor)
        ir.convenience.replace_all_uses_with(output, replacement, replace_graph_outputs=True)
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        replacement.name = name
        graph.register_initializer(replacement)
        _drop_unused(graph, inputs)
        folded += 1
    return folded


def _folded_tensor(spec: _FoldedDequantize) -> ir.TensorProtocol:
    return ir.tensor(spec.evaluate())


@dataclass(frozen=True)
class _FoldedDequantize:
    """A DequantizeLinear of constants (or of such DQs), kept apart from the graph for a lazy fold."""

    inputs: tuple[ir.TensorProtocol | _FoldedDequantize | _FoldedCast | None, ...]
    axis: int
    block_size: int
    output_dtype: int

    @property
    def shape(self) -> tuple[int, ...]:
        x = self.inputs[0]
        assert x is not None
        return x.shape if isinstance(x, _FoldedDequantize | _FoldedCast) else tuple(x.shape.numpy())

    @property
    def dtype(self) -> ir.DataType:
        """ONNX: the output_dtype attribute when set, else the scale's type."""
        if self.output_dtype:
            return ir.DataType(self.output_dtype)
        scale = self.inputs[1]
        assert scale is not None
        return scale.dtype

    def evaluate(self) -> np.ndarray:
        arrays = [
            None if i is None else (i.evaluate() if isinstance(i, _FoldedDequantize | _FoldedCast) else i.numpy())
            for i in self.inputs
        ]
        x, scale = arrays[0], arrays[1]
        assert x is not None and scale is not None
        return dequantize_linear(
            x, scale, arrays[2] if len(arrays) > 2 else None, axis=self.axis, block_size=self.block_size,
            output_dtype=self.dtype.numpy() if self.output_dtype else None,
        )  # fmt: skip


@dataclass(frozen=True)
class _FoldedCast:
    """A Cast of a folded scale DQ: an FP16 rest keeps a scale DQ whose global scale is subnormal in
    float16 in float32 and casts its output for the weight DQ (see ``graph.float_conversion``)."""

    source: _FoldedDequantize
    to: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def dtype(self) -> ir.DataType:
        return ir.DataType(self.to)

    def evaluate(self) -> np.ndarray:
        return self.source.evaluate().astype(self.dtype.numpy())


def _snapshot(node: ir.Node) -> _FoldedDequantize:
    """The DQ's constant inputs (and DQ-produced scales, cast or not), captured before the node leaves
    the graph."""
    inputs: list[ir.TensorProtocol | _FoldedDequantize | _FoldedCast | None] = []
    for value in node.inputs:
        if value is None:
            inputs.append(None)
        elif value.const_value is not None:
            inputs.append(value.const_value)
        else:
            producer = value.producer()
            assert producer is not None
            if producer.op_type == "Cast":
                source = producer.inputs[0].producer() if producer.inputs[0] is not None else None
                assert source is not None
                inputs.append(_FoldedCast(_snapshot(source), producer.attributes.get_int("to", 0)))
            else:
                inputs.append(_snapshot(producer))
    return _FoldedDequantize(
        tuple(inputs), node.attributes.get_int("axis", 1), node.attributes.get_int("block_size", 0),
        node.attributes.get_int("output_dtype", 0),
    )  # fmt: skip


def _foldable(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    values, scale = node.inputs[0], node.inputs[1]
    if values is None or scale is None or values.const_value is None:
        return False
    if values.dtype not in _UNRUNNABLE and scale.dtype not in _UNRUNNABLE:
        return False
    return _is_constant(scale)


def _is_constant(value: ir.Value) -> bool:
    """A constant, or the output of a DequantizeLinear of constants (the NVFP4 scale DQ), possibly cast."""
    if value.const_value is not None:
        return True
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.inputs[0] is not None:
        source = producer.inputs[0]
        return source.const_value is None and _is_constant(source)
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and all(v is None or v.const_value is not None for v in producer.inputs)
    )


def dequantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    axis: int = 1,
    block_size: int = 0,
    output_dtype: np.dtype | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: ``(x - zero_point) * scale`` in float32, cast to the output type.

    Cases: per tensor (scale 0-d or of one element), per axis (1-D scale), blocked (``block_size``,
    a shorter last block allowed); FLOAT8E8M0 scales (exact powers of two; the output type is then
    ``output_dtype``, required as in ONNX). The output type is otherwise the scale's type.
    """
    out_dtype = output_dtype if output_dtype is not None else np.dtype(scale.dtype)
    if scale.dtype.name.startswith("float8_e8m0"):
        if output_dtype is None:
            raise ValueError("DequantizeLinear with FLOAT8E8M0 scales needs output_dtype")
        scale32 = e8m0_to_float32(scale)
    else:
        scale32 = scale.astype(np.float32)
    v = x.astype(np.float32)
    # float8/float4 zero points are 0 by definition (onnx.reference ignores them); integers subtract theirs
    if zero_point is not None and not x.dtype.name.startswith("float"):
        v = v - _expand(zero_point.astype(np.float32), v.shape, axis, block_size)
    return (v * _expand(scale32, v.shape, axis, block_size)).astype(out_dtype)


def _expand(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    if param.size == 1 and (param.ndim <= 1 or not block_size):
        return param.reshape(())
    if block_size:
        return Granularity.block(axis, block_size).expand(param, shape)
    return Granularity.channel(axis).expand(param, shape)


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove initializers (and DQ nodes of constants) that nothing reads any more."""
    for value in values:
        if value.uses() or value.is_graph_output():
            continue
        producer = value.producer()
        if producer is not None and producer.op_type in ("DequantizeLinear", "Cast") and producer.graph is graph:
            inputs = [v for v in producer.inputs if v is not None]
            graph.remove(producer, safe=True)
            _drop_unused(graph, inputs)
        elif value.name and value.name in graph.initializers and value.const_value is not None:
            graph.initializers.pop(value.name)
