"""Activations in NVFP4 and MXFP8, in the form TensorRT's ONNX parser reads (its ``trt`` custom domain).

Both formats quantize activations at run time, block by block along the last axis, with TensorRT's
``DynamicQuantize`` layer. Its ONNX spellings (what NVIDIA's ModelOpt exports):

NVFP4 (blocks of 16, FP8 E4M3 block scales, one calibrated FP32 global scale ``g = amax / (6 * 448)``)::

    x -> TRT_FP4DynamicQuantize(x, g; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)
           -> x_fp4 (FLOAT4E2M1, x's shape), scales (FLOAT8E4M3FN, x's shape with K / 16 last)
    s  = DequantizeLinear(scales, g)                              (float32, standard op)
    x' = DequantizeLinear(x_fp4, s, axis=-1, block_size=16)       (float32, standard op, opset 23)

MXFP8 (blocks of 32, E8M0 power-of-two scales carried as UINT8 bits, no global scale)::

    x -> TRT_MXFP8DynamicQuantize(x; axis=-1, block_size=32, output_dtype=FLOAT8E4M3FN)
           -> x_fp8 (FLOAT8E4M3FN, x's shape), scale (UINT8 E8M0 codes, K / 32 last)
    x' = TRT_MXFP8DequantizeLinear(x_fp8, scale; axis=-1, block_size=32, output_dtype=x's type)

Cases handled: float32/float16/bfloat16 activations of rank 2 or 3 whose last dimension is static and
a multiple of the block (TensorRT's limits: :func:`dynamic_quantize_problem`); graph inputs and node
outputs; only the listed consumer inputs are rewired (another consumer keeps reading ``x``); a
float16/bfloat16 NVFP4 activation gets a ``Cast`` back to its type after the float32 DQ chain (scales
stay float32, as for the weights). The caller raises the model to opset 23 / IR 11 for NVFP4 (FP4 DQ).
``onnxq.reference_ops`` runs these graphs in ``onnx.reference``; ``onnxq.emulate`` rewrites them into
standard ops for ONNX Runtime CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.formats.mxfp8 import MXFP8_BLOCK_SIZE
from onnxq.formats.nvfp4 import NVFP4_BLOCK_SIZE, nvfp4_global_scale
from onnxq.graph.passes import add_initializer, forget_names, insert_after_producer, unique_name

TRT_DOMAIN = "trt"
TRT_OPSET_VERSION = 1
FP4_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
MXFP8_DYNAMIC_QUANTIZE = "TRT_MXFP8DynamicQuantize"
MXFP8_DEQUANTIZE = "TRT_MXFP8DequantizeLinear"
#: TensorRT blocks activations along the last axis
ACTIVATION_AXIS = -1
#: ranks TensorRT's DynamicQuantize layer accepts
DYNAMIC_QUANTIZE_RANKS = (2, 3)
ACTIVATION_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
DYNAMIC_BLOCK_SIZE: dict[str, int] = {"nvfp4": NVFP4_BLOCK_SIZE, "mxfp8": MXFP8_BLOCK_SIZE}

DynamicFormat = Literal["nvfp4", "mxfp8"]


def dynamic_quantize_problem(value: ir.Value, fmt: DynamicFormat) -> str | None:
    """Why TensorRT's DynamicQuantize cannot take ``value`` (one line), or None when it can.

    Cases: type not float32/float16/bfloat16; unknown shape; rank not 2 or 3; last dimension symbolic
    or not a multiple of the block (16 NVFP4, 32 MXFP8).
    """
    if fmt not in DYNAMIC_BLOCK_SIZE:
        raise ValueError(f"unknown dynamic format {fmt!r}, expected one of {sorted(DYNAMIC_BLOCK_SIZE)}")
    block = DYNAMIC_BLOCK_SIZE[fmt]
    name = value.name or "the activation"
    if value.dtype not in ACTIVATION_TYPES:
        return f"{fmt} activations must be float32/float16/bfloat16, {name} is {value.dtype}"
    if value.shape is None:
        return f"the shape of {name} is unknown ({fmt} activations need rank 2 or 3 and a static last axis)"
    if len(value.shape) not in DYNAMIC_QUANTIZE_RANKS:
        return (
            f"{fmt} activations must have rank 2 or 3 (TensorRT's DynamicQuantize), {name} has {value.shape}"
        )
    last = value.shape[-1]
    if not isinstance(last, int):
        return f"the last dimension of {name} is symbolic ({last}); {fmt} needs it static"
    if last % block:
        return f"the last dimension {last} of {name} is not a multiple of the {fmt} block size {block}"
    return None


def insert_nvfp4_activation(
    graph: ir.Graph, value: ir.Value, consumers: Sequence[tuple[ir.Node, int]], amax: float
) -> ir.Value:
    """Quantize ``value`` to NVFP4 at run time for ``consumers`` (node, input index); return x'.

    The global scale is ``nvfp4_global_scale(amax)`` (calibrated amax / (6 * 448)), a float32 scalar
    initializer that the dynamic quantizer and the scale DQ share. Raises OnnxqError when
    :func:`dynamic_quantize_problem` has a reason.
    """
    _require(value, "nvfp4")
    forget_names(graph)
    base = value.name or "activation"
    global_scale = add_initializer(
        graph, f"{base}_global_scale", np.asarray(nvfp4_global_scale(amax), np.float32)
    )
    quantize = _node(
        graph, FP4_DYNAMIC_QUANTIZE, f"{base}_FP4DynamicQuantize", [value, global_scale],
        {"axis": ACTIVATION_AXIS, "block_size": NVFP4_BLOCK_SIZE, "scale_type": ir.DataType.FLOAT8E4M3FN.value},
        outputs=2, domain=TRT_DOMAIN,
    )  # fmt: skip
    values, scales = quantize.outputs
    _name_and_type(graph, values, f"{base}_fp4", ir.DataType.FLOAT4E2M1, value.shape)
    _name_and_type(
        graph, scales, f"{base}_block_scale", ir.DataType.FLOAT8E4M3FN, _scale_shape(value, "nvfp4")
    )
    scale_dq = _node(graph, "DequantizeLinear", f"{base}_scale_DequantizeLinear", [scales, global_scale], {})
    _name_and_type(graph, scale_dq.outputs[0], f"{base}_scale", ir.DataType.FLOAT, scales.shape)
    value_dq = _node(
        graph, "DequantizeLinear", f"{base}_DequantizeLinear", [values, scale_dq.outputs[0]],
        {"axis": ACTIVATION_AXIS, "block_size": NVFP4_BLOCK_SIZE},
    )  # fmt: skip
    _name_and_type(graph, value_dq.outputs[0], f"{base}_dequantized", ir.DataType.FLOAT, value.shape)
    nodes = [quantize, scale_dq, value_dq]
    if value.dtype != ir.DataType.FLOAT:  # scales stay float32; the consumer reads the activation's type
        assert value.dtype is not None
        cast = _node(graph, "Cast", f"{base}_Cast", [value_dq.outputs[0]], {"to": value.dtype.value})
        _name_and_type(
            graph, cast.outputs[0], f"{base}_dequantized_{value.dtype.name.lower()}", value.dtype, value.shape
        )
        nodes.append(cast)
    return _wire(graph, value, consumers, nodes)


def insert_mxfp8_activation(
    graph: ir.Graph, value: ir.Value, consumers: Sequence[tuple[ir.Node, int]]
) -> ir.Value:
    """Quantize ``value`` to MXFP8 at run time for ``consumers`` (node, input index); return x'.

    The dequantizer's ``output_dtype`` is the activation's own type, so no Cast is needed. Raises
    OnnxqError when :func:`dynamic_quantize_problem` has a reason.
    """
    _require(value, "mxfp8")
    assert value.dtype is not None
    forget_names(graph)
    base = value.name or "activation"
    attributes = {"axis": ACTIVATION_AXIS, "block_size": MXFP8_BLOCK_SIZE}
    quantize = _node(
        graph, MXFP8_DYNAMIC_QUANTIZE, f"{base}_MXFP8DynamicQuantize", [value],
        {**attributes, "output_dtype": ir.DataType.FLOAT8E4M3FN.value}, outputs=2, domain=TRT_DOMAIN,
    )  # fmt: skip
    values, scales = quantize.outputs
    _name_and_type(graph, values, f"{base}_fp8", ir.DataType.FLOAT8E4M3FN, value.shape)
    # TensorRT's parser takes E8M0 scales as their UINT8 bit patterns
    _name_and_type(graph, scales, f"{base}_e8m0_scale", ir.DataType.UINT8, _scale_shape(value, "mxfp8"))
    dequantize = _node(
        graph, MXFP8_DEQUANTIZE, f"{base}_MXFP8DequantizeLinear", [values, scales],
        {**attributes, "output_dtype": value.dtype.value}, domain=TRT_DOMAIN,
    )  # fmt: skip
    _name_and_type(graph, dequantize.outputs[0], f"{base}_dequantized", value.dtype, value.shape)
    return _wire(graph, value, consumers, [quantize, dequantize])


def _require(value: ir.Value, fmt: DynamicFormat) -> None:
    problem = dynamic_quantize_problem(value, fmt)
    if problem:
        raise OnnxqError(problem, "keep this activation in higher precision (leave it out of the plan)")


def _scale_shape(value: ir.Value, fmt: DynamicFormat) -> ir.Shape:
    assert value.shape is not None
    last = value.shape[-1]
    assert isinstance(last, int)
    return ir.Shape([*value.shape[:-1], last // DYNAMIC_BLOCK_SIZE[fmt]])


def _wire(
    graph: ir.Graph, value: ir.Value, consumers: Sequence[tuple[ir.Node, int]], nodes: list[ir.Node]
) -> ir.Value:
    """Insert ``nodes`` right after ``value`` is computed, feed the consumers' inputs from the last
    node's output, and declare the ``trt`` opset."""
    insert_after_producer(graph, value, nodes)
    result = nodes[-1].outputs[0]
    for node, index in consumers:
        if node.inputs[index] is not value:
            raise ValueError(f"input {index} of node {node.name} is not {value.name}")
        node.replace_input_with(index, result)
    graph.opset_imports.setdefault(TRT_DOMAIN, TRT_OPSET_VERSION)
    return result


def _node(
    graph: ir.Graph,
    op_type: str,
    name: str,
    inputs: list[ir.Value],
    attributes: dict[str, int],
    outputs: int = 1,
    domain: str = "",
) -> ir.Node:
    return ir.node(
        op_type,
        inputs,
        attributes=attributes,
        domain=domain,
        num_outputs=outputs,
        name=unique_name(graph, name),
    )


def _name_and_type(
    graph: ir.Graph, value: ir.Value, name: str, dtype: ir.DataType, shape: ir.Shape | None
) -> None:
    value.name = unique_name(graph, name)
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape) if shape is not None else None
