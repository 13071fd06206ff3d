"""Recover what a quantized model quantizes from its Q/DQ graph, and match it with the FP32 model.

onnxq does not store its plan in the model, so the report reads the graph: every node input that is
fed by a dequantizer chain is a *quantized input* of a *layer* (that node). Cases handled:

- activation Q/DQ pairs (``QuantizeLinear`` -> ``DequantizeLinear``), INT8/UINT8/FP8, per tensor
  (the representable range ``scale * [qmin - zp, qmax - zp]`` is the clip range);
- dynamic block quantizers of activations (``TRT_FP4DynamicQuantize`` -> two DQ, NVFP4;
  ``TRT_MXFP8DynamicQuantize`` -> ``TRT_MXFP8DequantizeLinear``): no fixed clip range;
- weights stored quantized: a ``DequantizeLinear`` (or a chain of them: NVFP4's FP8 block scales are
  a DQ of constants) of constant codes, per tensor, per channel or per block, INT8/FP8/INT4/FP4/MXFP8,
  optionally followed by a ``Cast`` (half-precision weights);
- ``MatMulNBits`` (the ORT INT4 form) holds no DQ: not recovered (listed in the notes by the caller).

Matching with the FP32 model, per quantized tensor, first that applies:

1. activations: the FP32 tensor of the same name ("same name"); a Conv output that was followed by a
   BatchNormalization onnxq folded (the BN node is absent from the quantized model) is matched with
   the BN's output ("after folded BatchNorm");
2. the input at the same index of the FP32 node of the same name ("consumer input"); for weights the
   FP32 value must be a constant of the same shape; a Conv weight whose FP32 Conv feeds a folded
   BatchNormalization is compared with the FP32 weight folded the same way;
3. weights only: the stored name (``<w>_dequantized`` / ``<w>_quantized``) ("stored name").

Weights' arrays (dequantized, FP32, clip limits) are computed on demand from the graphs
(:class:`WeightArrays`), never all held at once.

Nodes the quantizer named (unnamed FP32 nodes get the names onnx_ir's ``NameFixPass`` gives, which is
what ``onnxq quantize`` applies first). A tensor that matches nothing is reported unmatched, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq.graph.dynamic_quantize import (
    FP4_DYNAMIC_QUANTIZE,
    MXFP8_DEQUANTIZE,
    MXFP8_DYNAMIC_QUANTIZE,
    TRT_DOMAIN,
)
from onnxq.graph.fp4_weights import dequantize_linear
from onnxq.graph.passes import values_by_name

Kind = Literal["activation", "weight"]
DEFAULT_DOMAINS = ("", "ai.onnx")
#: ops that only move a quantized value between its dequantizer and the layer reading it
PASS_THROUGH = frozenset({"Cast"})
#: ops whose inputs are part of a quantizer chain, never layers of their own
QUANTIZER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
TRT_QUANTIZER_OPS = frozenset({FP4_DYNAMIC_QUANTIZE, MXFP8_DYNAMIC_QUANTIZE, MXFP8_DEQUANTIZE})
#: suffixes onnxq gives dequantized weights and their stored codes
STORED_SUFFIXES = ("_dequantized", "_quantized")
#: the BatchNormalization epsilon ONNX defaults to
BN_DEFAULT_EPSILON = 1e-5


@dataclass
class QuantPoint:
    """One quantized tensor: an activation quantizer or a dequantized weight, and who reads it."""

    #: the float tensor the quantizer reads (activation) or the dequantized weight's name
    name: str
    kind: Kind
    #: element type of the codes (int8, uint8, float8e4m3fn, int4, float4e2m1, ...)
    fmt: str
    #: position of its first reader in graph order
    order: int
    #: (layer node name, input index) reading the dequantized value
    readers: list[tuple[str, int]] = field(default_factory=list)
    #: (low, high) values the codes can represent; None for dynamic (block) activation quantizers
    #: (weights: the widest among channels/blocks, set when ``WeightArrays.limits`` is computed)
    clip_range: tuple[float, float] | None = None
    #: activations: the range widened by half the step next to each extreme; a value beyond it was
    #: clipped (one within it rounds to the extreme code)
    clip_limits: tuple[float, float] | None = None
    fp32_name: str | None = None
    #: how ``fp32_name`` was found (see the module docstring), or why nothing matched
    match: str = ""
    weight: WeightArrays | None = field(default=None, repr=False)


@dataclass
class WeightArrays:
    """Where a quantized weight's arrays come from; each is computed when asked and not kept, so a
    report holds one weight at a time (memory-mapped external weights stay on disk)."""

    dequantizer: ir.Node
    #: the value the layer reads (the dequantizer's output, or a Cast of it)
    chain_end: ir.Value
    fp32_value: ir.Value | None = None
    #: per output channel factor of a BatchNormalization folded into the Conv (None: no folding)
    fold_factor: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        codes = _first(self.dequantizer).const_value
        assert codes is not None
        return tuple(codes.shape.numpy())

    @property
    def dtype(self) -> np.dtype:
        """The type the layer reads (a float16 rest reads float16 weights)."""
        if self.chain_end.dtype is not None:
            return self.chain_end.dtype.numpy()
        return self.dequantized().dtype

    def dequantized(self) -> np.ndarray:
        return evaluate_constant(self.chain_end)

    def fp32(self) -> np.ndarray | None:
        """The FP32 weight, folded like the quantized one; None when unmatched."""
        if self.fp32_value is None:
            return None
        weight = _constant(self.fp32_value)
        assert weight is not None
        if self.fold_factor is None:
            return weight
        return (weight * self.fold_factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)

    def limits(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
        """Per element, the dequantized lowest and highest codes widened by half a step (see
        QuantPoint.clip_limits), and the unwidened widest range; None for non-standard dequantizers."""
        if self.dequantizer.op_type != "DequantizeLinear":
            return None
        codes = evaluate_constant(_first(self.dequantizer))
        low, high, half_step = code_limits(codes.dtype)

        def at(code: float) -> np.ndarray:
            filled = np.full(codes.shape, code, dtype=np.float32).astype(codes.dtype)
            return _dequantize(self.dequantizer, filled).astype(np.float64)

        lows, highs = at(low), at(high)
        # DQ is affine in the code: code 1 minus code 0 is each element's step (zero points cancel)
        step = np.abs(at(1.0) - at(0.0))
        lows, highs = np.minimum(lows, highs), np.maximum(lows, highs)
        widest = (float(lows.min()), float(highs.max()))
        return lows - half_step * step, highs + half_step * step, widest


@dataclass(frozen=True)
class _Chain:
    kind: Kind
    fmt: str
    #: the activation the quantizer reads (activations); the chain's last value (weights)
    source: ir.Value
    quantizer: ir.Node | None
    dequantizer: ir.Node


def find_points(model: ir.Model) -> list[QuantPoint]:
    """Every quantized tensor of ``model`` (main graph), in the order its first reader runs."""
    points: dict[int, QuantPoint] = {}
    for order, node in enumerate(model.graph):
        if _is_quantizer(node) or _is_chain_cast(node):
            continue
        for index, value in enumerate(node.inputs):
            chain = _chain(value) if value is not None else None
            if chain is None:
                continue
            point = points.get(id(chain.dequantizer))
            if point is None:
                point = _new_point(chain, order)
                points[id(chain.dequantizer)] = point
            point.readers.append((node.name or "", index))
    return list(points.values())


def layers_of(points: list[QuantPoint]) -> list[str]:
    """Layer (reader node) names in graph order, without repeats."""
    ordered = sorted(((p.order, r[0]) for p in points for r in p.readers), key=lambda x: x[0])
    return list(dict.fromkeys(name for _, name in ordered))


def _is_quantizer(node: ir.Node) -> bool:
    if node.domain == TRT_DOMAIN:
        return node.op_type in TRT_QUANTIZER_OPS
    return node.domain in DEFAULT_DOMAINS and node.op_type in QUANTIZER_OPS


def _is_chain_cast(node: ir.Node) -> bool:
    """A Cast right after a dequantizer (a float16 rest's type): part of the chain, not a layer."""
    if node.op_type not in PASS_THROUGH or node.domain not in DEFAULT_DOMAINS or node.inputs[0] is None:
        return False
    return _dequantizer(node.inputs[0]) is not None


def _dequantizer(value: ir.Value) -> ir.Node | None:
    producer = value.producer()
    while producer is not None and producer.op_type in PASS_THROUGH and producer.domain in DEFAULT_DOMAINS:
        source = producer.inputs[0]
        producer = source.producer() if source is not None else None
    if producer is None:
        return None
    if producer.domain in DEFAULT_DOMAINS and producer.op_type == "DequantizeLinear":
        return producer
    if producer.domain == TRT_DOMAIN and producer.op_type == MXFP8_DEQUANTIZE:
        return producer
    return None


def _chain(value: ir.Value) -> _Chain | None:
    dequantizer = _dequantizer(value)
    if dequantizer is None or dequantizer.inputs[0] is None:
        return None
    codes = dequantizer.inputs[0]
    fmt = codes.dtype.name.lower() if codes.dtype is not None else "unknown"
    if codes.const_value is not None:
        return _Chain("weight", fmt, value, None, dequantizer)
    quantizer = codes.producer()
    if quantizer is None or quantizer.inputs[0] is None:
        return None
    standard_q = quantizer.op_type == "QuantizeLinear" and quantizer.domain in DEFAULT_DOMAINS
    dynamic_q = quantizer.domain == TRT_DOMAIN and quantizer.op_type in TRT_QUANTIZER_OPS
    if not (standard_q or dynamic_q):
        return None
    return _Chain("activation", fmt, quantizer.inputs[0], quantizer, dequantizer)


def _new_point(chain: _Chain, order: int) -> QuantPoint:
    if chain.kind == "activation":
        quantizer = chain.quantizer
        assert quantizer is not None
        point = QuantPoint(chain.source.name or "", "activation", chain.fmt, order)
        if quantizer.op_type == "QuantizeLinear":
            _set_activation_limits(point, quantizer)
        return point
    output = chain.dequantizer.outputs[0]
    point = QuantPoint(output.name or "", "weight", chain.fmt, order)
    point.weight = WeightArrays(chain.dequantizer, chain.source)
    return point


def code_limits(dtype: np.dtype) -> tuple[float, float, float]:
    """Lowest and highest code of an integer or float quantized type, and half the step between the
    highest code and the one below it (0.5 for integers; 16 for FP8 E4M3's 448 and 416)."""
    if np.issubdtype(dtype, np.integer) or dtype.name.startswith(("int", "uint")):
        info = ml_dtypes.iinfo(dtype)
        return float(info.min), float(info.max), 0.5
    highest = np.array(ml_dtypes.finfo(dtype).max, dtype=dtype)
    below = (highest.view(np.uint8) - np.uint8(1)).view(dtype)
    half_step = (float(highest) - float(below)) / 2
    return -float(highest), float(highest), half_step


def _set_activation_limits(point: QuantPoint, quantizer: ir.Node) -> None:
    """``scale * [qmin - zp, qmax - zp]`` of a per-tensor QuantizeLinear (per-axis ones: no range)."""
    scale_value = quantizer.inputs[1]
    scale = _constant(scale_value) if scale_value is not None else None
    if scale is None or scale.size != 1:
        return
    zero_point_value = quantizer.inputs[2] if len(quantizer.inputs) > 2 else None
    zero_point = _constant(zero_point_value) if zero_point_value is not None else None
    dtype = zero_point.dtype if zero_point is not None else _output_dtype(quantizer)
    low, high, half_step = code_limits(dtype)
    offset = float(zero_point.astype(np.float64).reshape(())) if zero_point is not None else 0.0
    if not dtype.name.startswith(("int", "uint")):
        offset = 0.0  # float8 zero points are 0 by definition
    step = float(scale.astype(np.float64).reshape(()))
    point.clip_range = (step * (low - offset), step * (high - offset))
    point.clip_limits = (step * (low - offset - half_step), step * (high - offset + half_step))


def _output_dtype(quantizer: ir.Node) -> np.dtype:
    dtype = quantizer.outputs[0].dtype
    return dtype.numpy() if dtype is not None else np.dtype(np.uint8)


def _constant(value: ir.Value) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value)
    return tensor.numpy() if tensor is not None else None


