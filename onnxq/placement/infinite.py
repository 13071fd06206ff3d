"""Static search for tensors that can carry +/-inf, such as exported attention masks.

``Where(mask, 0, -inf)`` added to attention scores before Softmax is the common case: every tensor on
that path holds -inf by design. Such tensors must never get Q/DQ (a scale computed from them is inf or
meaningless and collapses the model). Calibration also reports tensors that were seen non-finite.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: ops whose output is finite whatever their input (or not a float at all)
FINITE_OUTPUT_OPS = frozenset(
    {"Softmax", "Sigmoid", "Tanh", "IsInf", "IsNaN", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
     "Not", "And", "Or", "Xor", "Shape", "Size", "ArgMax", "ArgMin", "HardSigmoid", "Erf", "Sign"}
)  # fmt: skip


def constant_is_nonfinite(value: ir.Value) -> bool:
    tensor = value.const_value
    if tensor is None or tensor.dtype not in (
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
    ):
        return False
    if tensor.size > 1 << 16:  # weights: checking every big tensor costs I/O; masks are small constants
        return False
    return not bool(np.isfinite(tensor.numpy().astype(np.float32)).all())


def find_infinite_tensors(graph: ir.Graph) -> dict[str, str]:
    """Tensor name -> why it can carry +/-inf, propagated forward in topological order.

    Cases: a non-finite constant (initializer or Constant node); any op consuming such a tensor,
    except those in ``FINITE_OUTPUT_OPS`` (Softmax of masked scores is finite again).
    """
    infinite = {
        v.name: "constant holds inf/NaN"
        for v in graph.initializers.values()
        if v.name and constant_is_nonfinite(v)
    }
    for node in graph:
        if node.op_type == "Constant":
            infinite.update(_constant_node(node))
            continue
        sources = [v.name for v in node.inputs if v is not None and v.name in infinite]
        if sources and node.op_type not in FINITE_OUTPUT_OPS:
            why = (
                f"from {sources[0]} via {node.op_type}"
                if not infinite[sources[0]].startswith("from ")
                else infinite[sources[0]]
            )
            infinite.update({out.name: why for out in node.outputs if out.name})
    return infinite


def _constant_node(node: ir.Node) -> dict[str, str]:
    attribute = node.attributes.get("value")
    if attribute is None or not isinstance(attribute, ir.Attr):
        return {}
    probe = ir.Value(name=node.outputs[0].name, const_value=attribute.as_tensor())
    return {node.outputs[0].name or "": "constant holds inf/NaN"} if constant_is_nonfinite(probe) else {}
