"""Matchers: for one node and one rule, either the tensor uses to quantize or the reason not to.

Each matcher is a small function ``(node, rule, context) -> list[TensorUse] | Skip``. Rule files pick a
matcher by ``kind``; the parameters come from the rule. Matchers that depend on their neighbours'
decisions (``neighbour``, ``shared_scale``) run in a second, backward pass (see ``planner.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxq.placement.plan import Plan, TensorUse
from onnxq.placement.rules import Rule

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class Skip:
    reason: str
    category: str


@dataclass
class Context:
    graph: ir.Graph
    plan: Plan
    #: tensors that can carry +/-inf -> why
    infinite: dict[str, str]
    quantize_bmm: bool = True
    quantize_graph_outputs: bool = False
    #: node name -> position in topological order
    order: dict[str, int] = field(default_factory=dict)


Match = list[TensorUse] | Skip
Matcher = Callable[[ir.Node, Rule, Context], Match]


def activation_problem(value: ir.Value | None, context: Context) -> Skip | None:
    """Why an activation input cannot be quantized, or None when it can."""
    if value is None:
        return Skip("input missing", "missing input")
    if value.dtype not in FLOAT_TYPES:
        return Skip(f"input {value.name} is {value.dtype}, not float", "not float")
    if value.name in context.infinite:
        return Skip(f"input {value.name} can carry +/-inf ({context.infinite[value.name]})", "can carry inf")
    return None


def _static_dims(value: ir.Value | None) -> list[int | None]:
    """Declared dims, None where dynamic: symbolic, unknown, or negative (paddle2onnx writes -1)."""
    if value is None or value.shape is None:
        return []
    return [d if isinstance(d, int) and d >= 0 else None for d in value.shape]


def _weight_use(node: ir.Node, index: int, axis: int | None, rule: Rule) -> TensorUse:
    weight = node.inputs[index]
    assert weight is not None and weight.name is not None
    return TensorUse(weight.name, "weight", node.name or "", index, axis, rule.get("int8_weight_format"))


def _activation_use(node: ir.Node, index: int) -> TensorUse:
    value = node.inputs[index]
    assert value is not None and value.name is not None
    return TensorUse(value.name, "activation", node.name or "", index, None)


def match_weighted(node: ir.Node, rule: Rule, context: Context) -> Match:
    """Conv, ConvTranspose, Gemm: activation input 0 per tensor, weight per output channel, bias float.

    Cases: non-constant weight (skip), too few channels (skip), too small GEMM (skip), activation
    that is not float or can carry inf (skip), grouped ConvTranspose (weight per tensor: channels of
    different groups interleave on its axis 1), optional output quantization (ONNX Runtime).
    """
    weight_index = int(rule.get("weight_input", 1))
    weight = node.inputs[weight_index] if len(node.inputs) > weight_index else None
    if weight is None or weight.const_value is None:
        return Skip("weight is not a constant (computed at run time)", "non-constant weight")
    problem = activation_problem(node.inputs[0], context) or _size_problem(node, weight, rule)
    if problem:
        return problem
    uses = [_activation_use(node, 0), _weight_use(node, weight_index, _weight_axis(node, weight, rule), rule)]
    if rule.get("quantize_output", False):
        uses += _output_use(node, rule, context)
    return uses


def _size_problem(node: ir.Node, weight: ir.Value, rule: Rule) -> Skip | None:
    shape = _constant_shape(weight)
    if node.op_type in ("Conv", "ConvTranspose") and len(shape) >= 2:
        return _channel_problem(node, shape, int(rule.get("min_channels", 1))) or _group_problem(
            node, shape, int(rule.get("min_group_channels", 1))
        )
    if node.op_type == "Gemm" and len(shape) == 2:
        return _gemm_problem(node, shape, int(rule.get("min_gemm_dim", 1)))
    return None


def _channel_problem(node: ir.Node, shape: list[int], minimum: int) -> Skip | None:
    group = node.attributes.get_int("group", 1)
    if node.op_type == "Conv":
        out_channels, in_channels = shape[0], shape[1] * group
    else:
        out_channels, in_channels = shape[1] * group, shape[0]
    if min(out_channels, in_channels) < minimum:
        return Skip(f"{in_channels}->{out_channels} channels (< {minimum})", "few channels")
    return None


def _group_problem(node: ir.Node, shape: list[int], minimum: int) -> Skip | None:
    """Too few channels per group (depthwise convolutions: 1): each output sums only its group's
    inputs times the taps, too few terms to average FP8's per-value rounding (see patterns/tensorrt.toml)."""
    group = node.attributes.get_int("group", 1)
    if node.op_type == "Conv":
        per_group_in, per_group_out = shape[1], shape[0] // group
    else:
        per_group_in, per_group_out = shape[0] // group, shape[1]
    if group > 1 and min(per_group_in, per_group_out) < minimum:
        return Skip(
            f"grouped convolution with {min(per_group_in, per_group_out)} channels per group (< {minimum})",
            "few channels per group",
        )
    return None