def evaluate_constant(value: ir.Value) -> np.ndarray:
    """The float values of a constant, or of a chain of DequantizeLinear/Cast over constants."""
    constant = _constant(value)
    if constant is not None:
        return constant
    producer = value.producer()
    if producer is None:
        raise ValueError(f"{value.name} is neither a constant nor computed from constants")
    if producer.op_type == "Cast":
        source = producer.inputs[0]
        assert source is not None
        return evaluate_constant(source).astype(ir.DataType(producer.attributes.get_int("to", 1)).numpy())
    if producer.op_type != "DequantizeLinear" or producer.domain not in DEFAULT_DOMAINS:
        raise ValueError(f"{value.name}: cannot evaluate {producer.op_type} of constants")
    return _dequantize(producer, None)


def _dequantize(node: ir.Node, codes: np.ndarray | None) -> np.ndarray:
    """``node`` evaluated on its constants, or on ``codes`` in place of its first input."""
    arrays = [None if v is None else evaluate_constant(v) for v in node.inputs[1:]]
    x = codes if codes is not None else evaluate_constant(_first(node))
    output_dtype = node.attributes.get_int("output_dtype", 0)
    return dequantize_linear(
        x, arrays[0], arrays[1] if len(arrays) > 1 else None,  # type: ignore[arg-type]
        axis=node.attributes.get_int("axis", 1), block_size=node.attributes.get_int("block_size", 0),
        output_dtype=ir.DataType(output_dtype).numpy() if output_dtype else None,
    )  # fmt: skip


