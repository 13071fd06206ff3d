"""Block-quantized INT4/UINT4 MatMul/Gemm weights, written in the form each target runs fast.

Two emitters, each rewriting one node in place on an ``onnx_ir`` model:

- :func:`emit_dequantize_linear` (TensorRT, and any ONNX runtime): the weight becomes an INT4 (or
  UINT4 + zero point) initializer feeding a standard ``DequantizeLinear(axis=K axis, block_size)``
  whose output replaces the float weight. Needs opset >= 21 and IR >= 10 (the caller upgrades).
- :func:`emit_matmul_nbits` (ONNX Runtime): ``com.microsoft.MatMulNBits`` replaces the node; weights
  packed uint8 ``[N, n_blocks, block_size / 2]`` (K padded to whole blocks with each block's zero
  point, i.e. with 0.0), scales ``[N, n_blocks]``, packed uint4 zero points ``[N, ceil(n_blocks / 2)]``
  only for UINT4 (INT4 codes are stored + 8, MatMulNBits' default zero point).

Both quantize the same way (:mod:`onnxq.formats.int4`), so they hold the same numbers.

Nodes handled (anything else raises ValueError with the reason, see :func:`weight_problem`):
- ``MatMul(A, W)`` with W a 2-D constant ``[K, N]``: blocks along axis 0.
- ``Gemm(A, B, C)``: B ``[K, N]`` (transB=0, axis 0) or ``[N, K]`` (transB=1, axis 1). The DQ form
  keeps the Gemm as is; MatMulNBits needs transA=0, folds alpha into the scales and beta * C into its
  bias when C is a constant with one value per output column (or a single value).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from onnxq.formats import int4
from onnxq.formats.granularity import block_size_problem
from onnxq.graph.passes import add_initializer, forget_names, unique_name
from onnxq.graph.qdq import scale_in_type

MATMULNBITS_DOMAIN = "com.microsoft"
#: ``accuracy_level`` 0: A stays float inside MatMulNBits (4 quantizes A to int8 per block: faster,
#: about 5e-3 relative error on ORT CPU)
ACCURACY_LEVEL_FLOAT = 0
#: MatMulNBits accepts power-of-two block sizes from 16 (ORT's contrib op schema)
MATMULNBITS_MIN_BLOCK = 16
#: INT4/UINT4 tensor types exist from IR version 10
MIN_IR_VERSION = 10
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclass(frozen=True)
class BlockWeightRecord:
    """What one emitter call did: the node, the weight and its size before/after (bytes on disk)."""

    node: str
    weight: str
    form: str
    k: int
    n: int
    block_size: int
    weight_bytes_before: int
    weight_bytes_after: int


@dataclass(frozen=True)
class WeightMatrix:
    """The constant weight of a MatMul/Gemm, as stored, and which of its axes is K."""

    value: ir.Value
    array: np.ndarray
    k_axis: int

    @property
    def k(self) -> int:
        return int(self.array.shape[self.k_axis])

    @property
    def n(self) -> int:
        return int(self.array.shape[1 - self.k_axis])


def weight_problem(node: ir.Node) -> str | None:
    """Why ``node`` has no block-quantizable weight (one line), or None when it has one."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return f"{node.op_type} is not a MatMul or Gemm"
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return "its weight (input 1) is not a constant"
    if weight.is_graph_input():
        return "its weight is also a graph input, so callers may replace it at run time"
    if len(weight.const_value.shape) != 2:
        return f"its weight has rank {len(weight.const_value.shape)}, not 2"
    if weight.const_value.dtype not in FLOAT_TYPES:
        return f"its weight is {weight.const_value.dtype.name}, not a float type"
    return None


def weight_matrix(node: ir.Node) -> WeightMatrix:
    """The node's constant weight; ValueError (with :func:`weight_problem`'s reason) when there is none."""
    problem = weight_problem(node)
    if problem:
        raise ValueError(f"{node.name}: {problem}")
    value = node.inputs[1]
    assert value is not None and value.const_value is not None
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
    return WeightMatrix(value, value.const_value.numpy(), 1 if transposed else 0)


def matmul_nbits_block_problem(block_size: int) -> str | None:
    """Why MatMulNBits cannot take ``block_size`` (its kernels need a power of two >= 16), or None."""
    problem = block_size_problem(block_size)
    if problem:
        return problem
    if block_size < MATMULNBITS_MIN_BLOCK or block_size & (block_size - 1):
        return f"block size {block_size} is not a power of two >= {MATMULNBITS_MIN_BLOCK} (MatMulNBits)"
    return None


