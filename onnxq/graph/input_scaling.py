"""Per-input-channel scaling of the MatMul/Gemm nodes that read one activation, exact in float.

AWQ and SmoothQuant both rewrite ``y = x @ W`` as ``y = (x / s) @ (diag(s) W)`` with one positive
``s`` per channel of x's last axis (K). :func:`apply_input_scale` does that in place on an ``onnx_ir``
model: every consumer's weight rows (the K axis) are multiplied by ``s``, and ``x`` is divided by ``s``.

Consumers (anything else is refused, see :func:`scaling_problem`): ``MatMul(x, W)`` with W a 2-D float
constant ``[K, N]``; ``Gemm(x, B, C)`` with transA=0 and B a 2-D float constant, ``[K, N]`` (transB=0,
rows scaled) or ``[N, K]`` (transB=1, columns scaled). A weight that some node outside the consumers
also reads (or that is a graph output) is copied first, so that node keeps the original; consumers that
share one weight share its scaled copy.

Where ``1 / s`` goes. It is folded into the producer of ``x`` when x is read only by the consumers (and
is not a graph output) and the producer is one of:
- ``LayerNormalization`` (axis -1), ``RMSNormalization`` or ORT's ``SimplifiedLayerNormalization``
  (axis -1): scale and bias divided by ``s``;
- ``Mul(x0, c)``, c a float constant whose last axis is 1 or K (a scalar, ``[K]``, ``[1, .., K]``):
  c replaced by ``c / s`` (its last axis expanded to K);
- ``Add(y, c)`` with such a constant c: c divided by ``s`` and ``y``'s producer folded the same way
  (recursively), provided ``y`` is read only by the Add. This covers a decomposed LayerNorm's affine
  ``Add(Mul(x0, c1), c2)`` ("Mul/Add chain") and a linear layer with bias ``Add(MatMul(x0, W), b)``;
- ``MatMul(x0, W)``, W a float constant of rank >= 2: W's output columns divided by ``s``;
- ``Gemm(x0, B, C)``, B a 2-D float constant: op(B)'s output columns divided by ``s``, and C too when
  it is a constant (a non-constant C stops the fold).
Otherwise (x is a graph input or an initializer, x has other readers, or the producer is anything
else) ``Mul(x, 1 / s)`` is inserted before the first consumer and only the consumers are rewired to
its output; ``InputScaling.how`` says why nothing was folded.

float16/bfloat16 constants are computed in float32 and stored back in their own type. Every constant is
rewritten from the original values; a constant that a node outside the rewrite also reads is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.graph.passes import add_initializer, forget_names, unique_name

DEFAULT_DOMAINS = ("", "ai.onnx")
GEMM_OPS = ("MatMul", "Gemm")
#: normalizations whose scale (and bias) multiply the normalized last axis: ``y = norm(x) * scale + bias``
NORMALIZATION_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
#: ONNX Runtime registers SimplifiedLayerNormalization in the default domain; some exporters use its own
NORMALIZATION_DOMAINS = (*DEFAULT_DOMAINS, "com.microsoft")
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
#: index of the weight input of MatMul (B) and Gemm (B); the activation is input 0
WEIGHT_INPUT = 1
GEMM_BIAS_INPUT = 2

HOW_MUL = "Mul constant"
HOW_MUL_ADD_CHAIN = "Mul/Add chain"
HOW_MATMUL = "MatMul output columns"
HOW_GEMM = "Gemm output columns (and bias)"
HOW_ADD_SUFFIX = " and Add constant"


@dataclass(frozen=True)
class InputScaling:
    """What :func:`apply_input_scale` did."""

    activation: str  #: the name of the tensor that was divided by s
    consumers: tuple[str, ...]  #: the GEMM nodes whose weights were multiplied by s
    #: the node that absorbed 1/s (the activation's producer); None when a Mul was inserted
    folded_into: str | None
    how: str  #: one line, e.g. "LayerNormalization scale and bias" or "inserted Mul (it is a graph input)"
    new_input: str  #: the tensor the consumers now read (the inserted Mul's output, or the activation)


@dataclass(frozen=True)
class ConstantEdit:
    """A new array for a constant, read by the listed (node, input index) uses only."""

    value: ir.Value
    readers: tuple[tuple[ir.Node, int], ...]
    array: np.ndarray


@dataclass(frozen=True)
class Fold:
    """The constant edits that divide one value by s, and the one-line description of them."""

    edits: tuple[ConstantEdit, ...]
    how: str


def scaling_problem(
    model: ir.Model, activation: str, consumers: Sequence[str], scale: np.ndarray | None = None
) -> str | None:
    """Why the pass cannot scale ``activation`` for ``consumers`` at all (one line), or None.

    ``scale``, when given, is checked too: one finite positive value per channel K.
    """
    found = _find_consumers(model, consumers)
    if isinstance(found, str):
        return found
    for node in found:
        problem = _consumer_problem(node, activation)
        if problem:
            return f"{node.name}: {problem}"
    graphs = {id(node.graph) for node in found}
    if len(graphs) > 1:
        return "the consumers are not all in the same graph"
    ks = {_weight_k(node) for node in found}
    if len(ks) > 1:
        return f"the consumers' weights have different K ({sorted(ks)})"
    k = ks.pop()
    last_dim = _static_last_dim(found[0].inputs[0])
    if last_dim is not None and last_dim != k:
        return f"{activation} has {last_dim} channels on its last axis, the consumers' weights K = {k}"
    return None if scale is None else _scale_problem(np.asarray(scale), k)


def apply_input_scale(
    model: ir.Model, activation: str, consumers: Sequence[str], scale: np.ndarray
) -> InputScaling:
    """Multiply the consumers' weight rows by ``scale`` and divide ``activation`` by it (see module doc).

    Raises ValueError with :func:`scaling_problem`'s reason when the pass cannot run.
    """
    scale = np.asarray(scale)
    problem = scaling_problem(model, activation, consumers, scale)
    if problem:
        raise ValueError(problem)
    nodes = _find_consumers(model, consumers)
    assert not isinstance(nodes, str)
    scale32 = scale.astype(np.float32)
    value = nodes[0].inputs[0]
    assert value is not None
    weight_edits = _weight_edits(nodes, scale32)
    fold = _activation_fold(value, nodes, scale32)
    for edit in weight_edits:
        _apply(edit)
    names = tuple(node.name or "" for node in nodes)
    if isinstance(fold, Fold):
        for edit in fold.edits:
            _apply(edit)
        producer = value.producer()
        assert producer is not None
        return InputScaling(activation, names, producer.name or producer.op_type, fold.how, activation)
    new_input = _insert_mul(value, nodes, scale32)
    return InputScaling(activation, names, None, f"inserted Mul ({fold})", new_input.name or "")


# --- checks ---------------------------------------------------------------------------------------


def _find_consumers(model: ir.Model, consumers: Sequence[str]) -> list[ir.Node] | str:
    """The consumer nodes in the order given, or why they cannot be found."""
    if not consumers:
        return "no consumers given"
    if len(set(consumers)) != len(consumers):
        return "a consumer is named more than once"
    by_name: dict[str, list[ir.Node]] = {}
    for graph in model.graphs():
        for node in graph:
            if node.name is not None and node.name in consumers:
                by_name.setdefault(node.name, []).append(node)
    for name in consumers:
        matches = by_name.get(name, [])
        if len(matches) != 1:
            return f"{'no' if not matches else 'more than one'} node named {name!r}"
    return [by_name[name][0] for name in consumers]


def _consumer_problem(node: ir.Node, activation: str) -> str | None:
    if node.op_type not in GEMM_OPS or node.domain not in DEFAULT_DOMAINS:
        return f"{node.op_type} is not a MatMul or Gemm"
    first = node.inputs[0] if node.inputs else None
    if first is None or first.name != activation:
        return f"does not read {activation} as input 0"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
        return "Gemm with transA=1 (its K axis is not the activation's last axis)"
    if first.dtype is not None and first.dtype not in FLOAT_TYPES:
        return f"{activation} is {first.dtype.name}, not a float type"
    weight = node.inputs[WEIGHT_INPUT] if len(node.inputs) > WEIGHT_INPUT else None
    array = _constant(weight)
    if array is None:
        return "its weight (input 1) is not a constant"
    if array.ndim != 2:
        return f"its weight has rank {array.ndim}, not 2"
    assert weight is not None and weight.dtype is not None
    if weight.dtype not in FLOAT_TYPES:
        return f"its weight is {weight.dtype.name}, not a float type"
    return None


def _scale_problem(scale: np.ndarray, k: int) -> str | None:
    if scale.ndim != 1 or scale.shape[0] != k:
        return f"the scale has shape {list(scale.shape)}, the consumers need one value per channel ({k})"
    with np.errstate(over="ignore"):  # the arithmetic runs in float32: judge the values it will see
        scale32 = scale.astype(np.float32)
    if not np.all(np.isfinite(scale32)):
        return "the scale has non-finite values (in float32)"
    if not np.all(scale32 > 0):
        return "the scale has values <= 0 (in float32)"
    return None


def _weight_k_axis(node: ir.Node) -> int:
    """Axis of the consumer's weight that runs along K: 1 for Gemm transB=1 ([N, K]), else 0."""
    return 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0 else 0