def _first(node: ir.Node) -> ir.Value:
    value = node.inputs[0]
    assert value is not None
    return value


# --- matching with the FP32 model ------------------------------------------------------------------


def match_points(points: list[QuantPoint], fp32: ir.Model, quantized: ir.Model) -> None:
    """Fill ``fp32_name``/``match`` (and the FP32 weight) of every point; see the module docstring."""
    fp32_values = values_by_name(fp32.graph)
    fp32_nodes = {node.name: node for node in fp32.graph}
    quantized_nodes = {node.name for node in quantized.graph}
    for point in points:
        if point.kind == "activation":
            _match_activation(point, fp32_values, fp32_nodes, quantized_nodes)
        else:
            _match_weight(point, fp32_values, fp32_nodes, quantized_nodes)


def _match_activation(
    point: QuantPoint,
    values: dict[str, ir.Value],
    nodes: dict[str | None, ir.Node],
    quantized_nodes: set[str | None],
) -> None:
    found = values.get(point.name)
    how = "same name"
    if found is None:
        found, how = _reader_input(point, nodes), "consumer input"
    if found is None or found.const_value is not None:
        point.match = "no FP32 tensor of that name or at the same node input"
        return
    after_bn = _folded_batch_norm(found, quantized_nodes)
    if after_bn is not None:
        found, how = after_bn.outputs[0], "after folded BatchNorm"
    point.fp32_name, point.match = found.name, how


