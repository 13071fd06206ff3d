"""Quantization a model already holds: refuse it, or keep it and quantize only what is still float.

Quantizing such a model again would put a second Q/DQ on tensors that are already quantized (weights
included). What counts as quantized, in any domain, in the main graph, in If/Loop/Scan bodies and in
local functions:

- Q/DQ pairs and quantized initializers feeding DequantizeLinear (``QuantizeLinear``,
  ``DequantizeLinear``), and any other op whose name holds "quantize" (``DynamicQuantizeLinear``,
  ``DynamicQuantizeLSTM``, ``DynamicQuantizeMatMul``, ``GatherBlockQuantized``, TensorRT's
  ``TRT_FP8QuantizeLinear``, ...);
- ONNX Runtime's quantized kernels: ``QLinear*``, ``QOrdered*``, ``QGemm``, ``QAttention``, ...;
- integer kernels ``ConvInteger``, ``MatMulInteger``, ``MatMulIntegerToFloat``;
- packed low-bit weights: ``MatMulNBits``, ``MatMulBnb4``, ``MatMulFpQ4``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph.walk import all_nodes
from onnxq.placement.plan import Plan

QUANTIZED_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "QMoE",
        "MatMulNBits",
        "MatMulBnb4",
        "MatMulFpQ4",
    }
)
QUANTIZED_PREFIXES = ("QLinear", "QOrdered")
#: the plan's skip category for tensors left alone because they are already quantized
CATEGORY = "already quantized"


def is_quantized_op(node: ir.Node) -> bool:
    op = node.op_type
    # lower case: "DequantizeLinear" spells it with a small q
    return op in QUANTIZED_OPS or op.startswith(QUANTIZED_PREFIXES) or "quantize" in op.lower()


def quantized_nodes(model: ir.Model) -> list[ir.Node]:
    """Every quantized op of ``model``: main graph, subgraphs (recursively) and local functions."""
    return [node for node in all_nodes(model) if is_quantized_op(node)]


def summary(nodes: list[ir.Node]) -> str:
    """'12 ConvInteger, 1 DynamicQuantizeLSTM': most frequent op first, then by name."""
    counts = Counter(node.op_type for node in nodes)
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def model_label(model: Any) -> str:
    """The file name for a path, else a generic name (ModelProto, onnx_ir.Model, ...)."""
    return Path(model).name if isinstance(model, (str, os.PathLike)) else "the model"


def refuse_unless_kept(model: ir.Model, label: str, keep_quantized: bool) -> list[ir.Node]:
    """The quantized ops of ``model``; an error when there are some and ``keep_quantized`` is off."""
    nodes = quantized_nodes(model)
    if nodes and not keep_quantized:
        raise OnnxqError(
            f"{label} is already quantized ({summary(nodes)})",
            "quantize the original float model, or pass --keep-quantized to quantize only what is still float",
        )
    return nodes


def keep_existing(model: ir.Model, plan: Plan) -> list[str]:
    """Drop from ``plan`` every tensor that an existing quantized op reads or writes; return them.

    Cases: the input of a QuantizeLinear (already quantized there), the output of a DequantizeLinear
    (a quantized weight or activation: no second Q/DQ), the float input or output of a quantized
    kernel (DynamicQuantizeLinear, MatMulNBits, ...). Dropping a tensor leaves the node that needed it
    float too, so a half-quantized layer (float weight quantized beside a DQ activation) cannot occur.
    """
    adjacent: dict[str, ir.Node] = {}
    for node in quantized_nodes(model):
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name:
                adjacent.setdefault(value.name, node)
    planned = {use.tensor for decision in plan.decisions for use in decision.uses}
    dropped = sorted(planned & set(adjacent))
    for tensor in dropped:
        node = adjacent[tensor]
        plan.drop_tensor(tensor, f"{tensor} is already quantized ({node.op_type} {node.name})", CATEGORY)
    return dropped