def _weight_k(node: ir.Node) -> int:
    array = _constant(node.inputs[WEIGHT_INPUT])
    assert array is not None
    return int(array.shape[_weight_k_axis(node)])


def _static_last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or value.shape.rank() == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array; None when it has none, or when it is a graph input (callers may
    feed another one at run time)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


# --- the consumers' weights -----------------------------------------------------------------------


def _weight_edits(nodes: list[ir.Node], scale: np.ndarray) -> list[ConstantEdit]:
    """One edit per distinct weight: consumers that share a weight share its scaled copy."""
    edits: list[ConstantEdit] = []
    for node in nodes:
        weight = node.inputs[WEIGHT_INPUT]
        if any(edit.value is weight for edit in edits):
            continue
        assert weight is not None
        readers = tuple((n, WEIGHT_INPUT) for n in nodes if n.inputs[WEIGHT_INPUT] is weight)
        array = _constant(weight)
        assert array is not None
        k_axis = _weight_k_axis(node)
        along_k = scale[:, None] if k_axis == 0 else scale[None, :]
        edits.append(ConstantEdit(weight, readers, _in_type(array.astype(np.float32) * along_k, array)))
    return edits


# --- dividing the activation ----------------------------------------------------------------------


def _activation_fold(value: ir.Value, consumers: list[ir.Node], scale: np.ndarray) -> Fold | str:
    """The fold of 1/s into the activation's producer, or why there is none."""
    others = _other_readers(value, {(id(node), 0) for node in consumers})
    if others:
        return others
    return _fold_into_producer(value, scale)