def _match_weight(
    point: QuantPoint,
    values: dict[str, ir.Value],
    nodes: dict[str | None, ir.Node],
    quantized_nodes: set[str | None],
) -> None:
    assert point.weight is not None
    shape = point.weight.shape
    candidates = [(_reader_input(point, nodes), "consumer input")]
    candidates += [(values.get(name), "stored name") for name in _stored_names(point.name)]
    for value, how in candidates:
        tensor = ir.convenience.get_const_tensor(value) if value is not None else None
        if tensor is None or tuple(tensor.shape.numpy()) != shape:
            continue
        assert value is not None
        point.fp32_name, point.match = value.name, how
        point.weight.fp32_value = value
        point.weight.fold_factor = _batch_norm_factor(value, nodes, point, quantized_nodes)
        return
    point.match = f"no FP32 constant of shape {list(shape)} at the same node input or stored name"


def _reader_input(point: QuantPoint, nodes: dict[str | None, ir.Node]) -> ir.Value | None:
    for reader, index in point.readers:
        node = nodes.get(reader)
        if node is not None and index < len(node.inputs) and node.inputs[index] is not None:
            return node.inputs[index]
    return None


def _stored_names(name: str) -> list[str]:
    return [name[: -len(suffix)] for suffix in STORED_SUFFIXES if name.endswith(suffix)]


def _folded_batch_norm(value: ir.Value, quantized_nodes: set[str | None]) -> ir.Node | None:
    """The BatchNormalization that alone reads a Conv output in FP32 and is gone from the quantized model."""
    producer = value.producer()
    uses = list(value.uses())
    if producer is None or producer.op_type != "Conv" or len(uses) != 1:
        return None
    reader = uses[0].node
    if reader.op_type != "BatchNormalization" or reader.name in quantized_nodes:
        return None
    return reader


def _batch_norm_factor(
    value: ir.Value,
    nodes: dict[str | None, ir.Node],
    point: QuantPoint,
    quantized_nodes: set[str | None],
) -> np.ndarray | None:
    """``gamma / sqrt(var + eps)`` of a BatchNormalization onnxq folded into this weight's Conv."""
    for reader, index in point.readers:
        node = nodes.get(reader)
        if node is None or index != 1 or node.inputs[1] is not value:
            continue
        batch_norm = _folded_batch_norm(node.outputs[0], quantized_nodes)
        if batch_norm is None:
            continue
        gamma, _, _, variance = (_constant(v) if v is not None else None for v in batch_norm.inputs[1:5])
        if gamma is None or variance is None:
            continue
        epsilon = batch_norm.attributes.get_float("epsilon", BN_DEFAULT_EPSILON)
        point.match += " (folded with its BatchNorm)"
        return np.asarray(gamma / np.sqrt(variance + epsilon))
    return None