def block_quantize(
    matrix: WeightMatrix,
    block_size: int,
    zero_point: bool,
    full_range: bool = False,
    clip_ratio: np.ndarray | None = None,
    grid: str | None = None,
) -> tuple[int4.BlockParams, np.ndarray]:
    """(parameters, codes) of the weight, blocks along K, scale rounded to the weight's float type first
    so that the codes are computed with the scale the graph stores (float16 weights: float16 scales).
    ``clip_ratio`` (scale shape, in (0, 1]) narrows each block's range, as AWQ's clip search chose."""
    params = int4.weight_params(
        matrix.array, matrix.k_axis, block_size, zero_point, full_range, clip_ratio=clip_ratio, grid=grid
    )
    params = replace(params, scale=stored_scale(params.scale, matrix.array.dtype).astype(np.float32))
    return params, int4.quantize(matrix.array, params)


def stored_scale(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``scale`` in the weight's float type, magnitude clamped to its normal range, sign kept (full-range
    INT4 and a negative Gemm alpha give negative scales, which ``scale_in_type`` alone would clamp)."""
    magnitude = scale_in_type(np.abs(scale), dtype)
    return np.where(np.asarray(scale) < 0, -magnitude, magnitude).astype(dtype)


def emit_dequantize_linear(
    model: ir.Model,
    node: ir.Node,
    block_size: int = int4.DEFAULT_BLOCK_SIZE,
    zero_point: bool = False,
    full_range: bool = False,
    clip_ratio: np.ndarray | None = None,
    grid: str | None = None,
) -> BlockWeightRecord:
    """Feed ``node`` an INT4 (UINT4 + zero point with ``zero_point``) weight through a blocked DQ.

    Cases: symmetric INT4 has no zero point input (0 by the ONNX default, as TensorRT expects); the
    float weight is removed once no other node reads it; ``full_range`` gives negative scales, which
    TensorRT rejects (ONNX Runtime only). Raises ValueError below opset 21 / IR 10.
    """
    _require_block_qdq(model)
    matrix = weight_matrix(node)
    params, codes = block_quantize(matrix, block_size, zero_point, full_range, clip_ratio, grid)
    graph = _graph(node)
    forget_names(graph)
    base = matrix.value.name or "weight"
    stored = [
        add_initializer(graph, f"{base}_quantized", codes),
        add_initializer(graph, f"{base}_scale", params.scale.astype(matrix.array.dtype)),  # already rounded
    ]
    if zero_point:
        stored.append(add_initializer(graph, f"{base}_zero_point", params.zero_point))
    dequantize = ir.node(
        "DequantizeLinear", stored, attributes=params.granularity.qdq_attributes(2),
        name=unique_name(graph, f"{base}_DequantizeLinear"),
    )  # fmt: skip
    dequantize.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dequantize.outputs[0].type, dequantize.outputs[0].shape = matrix.value.type, matrix.value.shape
    graph.insert_before(node, dequantize)
    node.replace_input_with(1, dequantize.outputs[0])
    return _record(node, matrix, "dequantize_linear", block_size, stored)


def emit_matmul_nbits(
    model: ir.Model,
    node: ir.Node,
    block_size: int = int4.DEFAULT_BLOCK_SIZE,
    zero_point: bool = False,
    accuracy_level: int = ACCURACY_LEVEL_FLOAT,
    full_range: bool = False,
    clip_ratio: np.ndarray | None = None,
    grid: str | None = None,
) -> BlockWeightRecord:
    """Replace ``node`` by ``com.microsoft.MatMulNBits`` holding the same INT4/UINT4 numbers.

    ``full_range`` INT4 and UINT4 + zero point give the very bytes of ONNX Runtime's
    ``MatMul4BitsQuantizer`` (symmetric / asymmetric RTN) on every weight nibble. Raises ValueError
    for a block size MatMulNBits rejects, a 1-D input A, a Gemm with transA=1, or a Gemm bias that is
    not a constant per output column.
    """
    problem = matmul_nbits_block_problem(block_size)
    activation = node.inputs[0]
    if (
        problem is None
        and activation is not None
        and activation.shape is not None
        and activation.shape.rank() < 2
    ):
        problem = "input A is 1-D; MatMulNBits needs A of rank >= 2"
    if problem:
        raise ValueError(f"{node.name}: {problem}")
    matrix = weight_matrix(node)
    alpha, bias = _gemm_terms(node, matrix.n)
    params, codes = block_quantize(matrix, block_size, zero_point, full_range, clip_ratio, grid)
    graph = _graph(node)
    forget_names(graph)
    base = matrix.value.name or "weight"
    float_type = matrix.array.dtype
    unsigned, zero = int4.to_unsigned(codes, params)
    # K last: [N, K] -> [N, n_blocks, block_size] (padded with the zero point) -> two codes a byte
    blocks = int4.padded_blocks(unsigned, matrix.k_axis, block_size, zero)
    scales = np.moveaxis(params.scale, matrix.k_axis, -1) * np.float32(alpha)
    stored = [
        add_initializer(graph, f"{base}_packed", int4.pack_nibbles(blocks)),
        add_initializer(graph, f"{base}_scales", stored_scale(scales, float_type)),
    ]
    if zero_point:
        # [N, ceil(n_blocks / 2)], an odd tail filled with 8 as ONNX Runtime's own quantizer writes it
        packed_zero = int4.pack_nibbles(
            np.moveaxis(zero, matrix.k_axis, -1), int4.MATMULNBITS_DEFAULT_ZERO_POINT
        )
        stored.append(add_initializer(graph, f"{base}_zero_points", packed_zero))
    inputs: list[ir.Value | None] = [node.inputs[0], *stored]
    if bias is not None:
        inputs += [None] * (5 - len(inputs)) + [
            add_initializer(graph, f"{base}_bias", bias.astype(float_type))
        ]
    attributes = {"K": matrix.k, "N": matrix.n, "bits": 4, "block_size": block_size}
    attributes["accuracy_level"] = accuracy_level
    fused = ir.node(
        "MatMulNBits", inputs, attributes=attributes, domain=MATMULNBITS_DOMAIN,
        name=node.name or unique_name(graph, f"{base}_MatMulNBits"),  # the plan's name for it
    )  # fmt: skip
    fused.outputs[0].type, fused.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], node.outputs, fused.outputs)
    model.opset_imports.setdefault(MATMULNBITS_DOMAIN, 1)
    return _record(fused, matrix, "matmul_nbits", block_size, stored)


def _gemm_terms(node: ir.Node, n: int) -> tuple[float, np.ndarray | None]:
    """(alpha, beta * C as [N] or None) of a Gemm; (1.0, None) for a MatMul."""
    if node.op_type != "Gemm":
        return 1.0, None
    if node.attributes.get_int("transA", 0):
        raise ValueError(f"{node.name}: Gemm with transA=1 has no MatMulNBits form")
    alpha = node.attributes.get_float("alpha", 1.0)
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return alpha, None
    array = c.const_value.numpy() if c.const_value is not None else None
    # [N], [1, N] and single values add the same number to every row; [M, N] or [N, 1] do not
    if (
        array is None
        or array.size not in (1, n)
        or array.ndim > 2
        or (array.ndim == 2 and array.shape[0] != 1)
    ):
        raise ValueError(f"{node.name}: Gemm input C is not a constant with one value per output column")
    bias = array.astype(np.float32).reshape(-1) * np.float32(node.attributes.get_float("beta", 1.0))
    return alpha, np.broadcast_to(bias, (n,)).copy()


def _require_block_qdq(model: ir.Model) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < int4.MIN_OPSET or model.ir_version < MIN_IR_VERSION:
        raise ValueError(
            f"INT4 block DequantizeLinear needs opset >= {int4.MIN_OPSET} and IR >= {MIN_IR_VERSION} "
            f"(the model has opset {opset}, IR {model.ir_version}); upgrade the model first"
        )


def _graph(node: ir.Node) -> ir.Graph:
    graph = node.graph
    if not isinstance(graph, ir.Graph):
        raise ValueError(f"{node.name} is not in a graph")
    return graph


def _record(
    node: ir.Node, matrix: WeightMatrix, form: str, block_size: int, stored: list[ir.Value]
) -> BlockWeightRecord:
    """The record; drops the float weight when nothing reads it any more."""
    before = matrix.array.nbytes
    after = sum(v.const_value.nbytes for v in stored if v.const_value is not None)
    value = matrix.value
    if not value.uses() and value.graph is not None and not value.is_graph_output():
        value.graph.initializers.pop(value.name or "", None)
    return BlockWeightRecord(
        node.name or "", value.name or "", form, matrix.k, matrix.n, block_size, before, after
    )