def _other_readers(value: ir.Value, allowed: set[tuple[int, int]]) -> str | None:
    """Why dividing ``value`` itself would change what someone else sees, or None."""
    if value.is_graph_output():
        return f"{value.name} is a graph output"
    for usage in value.uses():
        if (id(usage.node), usage.idx) not in allowed:
            reader = usage.node.name or usage.node.op_type
            return f"{value.name} is also read by {reader}"
    return None


def _fold_into_producer(value: ir.Value, scale: np.ndarray) -> Fold | str:
    producer = value.producer()
    if producer is None:
        return f"{value.name} is a graph input" if value.is_graph_input() else f"{value.name} is a constant"
    if producer.outputs[0] is not value:
        return f"{value.name} is not the first output of {producer.name or producer.op_type}"
    if producer.op_type in NORMALIZATION_OPS and producer.domain in NORMALIZATION_DOMAINS:
        return _fold_normalization(producer, scale)
    if producer.domain not in DEFAULT_DOMAINS:
        return f"its producer {producer.op_type} is not a scaling op this pass folds into"
    folders = {"Mul": _fold_mul, "Add": _fold_add, "MatMul": _fold_matmul, "Gemm": _fold_gemm}
    folder = folders.get(producer.op_type)
    if folder is None:
        return f"its producer {producer.op_type} is not a scaling op this pass folds into"
    return folder(producer, scale)


