"""Rewrite a deployable NVFP4 / MXFP8 model into standard ops that ONNX Runtime's CPU build runs.

ONNX Runtime CPU has no FLOAT4E2M1 kernels, no FLOAT8E8M0 DequantizeLinear and no ``trt`` ops.
:func:`emulate` replaces, in place, each of these by the same arithmetic in standard ops, so that the
emulated model computes what ``onnx.reference`` (with :mod:`onnxq.reference_ops`) computes on the
deployable one, bit for bit (every step is the same float32 operation in the same order):

- weight DQ chains (FP4 values, FP8 block scales, E8M0 scales) and ``TRT_MXFP8DequantizeLinear`` of
  constants: folded into float initializers (:func:`onnxq.graph.fp4_weights.emulate_fp4_weights`);
- ``TRT_FP4DynamicQuantize`` + its two DequantizeLinear (the NVFP4 activation form): blocks by
  Reshape ``[.., K/16, 16]``, ``ReduceMax(Abs)``, ``/ (6 * g)``, Clip to [2**-9, 448], FP8 E4M3
  QuantizeLinear/DequantizeLinear with scale 1 (rounds the block scale, ties to even), ``* g``,
  ``x / s``, E2M1 rounding (:func:`_append_fp4_rounding`), ``* s``, Reshape back;
- ``TRT_MXFP8DynamicQuantize``: the E8M0 exponent ``floor(log2(amax)) - 8`` computed exactly (a Log
  estimate corrected by comparisons with exact powers of two from a lookup table), FP8 QuantizeLinear
  of ``x / 2**e``; its FP8 values and UINT8 codes are tensors ONNX Runtime holds;
- ``TRT_MXFP8DequantizeLinear`` at run time: FP8 DequantizeLinear, ``* 2**(code - 127)`` per block
  (lookup table), Cast to ``output_dtype``;
- FP4 GEMM plugin nodes (``trt.plugins::Fp4GemmPlugin``, ``--fp4-plugin``): MatMul on the float32
  dequantized weight, bias, Cast to X's type (:mod:`onnxq.plugins.emulation`).

Anything else that ONNX Runtime CPU cannot run (an FP4 tensor produced some other way, a dynamic
quantizer whose outputs feed something other than the dequantizers, a block axis other than the last,
a trt op inside a subgraph or function) is an OnnxqError naming the node. The opset is kept (raised to
19 only if lower, for FP8 QuantizeLinear); the ``trt`` opset import is dropped once unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.formats.e8m0 import (
    E8M0_BIAS,
    E8M0_MAX_EXPONENT,
    FLOAT8_E8M0FNU,
    MIN_NORMAL_EXPONENT,
    ZERO_BLOCK_EXPONENT,
)
from onnxq.formats.fp4_e2m1 import FP4_E2M1_MAX
from onnxq.formats.fp8_e4m3 import FLOAT8_E4M3FN, FP8_E4M3_MAX, FP8_E4M3_MIN_SUBNORMAL
from onnxq.formats.mxfp8 import FP8_E4M3_EMAX, MXFP8_BLOCK_SIZE
from onnxq.formats.nvfp4 import NVFP4_BLOCK_SIZE
from onnxq.graph.dynamic_quantize import (
    FP4_DYNAMIC_QUANTIZE,
    MXFP8_DEQUANTIZE,
    MXFP8_DYNAMIC_QUANTIZE,
    TRT_DOMAIN,
)
from onnxq.graph.fp4_weights import emulate_fp4_weights
from onnxq.graph.passes import DEFAULT_DOMAINS, default_opset, forget_names, unique_name, upgrade_opset
from onnxq.model_io import check_output_path, load_model, save_model
from onnxq.plugins import emulate_fp4_gemm_plugins, fp4_gemm_description
from onnxq.reference_ops import dequantize_mxfp8_codes

#: tensor types ONNX Runtime's CPU build has no kernels for
UNRUNNABLE_TYPES = frozenset({ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E8M0})
#: FP8 QuantizeLinear needs opset 19 and FP8 tensors IR 9. ONNX Runtime 1.32 has no FP8 Reshape/Shape
#: below opset 21, so the rewrites reshape float tensors only
FP8_MIN_OPSET = 19
FP8_MIN_IR_VERSION = 9
#: E2M1 grid steps: 0.5 below 2, 1 below 4, 2 up to 6
FP4_STEP_BOUNDS = (2.0, 4.0)
FP4_STEPS = (0.5, 1.0, 2.0)
#: exponents of the power-of-two lookup table; a Log estimate below -119 only matters as "below":
#: every amax under 2**-118 gets the exponent clamp -126 = -118 - 8
POW2_TABLE_MIN_EXPONENT = MIN_NORMAL_EXPONENT + FP8_E4M3_EMAX - 1
POW2_TABLE_MAX_EXPONENT = E8M0_MAX_EXPONENT
E8M0_CODES = 256
#: the custom-op domain of onnxq's TensorRT plugin nodes (FP4 GEMM)
PLUGIN_DOMAIN = fp4_gemm_description().onnx_domain
FIX = "quantize with onnxq (its activation forms are emulated), or run the model in TensorRT"


@dataclass
class EmulationStats:
    #: weight DequantizeLinear (FP4 / E8M0 / trt MXFP8) folded into float initializers
    folded_weights: int = 0
    #: TRT_FP4DynamicQuantize nodes (with their DQ pairs) rewritten
    nvfp4_activations: int = 0
    mxfp8_quantizers: int = 0
    mxfp8_dequantizers: int = 0
    #: FP4 GEMM plugin nodes rewritten into MatMul on float32 weights
    fp4_gemm_plugins: int = 0

    def describe(self) -> str:
        """What was emulated, for a line in the terminal ("" when nothing was)."""
        parts = {
            "FP4/MXFP8 weights folded": self.folded_weights,
            "NVFP4 activation quantizers": self.nvfp4_activations,
            "MXFP8 activation quantizers": self.mxfp8_quantizers,
            "FP4 GEMM plugin nodes": self.fp4_gemm_plugins,
        }
        return ", ".join(f"{count} {what}" for what, count in parts.items() if count)


def needs_emulation(model: ir.Model) -> bool:
    """Whether ONNX Runtime CPU would refuse ``model``: FP4/E8M0 tensors or trt ops anywhere."""
    return any(_unrunnable(node) for node in _all_nodes(model))


def emulate_file(source: Path, destination: Path) -> EmulationStats:
    """Load ``source``, :func:`emulate` it, save the result to ``destination`` (checked on write)."""
    check_output_path(source, destination)
    model = load_model(source)
    if not needs_emulation(model):
        raise OnnxqError(
            f"{source} holds no FP4/MXFP8 tensors or TensorRT dynamic-quantize ops",
            "ONNX Runtime runs it as it is: nothing to emulate",
        )
    stats = emulate(model)
    save_model(model, destination)
    return stats


def emulate(model: ir.Model) -> EmulationStats:
    """Rewrite ``model`` in place so that ONNX Runtime CPU runs it (see the module docstring)."""
    stats = EmulationStats(fp4_gemm_plugins=emulate_fp4_gemm_plugins(model))
    stats.folded_weights = emulate_fp4_weights(model)
    graph = model.graph
    forget_names(graph)
    stats.folded_weights += _fold_constant_mxfp8_dequantizers(graph)
    trt_nodes = [n for n in graph if n.domain == TRT_DOMAIN]
    if trt_nodes and default_opset(model) < FP8_MIN_OPSET:
        upgrade_opset(model, FP8_MIN_OPSET)
        graph = model.graph
        trt_nodes = [n for n in graph if n.domain == TRT_DOMAIN]
    if trt_nodes:
        model.ir_version = max(model.ir_version or 0, FP8_MIN_IR_VERSION)
    builder = _Builder(graph)
    for node in trt_nodes:
        if node.op_type == FP4_DYNAMIC_QUANTIZE:
            _emulate_fp4_quantizer(builder, node)
            stats.nvfp4_activations += 1
        elif node.op_type == MXFP8_DYNAMIC_QUANTIZE:
            _emulate_mxfp8_quantizer(builder, node)
            stats.mxfp8_quantizers += 1
    for node in [n for n in graph if n.domain == TRT_DOMAIN and n.op_type == MXFP8_DEQUANTIZE]:
        _emulate_mxfp8_dequantizer(builder, node)
        stats.mxfp8_dequantizers += 1
    _refuse_leftovers(model)
    if not any(n.domain == TRT_DOMAIN for n in _all_nodes(model)):
        model.opset_imports.pop(TRT_DOMAIN, None)
    return stats


# --- what is left ---------------------------------------------------------------------------------


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes


def _unrunnable(node: ir.Node) -> bool:
    values = [*node.inputs, *node.outputs]
    return node.domain in (TRT_DOMAIN, PLUGIN_DOMAIN) or any(v is not None and v.dtype in UNRUNNABLE_TYPES for v in values)


def _refuse_leftovers(model: ir.Model) -> None:
    for node in _all_nodes(model):
        if _unrunnable(node):
            where = "" if node.graph is model.graph else " (inside a subgraph or function)"
            raise OnnxqError(
                f"cannot emulate node {node.name or node.op_type} ({node.domain or 'ai.onnx'}::{node.op_type})"
                f"{where}: ONNX Runtime CPU has no kernel for it and it is not one of the forms onnxq rewrites",
                FIX,
            )


def _fold_constant_mxfp8_dequantizers(graph: ir.Graph) -> int:
    """TRT_MXFP8DequantizeLinear of constants (ModelOpt's MXFP8 weights) -> float initializer."""
    folded = 0
    for node in [n for n in graph if n.domain == TRT_DOMAIN and n.op_type == MXFP8_DEQUANTIZE]:
        values, codes = node.inputs[0], node.inputs[1]
        if values is None or codes is None or values.const_value is None or codes.const_value is None:
            continue
        array = dequantize_mxfp8_codes(
            values.const_value.numpy(), codes.const_value.numpy(),
            node.attributes.get_int("axis", -1), node.attributes.get_int("block_size", MXFP8_BLOCK_SIZE),
        )  # fmt: skip
        output_dtype = ir.DataType(node.attributes.get_int("output_dtype", ir.DataType.FLOAT.value))
        array = array.astype(output_dtype.numpy())
        output = node.outputs[0]
        name = output.name or unique_name(graph, "dequantized_weight")
        replacement = ir.Value(
            shape=ir.Shape(array.shape),
            type=ir.TensorType(output_dtype),
            const_value=ir.tensor(array, name=name),
        )
        ir.convenience.replace_all_uses_with(output, replacement, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        replacement.name = name
        graph.register_initializer(replacement)
        _drop_unused_initializers(graph, [values, codes])
        folded += 1
    return folded


# --- building standard ops ------------------------------------------------------------------------


class _Builder:
    """Appends standard nodes to a list, with uniquely named constants; inserted before an anchor."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self.prefix = "emulated"
        #: one initializer per distinct constant (dtype, shape, bytes), shared by all rewrites
        self._constants: dict[tuple[str, tuple[int, ...], bytes], ir.Value] = {}

    def constant(self, array: np.ndarray, label: str) -> ir.Value:
        array = np.array(array)
        key = (array.dtype.name, array.shape, array.tobytes())  # ml_dtypes share str codes (<V1)
        if key in self._constants:
            return self._constants[key]
        name = unique_name(self.graph, f"{self.prefix}_{label}")
        tensor = ir.tensor(array, name=name)
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.graph.register_initializer(value)
        self._constants[key] = value
        return value

    def scalar(self, number: float | np.floating, label: str) -> ir.Value:
        return self.constant(np.array(number, dtype=np.float32), label)

    def op(self, op_type: str, inputs: list[ir.Value], label: str, **attributes: int) -> ir.Value:
        node = ir.node(
            op_type,
            inputs,
            attributes=attributes or None,
            name=unique_name(self.graph, f"{self.prefix}_{label}"),
        )
        node.outputs[0].name = unique_name(self.graph, f"{self.prefix}_{label}")
        self.nodes.append(node)
        return node.outputs[0]

    def insert_before(self, anchor: ir.Node) -> None:
        self.graph.insert_before(anchor, self.nodes)
        self.nodes = []

    # composite steps

    def as_float32(self, value: ir.Value) -> ir.Value:
        if value.dtype == ir.DataType.FLOAT:
            return value
        return self.op("Cast", [value], "float32", to=ir.DataType.FLOAT.value)

    def cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        if dtype == ir.DataType.FLOAT:
            return value
        return self.op("Cast", [value], dtype.name.lower(), to=dtype.value)

    def blocks(self, value: ir.Value, rank: int, length: int, block_size: int) -> ir.Value:
        """``value`` [..., K] reshaped to [..., K / block, block] (0 keeps the leading dimensions)."""
        shape = np.array([0] * (rank - 1) + [length // block_size, block_size], dtype=np.int64)
        return self.op("Reshape", [value, self.constant(shape, "block_shape")], "blocks")

    def block_amax(self, blocks: ir.Value) -> ir.Value:
        """max |x| over each block, keepdims: [..., K / block, 1]."""
        magnitude = self.op("Abs", [blocks], "abs")
        axes = self.constant(np.array([-1], dtype=np.int64), "last_axis")  # an input from opset 18
        return self.op("ReduceMax", [magnitude, axes], "block_amax", keepdims=1)

    def round_to_fp8(self, value: ir.Value) -> ir.Value:
        """Float32 -> FP8 E4M3 (ties to even, saturating) -> float32, by Q/DQ with scale 1."""
        return self.from_fp8(self.to_fp8(value))

    def to_fp8(self, value: ir.Value) -> ir.Value:
        return self.op("QuantizeLinear", [value, self.scalar(1.0, "one"), self.fp8_zero()], "fp8", saturate=1)

    def from_fp8(self, value: ir.Value) -> ir.Value:
        """FP8 -> float32 (exact). The zero point is explicit: ORT's Q/DQ propagation copies a DQ's
        zero point type, and without one it measured uint8 (negatives lost) at opset 19."""
        return self.op(
            "DequantizeLinear", [value, self.scalar(1.0, "one"), self.fp8_zero()], "fp8_dequantized"
        )

    def fp8_zero(self) -> ir.Value:
        return self.constant(np.array(0, dtype=FLOAT8_E4M3FN), "fp8_zero")


def _rewire(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (graph outputs too) reads ``new``; ``new`` takes ``old``'s name."""
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None
    new.name = name
    if old.type is not None and new.type is None:
        new.type, new.shape = old.type, old.shape


def _remove(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    for node in nodes:
        for output in node.outputs:
            output.name = None  # the replacements carry the names now
    graph.remove(nodes, safe=True)


def _drop_unused_initializers(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name or "")


def _static_last_axis(node: ir.Node, value: ir.Value, axis: int, block_size: int) -> tuple[int, int]:
    """(rank, K) of ``value``, refusing what the Reshape-into-blocks rewrite cannot handle."""
    shape = value.shape
    last = shape[-1] if shape is not None and len(shape) else None
    if shape is None or not isinstance(last, int):
        raise OnnxqError(
            f"cannot emulate node {node.name}: the shape of {value.name} is unknown or its last axis symbolic",
            FIX,
        )
    rank = len(shape)
    if axis not in (-1, rank - 1):
        raise OnnxqError(
            f"cannot emulate node {node.name}: blocks along axis {axis}, only the last axis is emulated", FIX
        )
    if last % block_size:
        raise OnnxqError(
            f"cannot emulate node {node.name}: {last} is not a multiple of the block {block_size}", FIX
        )
    return rank, last


def _check_block_size(node: ir.Node, expected: int, default: int) -> None:
    block_size = node.attributes.get_int("block_size", default)
    if block_size != expected:
        raise OnnxqError(
            f"cannot emulate node {node.name}: block_size {block_size}, expected {expected}", FIX
        )


# --- NVFP4 activations ----------------------------------------------------------------------------


def _append_fp4_rounding(b: _Builder, v: ir.Value) -> ir.Value:
    """E2M1 value of float32 ``v`` as float32: sign * round(|v| clipped to 6) on the E2M1 grid.

    The grid step is 0.5 below 2, 1 below 4, 2 above; ``Round`` (half to even) of ``|v| / step``
    lands ties on the even code, as a cast to FLOAT4E2M1 does (0.25 -> 0, 0.75 -> 1, 2.5 -> 2,
    3.5 -> 4, 5 -> 4). Division and product by a power of two are exact.
    """
    magnitude = b.op("Min", [b.op("Abs", [v], "fp4_abs"), b.scalar(FP4_E2M1_MAX, "fp4_max")], "fp4_clipped")
    low, high = FP4_STEP_BOUNDS
    small, middle, large = FP4_STEPS
    below_high = b.op("Less", [magnitude, b.scalar(high, "fp4_bound_high")], "fp4_below_high")
    below_low = b.op("Less", [magnitude, b.scalar(low, "fp4_bound_low")], "fp4_below_low")
    outer = b.op(
        "Where",
        [below_high, b.scalar(middle, "fp4_step_middle"), b.scalar(large, "fp4_step_large")],
        "fp4_step_outer",
    )
    step = b.op("Where", [below_low, b.scalar(small, "fp4_step_small"), outer], "fp4_step")
    rounded = b.op(
        "Mul",
        [b.op("Round", [b.op("Div", [magnitude, step], "fp4_steps")], "fp4_round"), step],
        "fp4_magnitude",
    )
    # the cast to FLOAT4E2M1 keeps the sign of zeros (-0 -> -0, -0.2 -> -0); Sign(-0) is 0 and ORT's
    # Where returns +0 for a selected -0, so the sign comes from 1 / v (-inf for -0) as a factor +/-1
    negative = b.op(
        "Less", [b.op("Reciprocal", [v], "fp4_reciprocal"), b.scalar(0.0, "fp4_zero")], "fp4_negative"
    )
    sign = b.op(
        "Where", [negative, b.scalar(-1.0, "fp4_minus_one"), b.scalar(1.0, "fp4_plus_one")], "fp4_sign"
    )
    return b.op("Mul", [sign, rounded], "fp4_value")


def _fp4_dequantizers(node: ir.Node) -> list[tuple[ir.Node, ir.Node, ir.Value]]:
    """(scale DQ, value DQ, scale DQ's global scale) for each use of the FP4 output of ``node``.

    Simple means: the FP4 values feed only standard DequantizeLinear (input 0, blocks of 16 along
    the last axis) whose scale is ``DequantizeLinear(node's FP8 scales, constant scalar)``, and the FP8
    scales feed nothing else. Anything else is an OnnxqError naming ``node``.
    """
    values, scales = node.outputs[0], node.outputs[1]
    name = node.name or node.op_type

    def refuse(reason: str) -> OnnxqError:
        return OnnxqError(f"cannot emulate node {name}: {reason}", FIX)

    if values.is_graph_output() or scales.is_graph_output():
        raise refuse("its FP4 values or FP8 scales are graph outputs")
    pairs: list[tuple[ir.Node, ir.Node, ir.Value]] = []
    for use in values.uses():
        dq = use.node
        if dq.op_type != "DequantizeLinear" or dq.domain not in DEFAULT_DOMAINS or use.idx != 0:
            raise refuse(f"its FP4 values feed {dq.op_type} node {dq.name}, not a DequantizeLinear")
        if len(dq.inputs) > 2 and dq.inputs[2] is not None:
            raise refuse(f"DequantizeLinear {dq.name} has a zero point")
        _check_block_size(dq, NVFP4_BLOCK_SIZE, 0)
        scale = dq.inputs[1]
        scale_dq = scale.producer() if scale is not None else None
        if scale_dq is None or scale_dq.op_type != "DequantizeLinear" or scale_dq.inputs[0] is not scales:
            raise refuse(
                f"the scale of DequantizeLinear {dq.name} is not DequantizeLinear(FP8 scales, global)"
            )
        global_scale = scale_dq.inputs[1]
        if global_scale is None or global_scale.const_value is None or global_scale.const_value.size != 1:
            raise refuse(f"the global scale of {scale_dq.name} is not a constant scalar")
        pairs.append((scale_dq, dq, global_scale))
    scale_dqs = {id(s) for s, _, _ in pairs}
    value_dqs = {id(d) for _, d, _ in pairs}
    if any(id(use.node) not in scale_dqs for use in scales.uses()):
        raise refuse("its FP8 scales feed nodes other than the scale DequantizeLinear")
    for scale_dq, _, _ in pairs:
        output = scale_dq.outputs[0]
        if output.is_graph_output() or any(id(u.node) not in value_dqs for u in output.uses()):
            raise refuse(f"the output of {scale_dq.name} feeds nodes other than the value DequantizeLinear")
    return pairs


def _scalar_value(value: ir.Value) -> np.float32:
    assert value.const_value is not None
    return np.float32(value.const_value.numpy().reshape(()))


def _emulate_fp4_quantizer(b: _Builder, node: ir.Node) -> None:
    x, global_scale = node.inputs[0], node.inputs[1]
    assert x is not None and global_scale is not None
    if global_scale.const_value is None or global_scale.const_value.size != 1:
        raise OnnxqError(f"cannot emulate node {node.name}: its global scale is not a constant scalar", FIX)
    _check_block_size(node, NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    rank, length = _static_last_axis(node, x, node.attributes.get_int("axis", 1), NVFP4_BLOCK_SIZE)
    pairs = _fp4_dequantizers(node)
    b.prefix = node.name or "fp4"
    g = _scalar_value(global_scale)
    blocks = b.blocks(b.as_float32(x), rank, length, NVFP4_BLOCK_SIZE)
    # block scale = fp8(clip(amax / (6 * g), 2**-9, 448)); 6 * g in float32, as nvfp4_block_scale does
    unrounded = b.op(
        "Div", [b.block_amax(blocks), b.scalar(np.float32(FP4_E2M1_MAX) * g, "six_global")], "block_scale"
    )
    clipped = b.op(
        "Clip", [unrounded, b.scalar(FP8_E4M3_MIN_SUBNORMAL, "scale_min"), b.scalar(FP8_E4M3_MAX, "scale_max")], "block_scale_clipped"
    )  # fmt: skip
    block_scale = b.round_to_fp8(clipped)
    scale = b.op("Mul", [block_scale, b.scalar(g, "global_scale")], "scale")
    fp4 = _append_fp4_rounding(b, b.op("Div", [blocks, scale], "scaled"))
    shape = b.op("Shape", [x], "shape")
    replaced = []
    for _, value_dq, dq_global in pairs:
        dq_scale = b.op(
            "Mul",
            [block_scale, b.scalar(_scalar_value(dq_global), "dq_global")],
            "dq_scale",
        )
        result = b.op("Reshape", [b.op("Mul", [fp4, dq_scale], "dequantized_blocks"), shape], "dequantized")
        output_dtype = value_dq.attributes.get_int("output_dtype", 0)
        result = b.cast(result, ir.DataType(output_dtype)) if output_dtype else result
        replaced.append((value_dq.outputs[0], result))
    b.insert_before(node)
    for old, new in replaced:
        _rewire(b.graph, old, new)
    _remove(b.graph, [d for _, d, _ in pairs])
    _remove(b.graph, list({id(s): s for s, _, _ in pairs}.values()))
    _remove(b.graph, [node])
    _drop_unused_initializers(b.graph, [global_scale, *(g for _, _, g in pairs)])


# --- MXFP8 ----------------------------------------------------------------------------------------


def _pow2_table(b: _Builder) -> tuple[ir.Value, int]:
    """float32 2**e for e in [POW2_TABLE_MIN_EXPONENT, POW2_TABLE_MAX_EXPONENT], and the index offset."""
    exponents = np.arange(POW2_TABLE_MIN_EXPONENT, POW2_TABLE_MAX_EXPONENT + 1, dtype=np.int32)
    return b.constant(
        np.ldexp(np.float32(1.0), exponents).astype(np.float32), "pow2"
    ), -POW2_TABLE_MIN_EXPONENT


def _gather_pow2(b: _Builder, table: ir.Value, offset: int, exponent: ir.Value, label: str) -> ir.Value:
    index = b.op("Add", [exponent, b.scalar(float(offset), f"{label}_offset")], f"{label}_index_float")
    return b.op("Gather", [table, b.op("Cast", [index], f"{label}_index", to=ir.DataType.INT64.value)], label)


def _mx_exponent(b: _Builder, amax: ir.Value) -> ir.Value:
    """clip(floor(log2(amax)) - 8, -126, 127), 0 for amax 0 (e8m0.mx_shared_exponent), as float32.

    floor(log2) is a Log estimate clipped to the table, then corrected by one step either way with
    exact comparisons against 2**estimate: float32 Log is off by far less than one binade.
    """
    table, offset = _pow2_table(b)
    positive = b.op("Greater", [amax, b.scalar(0.0, "zero")], "positive")
    safe = b.op("Where", [positive, amax, b.scalar(1.0, "one")], "safe_amax")
    log2 = b.op("Mul", [b.op("Log", [safe], "log"), b.scalar(1.0 / math.log(2.0), "inv_ln2")], "log2")
    estimate = b.op(
        "Clip", [b.op("Floor", [log2], "floor"), b.scalar(POW2_TABLE_MIN_EXPONENT, "table_min"), b.scalar(POW2_TABLE_MAX_EXPONENT, "table_max")], "estimate",
    )  # fmt: skip
    power = _gather_pow2(b, table, offset, estimate, "pow2_estimate")
    too_high = b.op(
        "Cast", [b.op("Greater", [power, safe], "too_high")], "too_high_float", to=ir.DataType.FLOAT.value
    )
    doubled = b.op("Mul", [power, b.scalar(2.0, "two")], "pow2_doubled")
    too_low = b.op(
        "Cast", [b.op("LessOrEqual", [doubled, safe], "too_low")], "too_low_float", to=ir.DataType.FLOAT.value
    )
    floor_log2 = b.op("Add", [b.op("Sub", [estimate, too_high], "lowered"), too_low], "floor_log2")
    shifted = b.op("Sub", [floor_log2, b.scalar(FP8_E4M3_EMAX, "emax")], "shared_exponent")
    clipped = b.op(
        "Clip", [shifted, b.scalar(MIN_NORMAL_EXPONENT, "exponent_min"), b.scalar(E8M0_MAX_EXPONENT, "exponent_max")], "exponent_clipped"
    )  # fmt: skip
    return b.op("Where", [positive, clipped, b.scalar(ZERO_BLOCK_EXPONENT, "zero_exponent")], "exponent")


def _emulate_mxfp8_quantizer(b: _Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    assert x is not None
    _check_block_size(node, MXFP8_BLOCK_SIZE, MXFP8_BLOCK_SIZE)
    rank, length = _static_last_axis(node, x, node.attributes.get_int("axis", -1), MXFP8_BLOCK_SIZE)
    b.prefix = node.name or "mxfp8"
    blocks = b.blocks(b.as_float32(x), rank, length, MXFP8_BLOCK_SIZE)
    exponent = _mx_exponent(b, b.block_amax(blocks))
    table, offset = _pow2_table(b)
    scale = _gather_pow2(b, table, offset, exponent, "scale")
    scaled = b.op("Div", [blocks, scale], "scaled")  # exact: division by a power of two
    # reshaped back before the FP8 QuantizeLinear: ORT has no FP8 Reshape below opset 21
    values = b.to_fp8(b.op("Reshape", [scaled, b.op("Shape", [x], "shape")], "scaled_unblocked"))
    code = b.op("Add", [exponent, b.scalar(E8M0_BIAS, "bias")], "code_float")
    squeezed = b.op("Squeeze", [code, b.constant(np.array([-1], np.int64), "last_axis")], "code_blocks")
    codes = b.op("Cast", [squeezed], "codes", to=ir.DataType.UINT8.value)
    b.insert_before(node)
    _rewire(b.graph, node.outputs[0], values)
    _rewire(b.graph, node.outputs[1], codes)
    _remove(b.graph, [node])


def _emulate_mxfp8_dequantizer(b: _Builder, node: ir.Node) -> None:
    values, codes = node.inputs[0], node.inputs[1]
    assert values is not None and codes is not None
    _check_block_size(node, MXFP8_BLOCK_SIZE, MXFP8_BLOCK_SIZE)
    rank, length = _static_last_axis(node, values, node.attributes.get_int("axis", -1), MXFP8_BLOCK_SIZE)
    b.prefix = node.name or "mxfp8_dq"
    widened = b.from_fp8(values)
    blocks = b.blocks(widened, rank, length, MXFP8_BLOCK_SIZE)
    # code c stands for 2**(c - 127); 255 is NaN (E8M0 has no other special value)
    table = b.constant(
        np.arange(E8M0_CODES, dtype=np.uint8).view(FLOAT8_E8M0FNU).astype(np.float32), "e8m0_values"
    )
    index = b.op(
        "Unsqueeze",
        [
            b.op("Cast", [codes], "code_index", to=ir.DataType.INT64.value),
            b.constant(np.array([-1], np.int64), "last_axis"),
        ],
        "code_blocks",
    )
    scale = b.op("Gather", [table, index], "scale")
    result = b.op(
        "Reshape",
        [b.op("Mul", [blocks, scale], "dequantized_blocks"), b.op("Shape", [widened], "shape")],
        "dequantized",
    )
    output_dtype = ir.DataType(node.attributes.get_int("output_dtype", ir.DataType.FLOAT.value))
    result = b.cast(result, output_dtype)
    b.insert_before(node)
    _rewire(b.graph, node.outputs[0], result)
    _remove(b.graph, [node])
