"""Write a plan's block choices into the graph: each GEMM's weight in its block form, and its dynamic
activation quantization (see ``onnxq.placement.block_plan`` for the choices).

Weight forms by format and target:
- INT4/UINT4, TensorRT (and any ONNX runtime): INT4 initializer + blocked ``DequantizeLinear``;
- INT4/UINT4, ONNX Runtime: ``com.microsoft.MatMulNBits`` replacing the node;
- NVFP4: FLOAT4E2M1 values + FP8 block scales + FP32 global scale, two chained ``DequantizeLinear``;
- MXFP8: FP8 values + E8M0 scales, one ``DequantizeLinear`` (opset 24).
Activations: ``TRT_FP4DynamicQuantize`` (global scale from the calibrated amax) or
``TRT_MXFP8DynamicQuantize``, each followed by its dequantization. INT8/FP8 activations of the same
GEMMs are placed by the ordinary Q/DQ insertion, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.calibration.calibrator import TensorRange
from onnxq.graph import block_weights, fp4_weights
from onnxq.placement.block_plan import BlockChoice

#: MatMulNBits ``accuracy_level`` for the ORT target: 4 quantizes A to int8 per block inside the kernel,
#: ONNX Runtime's fast CPU path (measured on the benchmark decoder: 3.5x FP32 at one token, batch 1 and
#: 8, -0.04 dB); 0 keeps A float (exact, but slower than FP32 from batch 8 on)
DEFAULT_ACCURACY_LEVEL = 4


@dataclass
class BlockEmission:
    weights: int = 0
    dynamic_activations: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


def emit_blocks(
    model: ir.Model,
    choices: list[BlockChoice],
    target: str,
    ranges: dict[str, TensorRange],
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> BlockEmission:
    """Rewrite ``model`` in place for ``choices``; ``ranges`` give the NVFP4 activations' global amax;
    ``accuracy_level`` is MatMulNBits' (ONNX Runtime target)."""
    graph = model.graph
    nodes = {node.name: node for node in graph}
    stats = BlockEmission()
    for choice in choices:
        node = nodes[choice.node]
        weight = node.inputs[1]
        _emit_activation(graph, node, choice, ranges, stats)
        _emit_weight(model, node, choice, target, stats, accuracy_level)
        _release_if_unused(weight)
    return stats


def _release_if_unused(weight: ir.Value | None) -> None:
    """Unmap a float weight read from external data once nothing reads it: its pages would otherwise
    stay resident (each ExternalTensor maps the file), and a model over 2 GB would need its full size
    in memory on top of the quantized weights."""
    if weight is None or weight.uses() or weight.is_graph_output():
        return
    if isinstance(weight.const_value, ir.ExternalTensor):
        weight.const_value.release()


def _emit_weight(
    model: ir.Model,
    node: ir.Node,
    choice: BlockChoice,
    target: str,
    stats: BlockEmission,
    accuracy_level: int,
) -> None:
    if choice.weight_format in ("int4", "uint4"):
        if target == "ort":
            record = block_weights.emit_matmul_nbits(
                model, node, choice.block_size, zero_point=choice.zero_point, clip_ratio=choice.clip_ratio,
                accuracy_level=accuracy_level, grid=choice.int4_grid,
            )  # fmt: skip
        else:
            record = block_weights.emit_dequantize_linear(
                model, node, choice.block_size, zero_point=choice.zero_point, clip_ratio=choice.clip_ratio,
                grid=choice.int4_grid,
            )  # fmt: skip
        stats.weight_bytes_before += record.weight_bytes_before
        stats.weight_bytes_after += record.weight_bytes_after
    else:
        weight = node.inputs[1]
        assert weight is not None and weight.const_value is not None
        before = weight.const_value.nbytes
        insert = (
            fp4_weights.insert_nvfp4_weight
            if choice.weight_format == "nvfp4"
            else fp4_weights.insert_mxfp8_weight
        )
        result = insert(model.graph, weight, [node], choice.k_axis)
        stats.weight_bytes_before += before
        stored = fp4_weights.quantized_inputs(result)
        stats.weight_bytes_after += sum(v.const_value.nbytes for v in stored if v.const_value is not None)
    stats.weights += 1


def _emit_activation(
    graph: ir.Graph, node: ir.Node, choice: BlockChoice, ranges: dict[str, TensorRange], stats: BlockEmission
) -> None:
    if choice.activation_format not in ("nvfp4", "mxfp8"):
        return
    from onnxq.graph import dynamic_quantize

    value = node.inputs[0]  # the activation the plan names: the GEMM's input A
    assert value is not None and value.name == choice.activation
    if choice.activation_format == "nvfp4":
        found = ranges[choice.activation]
        amax = float(max(abs(found.chosen_low), abs(found.chosen_high)))
        dynamic_quantize.insert_nvfp4_activation(graph, value, [(node, 0)], amax)
    else:
        dynamic_quantize.insert_mxfp8_activation(graph, value, [(node, 0)])
    stats.dynamic_activations += 1


def transpose_clip(clip_ratio: np.ndarray | None, k_axis: int) -> np.ndarray | None:
    """AWQ gives clip ratios for W[K, N] ([n_blocks, N]); a Gemm with transB=1 stores [N, n_blocks]."""
    if clip_ratio is None or k_axis == 0:
        return clip_ratio
    return np.ascontiguousarray(clip_ratio.T)