def _fold_normalization(node: ir.Node, scale: np.ndarray) -> Fold | str:
    """``norm(x) * gamma + beta`` over the last axis only: gamma /= s, beta /= s."""
    name = node.name or node.op_type
    x = node.inputs[0]
    axis = node.attributes.get_int("axis", -1)
    rank = x.shape.rank() if x is not None and x.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"{name} normalizes from axis {axis}, not only the last axis"
    gamma = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if gamma is not None and gamma.shape[-1:] != scale.shape:
        return f"{name} scale has shape {list(gamma.shape)}, not one value per channel ({scale.shape[0]})"
    edits = []
    for index in (1, 2):  # scale, then the optional bias (LayerNormalization only)
        operand = node.inputs[index] if len(node.inputs) > index else None
        if operand is None:
            continue
        edit = _last_axis_division(node, index, scale)
        if edit is None:
            return f"{name} input {index} is not a float constant with one value per channel"
        edits.append(edit)
    if not edits:
        return f"{name} has no scale input"
    return Fold(tuple(edits), f"{node.op_type} scale and bias")


def _channel_problem(value: ir.Value, k: int) -> str | None:
    """A value broadcast to K channels by an Add has fewer of its own: dividing it by s would change
    its shape (and its declared shape would be wrong)."""
    last_dim = _static_last_dim(value)
    if last_dim is not None and last_dim != k:
        return f"{value.name} has {last_dim} channels on its last axis, not {k}"
    return None


def _fold_mul(node: ir.Node, scale: np.ndarray) -> Fold | str:
    """``x0 * c``: c /= s."""
    edit = _constant_operand_division(node, scale)
    if edit is None:
        return f"{node.name or 'Mul'} has no float constant operand along the last axis"
    return Fold((edit,), HOW_MUL)


def _fold_add(node: ir.Node, scale: np.ndarray) -> Fold | str:
    """``y + c``: c /= s, and y divided by s in its own producer (y read only by this Add)."""
    name = node.name or "Add"
    edit = _constant_operand_division(node, scale)
    if edit is None:
        return f"{name} has no float constant operand along the last axis"
    index = edit.readers[0][1]
    y = node.inputs[1 - index]
    assert y is not None
    others = _other_readers(y, {(id(node), 1 - index)}) or _channel_problem(y, scale.shape[0])
    if others:
        return f"{name}'s other operand cannot be scaled: {others}"
    inner = _fold_into_producer(y, scale)
    if isinstance(inner, str):
        return f"{name}'s other operand cannot be scaled: {inner}"
    how = HOW_MUL_ADD_CHAIN if inner.how == HOW_MUL else inner.how + HOW_ADD_SUFFIX
    return Fold((*inner.edits, edit), how)


def _fold_matmul(node: ir.Node, scale: np.ndarray) -> Fold | str:
    """``x0 @ W``: W's output columns (its last axis) /= s."""
    weight = node.inputs[WEIGHT_INPUT]
    array = _constant(weight)
    if array is None or weight is None or weight.dtype not in FLOAT_TYPES or array.ndim < 2:
        return f"{node.name or 'MatMul'} has no float constant weight of rank >= 2"
    if array.shape[-1] != scale.shape[0]:
        return f"{node.name or 'MatMul'} weight has {array.shape[-1]} output columns, not {scale.shape[0]}"
    divided = _in_type(array.astype(np.float32) / scale, array)
    return Fold((ConstantEdit(weight, ((node, WEIGHT_INPUT),), divided),), HOW_MATMUL)


def _fold_gemm(node: ir.Node, scale: np.ndarray) -> Fold | str:
    """``alpha * x0 @ op(B) + beta * C``: op(B)'s output columns /= s, and C /= s when present."""
    name = node.name or "Gemm"
    weight = node.inputs[WEIGHT_INPUT]
    array = _constant(weight)
    if array is None or weight is None or weight.dtype not in FLOAT_TYPES or array.ndim != 2:
        return f"{name} has no 2-D float constant weight B"
    n_axis = 0 if node.attributes.get_int("transB", 0) != 0 else 1
    if array.shape[n_axis] != scale.shape[0]:
        return f"{name} has {array.shape[n_axis]} output columns, not {scale.shape[0]}"
    along_n = scale[None, :] if n_axis == 1 else scale[:, None]
    edits = [
        ConstantEdit(weight, ((node, WEIGHT_INPUT),), _in_type(array.astype(np.float32) / along_n, array))
    ]
    if len(node.inputs) > GEMM_BIAS_INPUT and node.inputs[GEMM_BIAS_INPUT] is not None:
        bias = _last_axis_division(node, GEMM_BIAS_INPUT, scale)
        if bias is None:
            return f"{name} bias C is not a float constant"
        edits.append(bias)
    return Fold(tuple(edits), HOW_GEMM)