def _gemm_problem(node: ir.Node, shape: list[int], minimum: int) -> Skip | None:
    transposed = node.attributes.get_int("transB", 0) == 1
    n, k = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
    activation_dims = _static_dims(node.inputs[0])
    m = (
        activation_dims[1 if node.attributes.get_int("transA", 0) else 0]
        if len(activation_dims) == 2
        else None
    )
    return _gemm_size_problem(m, k, n, minimum)


def _gemm_size_problem(m: int | None, k: int, n: int, minimum: int) -> Skip | None:
    if minimum > 1 and (m == 1 or n == 1):
        rows = "?" if m is None else m
        return Skip(f"GEMV (M={rows}, K={k}, N={n}): memory bound, no gain", "gemv/tiny")
    if k < minimum or n < minimum:
        return Skip(f"tiny GEMM (K={k}, N={n} < {minimum})", "gemv/tiny")
    return None


def _constant_shape(value: ir.Value) -> list[int]:
    """A constant's shape (always static)."""
    return list(value.const_value.shape.numpy()) if value.const_value is not None else []


def _weight_axis(node: ir.Node, weight: ir.Value, rule: Rule) -> int | None:
    axis = rule.get("weight_axis", 0)
    rank = len(weight.const_value.shape) if weight.const_value is not None else 0
    if axis == "gemm":
        return 0 if node.attributes.get_int("transB", 0) == 1 else 1
    if node.op_type == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
        return None
    return int(axis) % rank if rank else None


def _output_use(node: ir.Node, rule: Rule, context: Context) -> list[TensorUse]:
    """Q/DQ on the op's output, after a directly following activation that the runtime removes."""
    output = node.outputs[0]
    uses = list(output.uses())
    through = rule.get("output_through", [])
    if len(uses) == 1 and uses[0].node.op_type in through:
        output = uses[0].node.outputs[0]
    if output.is_graph_output() and not context.quantize_graph_outputs:
        return []
    if activation_problem(output, context):
        return []
    assert output.name is not None
    return [TensorUse(output.name, "activation", node.name or "", None, None)]


def match_matmul(node: ir.Node, rule: Rule, context: Context) -> Match:
    """MatMul: constant B is a weight (per channel on its last axis); two activations are a BMM.

    Cases: constant A (skip), GEMV or tiny GEMM (skip), attention BMM (both inputs per tensor, unless
    disabled), an input that can carry inf (skip).
    """
    a, b = node.inputs[0], node.inputs[1]
    if a is not None and a.const_value is not None:
        return Skip("first input is a constant", "constant activation")
    if b is not None and b.const_value is not None:
        return _match_matmul_weight(node, b, rule, context)
    if not (context.quantize_bmm and rule.get("quantize_bmm", True)):
        return Skip("activation x activation MatMul (attention BMM) left out by option", "bmm disabled")
    problem = activation_problem(a, context) or activation_problem(b, context)
    return problem or [_activation_use(node, 0), _activation_use(node, 1)]


def _rows(dims: list[int | None]) -> int | None:
    """Rows of the GEMM a MatMul input flattens to: the product of all but the last dim (None: dynamic)."""
    if not dims:
        return None
    leading = dims[:-1]
    if any(d is None for d in leading):
        return None
    return math.prod(d for d in leading if d is not None)


def _match_matmul_weight(node: ir.Node, weight: ir.Value, rule: Rule, context: Context) -> Match:
    shape = _constant_shape(weight)
    if len(shape) < 2:
        return Skip("matrix-vector product (1-D weight)", "gemv/tiny")
    m = _rows(_static_dims(node.inputs[0]))
    problem = _gemm_size_problem(m, shape[-2], shape[-1], int(rule.get("min_gemm_dim", 1)))
    problem = problem or activation_problem(node.inputs[0], context)
    if problem:
        return problem
    uses = [_activation_use(node, 0), _weight_use(node, 1, len(shape) - 1, rule)]
    if rule.get("quantize_output", False):
        uses += _output_use(node, rule, context)
    return uses


def match_residual_add(node: ir.Node, rule: Rule, context: Context) -> Match:
    """Residual Add: quantize the skip input; the branch TensorRT fuses into the Conv epilogue stays.

    Cases: a constant operand (bias add, skip), neither input produced by a fusable op (skip), both
    produced by one (the later Conv is the fused branch), the skip input not float or inf-carrying.
    """
    if len(node.inputs) != 2 or any(v is None or v.const_value is not None for v in node.inputs):
        return Skip("constant operand (bias add)", "bias add")
    fused = [i for i, v in enumerate(node.inputs) if _fusable_producer(v, rule) is not None]
    if not fused:
        return Skip("no Conv producer to fuse the Add into", "no residual fusion")
    branch = max(fused, key=lambda i: context.order.get(_fusable_producer(node.inputs[i], rule) or "", -1))
    skip_index = 1 - branch
    problem = activation_problem(node.inputs[skip_index], context)
    return problem or [_activation_use(node, skip_index)]