def _constant_operand_division(node: ir.Node, scale: np.ndarray) -> ConstantEdit | None:
    """For a binary Mul/Add with exactly one constant operand: that operand divided by s."""
    constants = [i for i in (0, 1) if _constant(node.inputs[i]) is not None]
    if len(constants) != 1:  # two constants: a constant subgraph, left to constant folding
        return None
    return _last_axis_division(node, constants[0], scale)


def _last_axis_division(node: ir.Node, index: int, scale: np.ndarray) -> ConstantEdit | None:
    """``node.inputs[index] / s`` along its last axis (a size-1 or absent last axis expanded to K);
    None when it is not a float constant whose last axis is 1 or K."""
    value = node.inputs[index]
    array = _constant(value)
    if array is None or value is None or value.dtype not in FLOAT_TYPES:
        return None
    k = scale.shape[0]
    if array.ndim and array.shape[-1] not in (1, k):
        return None
    # leading axes stay as they are (so broadcasting gives the same output shape); the last becomes K
    shape = (*array.shape[:-1], k) if array.ndim else (k,)
    divided = np.broadcast_to(array.astype(np.float32), shape) / scale
    return ConstantEdit(value, ((node, index),), _in_type(divided, array))


def _insert_mul(value: ir.Value, consumers: list[ir.Node], scale: np.ndarray) -> ir.Value:
    """``Mul(value, 1/s)`` before the first consumer (in graph order); only the consumers read it."""
    graph = consumers[0].graph
    assert isinstance(graph, ir.Graph)
    forget_names(graph)
    base = value.name or "activation"
    dtype = value.dtype.numpy() if value.dtype is not None else _weight_dtype(consumers[0])
    inverse = add_initializer(graph, f"{base}_inverse_input_scale", (1.0 / scale).astype(dtype))
    mul = ir.node("Mul", [value, inverse], name=unique_name(graph, f"{base}_input_scale_Mul"))
    output = mul.outputs[0]
    output.name = unique_name(graph, f"{base}_input_scaled")
    output.type, output.shape = value.type, value.shape
    positions = {id(node): position for position, node in enumerate(graph)}
    first = min(consumers, key=lambda node: positions[id(node)])
    graph.insert_before(first, mul)
    for node in consumers:
        node.replace_input_with(0, output)
    return output


def _weight_dtype(node: ir.Node) -> np.dtype:
    array = _constant(node.inputs[WEIGHT_INPUT])
    assert array is not None
    return array.dtype


# --- writing constants ----------------------------------------------------------------------------


def _in_type(array32: np.ndarray, original: np.ndarray) -> np.ndarray:
    """A float32 result stored in the original constant's type (float16/bfloat16 round once here)."""
    return np.ascontiguousarray(array32.astype(original.dtype))


def _apply(edit: ConstantEdit) -> None:
    """Rewrite the constant in place when only the edit's readers see it; otherwise give them a copy."""
    value = edit.value
    readers = {(id(node), index) for node, index in edit.readers}
    shared = any((id(u.node), u.idx) not in readers for u in value.uses()) or value.is_graph_output()
    if value.is_initializer() and not shared:
        value.const_value = ir.tensor(edit.array, name=value.name)
        value.shape = ir.Shape(edit.array.shape)
        return
    graph = edit.readers[0][0].graph
    assert isinstance(graph, ir.Graph)
    forget_names(graph)
    copy = add_initializer(graph, f"{value.name or 'constant'}_input_scaled", edit.array)
    for node, index in edit.readers:
        node.replace_input_with(index, copy)