def _fusable_producer(value: ir.Value | None, rule: Rule) -> str | None:
    look_through = rule.get("look_through", [])
    while value is not None and (producer := value.producer()) is not None:
        if producer.op_type in rule.get("fused_producers", []):
            return producer.name
        if producer.op_type not in look_through:
            return None
        value = producer.inputs[0]
    return None


def match_all_inputs(node: ir.Node, rule: Rule, context: Context) -> Match:
    """Every input is an activation quantized per tensor (ONNX Runtime's QLinearAdd and friends)."""
    if any(v is not None and v.const_value is not None for v in node.inputs):
        return Skip("constant operand (bias add)", "bias add")
    for value in node.inputs:
        if problem := activation_problem(value, context):
            return problem
    return [_activation_use(node, i) for i in range(len(node.inputs))]


def match_never(node: ir.Node, rule: Rule, context: Context) -> Match:
    """Always float. The rule's ``reason`` may name the node with ``{node}`` (op type and constant
    operands, e.g. "Div by constant 6") and ``{op_type}``, so the reason is true for every op listed."""
    reason = str(rule.get("reason", "{op_type} stays in float"))
    # plain replacement, not str.format: a user's reason may hold other braces
    reason = reason.replace("{node}", describe_node(node)).replace("{op_type}", node.op_type)
    return Skip(reason, "kept float")


#: how a constant second operand reads after the op type ("Div by constant 6")
_OPERAND_WORDS = {"Div": "by constant", "Mul": "by constant", "Pow": "with constant exponent"}


def describe_node(node: ir.Node) -> str:
    """The op type and its constant second operand, if any: "Div by constant 6", "Sqrt".

    Cases: no constant second input (op type alone); a one-element constant (its value); a bigger
    constant (its shape).
    """
    operand = node.inputs[1] if len(node.inputs) > 1 else None
    if operand is None or operand.const_value is None:
        return node.op_type
    words = _OPERAND_WORDS.get(node.op_type, "with constant")
    tensor = operand.const_value
    if tensor.size == 1:
        return f"{node.op_type} {words} {float(tensor.numpy().reshape(-1)[0]):g}"
    return f"{node.op_type} {words} of shape {list(tensor.shape.numpy())}"


def match_neighbour(node: ir.Node, rule: Rule, context: Context) -> Match:
    """Pooling: quantized only when a neighbour is, so TensorRT can run it in INT8 between them.

    Cases: its output (looking through reshapes) is quantized for a consumer; its input is quantized
    for another consumer; neither (skip).
    """
    problem = activation_problem(node.inputs[0], context)
    if problem:
        return problem
    look_through = rule.get("look_through", [])
    if _quantized_downstream(node.outputs[0], look_through, context) or _quantized_upstream(
        node.inputs[0], look_through, context
    ):
        return [_activation_use(node, 0)]
    return Skip("no quantized neighbour", "no quantized neighbour")


def _quantized_downstream(value: ir.Value, look_through: list[str], context: Context) -> bool:
    if context.plan.is_quantized(value.name or ""):
        return True
    return any(
        use.node.op_type in look_through and _quantized_downstream(use.node.outputs[0], look_through, context)
        for use in value.uses()
    )


def _quantized_upstream(value: ir.Value | None, look_through: list[str], context: Context) -> bool:
    while value is not None:
        if context.plan.is_quantized(value.name or ""):
            return True
        producer = value.producer()
        value = producer.inputs[0] if producer is not None and producer.op_type in look_through else None
    return False


def match_shared_scale(node: ir.Node, rule: Rule, context: Context) -> Match:
    """Concat: when its output is quantized, all its inputs are too, with the output's one scale.

    TensorRT then drops the DQ->Q pairs around the Concat. Cases: output not quantized (skip), an input
    that cannot be quantized (skip, the output keeps its own scale).
    """
    output = node.outputs[0]
    if not context.plan.is_quantized(output.name or ""):
        return Skip("output not quantized downstream", "no quantized neighbour")
    for value in node.inputs:
        if (
            value is not None
            and value.const_value is None
            and (problem := activation_problem(value, context))
        ):
            return problem
    uses = [
        _activation_use(node, i) for i, v in enumerate(node.inputs) if v is not None and v.const_value is None
    ]
    context.plan.join_group([output.name or "", *(u.tensor for u in uses)])
    return uses


MATCHERS: dict[str, Matcher] = {
    "weighted": match_weighted,
    "matmul": match_matmul,
    "residual_add": match_residual_add,
    "all_inputs": match_all_inputs,
    "never": match_never,
    "neighbour": match_neighbour,
    "shared_scale": match_shared_scale,
}
#: kinds decided after the others, walking the graph backwards
SECOND_PASS_KINDS = frozenset({"neighbour", "shared_scale"})
