"""Convert the float32 part of a model to float16 or bfloat16, leaving float32 islands where needed.

Which tensor types an op accepts comes from its ONNX schema at the model's opset: each type variable
(``T``, ``T1``...) bound to a float32 tensor is switched to the target type when the schema allows it,
and every tensor bound to that variable follows. Cases handled:

- float32 initializers of the main graph become the target type; finite values beyond its range are
  clamped to half its largest finite value (``-1e9`` attention-mask constants become ``-32752`` instead
  of overflowing to ``-inf``, with room left for the scores added to them) and counted in the report; ``+/-inf`` stays ``+/-inf``. An initializer read
  by both converted and float32 nodes is split: the float32 readers keep the exact original.
- nodes kept float32 (reason in the report): op in ``keep_ops`` (``DEFAULT_KEEP_FP32_OPS``), name in
  ``keep_nodes``, a float tensor whose calibrated ``|value|`` exceeds the float16 limit
  (``tensor_ranges``, float16 only), no ONNX schema (custom domains, local functions), subgraphs
  (If/Loop/Scan: their bodies stay float32), no target type in the schema at this opset (Conv has no
  bfloat16 before opset 22), a Q/DQ scale that would become subnormal in the target type, float
  arithmetic on integers that ends in a Cast back to integers (exported shape/size computations:
  float16 counts exactly only to 2048).
- formals of a fixed type (Resize ``scales``) and type variables without the target type
  (LayerNormalization's ``Mean``/``InvStdDev`` for float16) keep float32 inside a converted node.
- ops whose output type is an attribute: Cast ``to``, ConstantOfShape ``value``, EyeLike / Random* /
  Bernoulli ``dtype``, DequantizeLinear ``output_dtype`` (opset 21+, NVFP4/MXFP8 chains) are rewritten.
- quantized graphs: QuantizeLinear/DequantizeLinear scales take the target type, so DequantizeLinear
  outputs it and feeds its GEMM directly. A DequantizeLinear follows its consumers (kept when all of
  them are), a QuantizeLinear follows its DequantizeLinears, so no Cast lands between a DQ and its
  consumer. Low-precision Q/DQ needs opset 19: the opset is upgraded (refused in one line if it cannot).
- Casts are inserted at every boundary between converted and float32 tensors, at graph inputs and
  before graph outputs (which keep their names and float32 types unless ``low_precision_io``).
  Values read inside subgraph bodies are handed to them in float32.
- integer, bool and already low-precision tensors are untouched; external weights are converted
  lazily (read again when saved), so no copy of a large model is held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx.defs
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph import passes

logger = logging.getLogger(__name__)

HIGH_PRECISIONS = ("fp32", "fp16", "bf16")
TARGET_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_TYPE_STRINGS = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}
_NUMPY_TYPES: dict[ir.DataType, type] = {
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
}

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
#: a tensor whose calibrated |value| exceeds this stays float32: half of FLOAT16's range, because
#: calibration sees a few samples and the next input may go further; initializer values beyond
#: (half the target type's range) are clamped to it
FP16_RANGE_MARGIN = 0.5
FP16_SAFE_LIMIT = FP16_MAX * FP16_RANGE_MARGIN
#: low-precision QuantizeLinear/DequantizeLinear (float16/bfloat16 scales) exist from this opset
LOW_PRECISION_QDQ_OPSET = 19
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_DEFAULT_DOMAINS = ("", "ai.onnx")

#: Ops kept float32 by default, with why. Measured in float16 against float32 (numpy and ONNX Runtime,
#: see tests/graph/test_float_conversion.py) on inputs of the sizes transformers and CNNs produce:
DEFAULT_KEEP_FP32_OPS: dict[str, str] = {
    "Exp": "overflows float16 for inputs above 11.09 (exp(11.1) > 65504); unnormalized exponentials "
    "of logits reach that",
    "Pow": "squares of activations beyond 256 (cubes beyond 40, GELU-tanh's x**3) overflow float16; "
    "decomposed LayerNorm/RMSNorm variances are computed with it",
    "ReduceSum": "sums over long axes overflow float16 (4096 values of 16 already reach 65536) and "
    "lose low bits as they grow",
    "ReduceSumSquare": "a sum of squares overflows float16 once the L2 norm passes 256",
    "ReduceL2": "its sum of squares overflows float16 once the norm passes 256",
    "ReduceLogSumExp": "its exponentials overflow float16 like Exp",
    "ReduceProd": "products overflow or underflow float16 after a few factors",
    "CumSum": "running sums (position ids from masks, cumulative probabilities) exceed 2048, beyond "
    "which float16 cannot count in steps of 1",
    "Range": "index sequences beyond 2048 are not exact in float16 (steps of 2 and more)",
    "RandomNormal": "samples drawn in float16 lose the distribution's tails; kept as exported",
    "RandomNormalLike": "samples drawn in float16 lose the distribution's tails; kept as exported",
    "RandomUniform": "float16 has 1024 values per octave: sampled noise gets coarse; kept as exported",
    "RandomUniformLike": "float16 has 1024 values per octave: sampled noise gets coarse; kept as exported",
}
#: Deliberately NOT kept (float16 is safe there):
#: - Softmax: runtimes subtract the row maximum first (outputs in [0, 1]); measured in ORT on logits
#:   of std 4 with half the columns -inf: 70.5 / 63.4 / 58.7 / 54.1 dB at 8 / 64 / 512 / 4096 columns,
#:   and -inf from masks gives exact zeros (tests: float16 arithmetic as written stays >= 40 dB);
#: - LayerNormalization: its statistics are computed in ``stash_type`` (float32 by default) whatever
#:   the input type;
#: - ReduceMean: a mean never exceeds its inputs' range.

#: ops whose float output type is set by an attribute, not by an input
_ATTRIBUTE_TYPED_OPS = frozenset(
    {"Cast", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
     "RandomUniformLike", "Bernoulli", "DequantizeLinear"}
)  # fmt: skip
#: the attribute naming the output type (the others call it dtype; ConstantOfShape carries a value tensor)
_DTYPE_ATTRIBUTE = {"Cast": "to", "DequantizeLinear": "output_dtype"}
#: ops whose type attribute is optional and, when absent, already follows the converted inputs
_OPTIONAL_DTYPE_OPS = frozenset({"DequantizeLinear"})


@dataclass
class ConversionReport:
    converted_nodes: int = 0
    #: node name -> why it stays float32 (op listed / range beyond float16 / user / schema)
    kept_fp32: dict[str, str] = field(default_factory=dict)
    casts_inserted: int = 0
    #: bytes of the float32 initializers before, and of what they became after
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    #: initializer name -> how many finite values were clamped into the target type's range
    clamped_values: dict[str, int] = field(default_factory=dict)
    #: the opset the model was upgraded to for low-precision Q/DQ (None: unchanged)
    opset_upgraded_to: int | None = None


@dataclass
class _NodePlan:
    """Which input/output slots of a converted node take the target type."""

    low_inputs: set[int] = field(default_factory=set)
    low_outputs: set[int] = field(default_factory=set)


def convert_float_precision(
    model: ir.Model,
    to: str,
    *,
    tensor_ranges: Mapping[str, float] | None = None,
    keep_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
    keep_nodes: Iterable[str] = (),
    low_precision_io: bool = False,
) -> ConversionReport:
    """Rewrite ``model`` in place so that its float32 tensors become ``to`` ("fp16"/"bf16"; "fp32" is
    a no-op). ``tensor_ranges`` maps tensor names to calibrated ``max |value|``."""
    if to not in HIGH_PRECISIONS:
        raise ValueError(f"unknown precision {to!r}; expected one of {HIGH_PRECISIONS}")
    report = ConversionReport()
    if to == "fp32":
        return report
    target = TARGET_TYPES[to]
    report.opset_upgraded_to = _prepare(model)
    graph = model.graph
    reasons = _keep_reasons(model, target, tensor_ranges or {}, keep_ops, set(keep_nodes))
    plans = _plan_nodes(model, target, reasons)
    _follow_consumers(graph, plans, reasons, low_precision_io)
    report.kept_fp32 = reasons
    report.converted_nodes = len(plans)
    _rewrite(graph, plans, target, low_precision_io, report)
    passes.clean_up(model)
    return report


def _prepare(model: ir.Model) -> int | None:
    """Opset for low-precision Q/DQ, node names (the report and keep_nodes name nodes), Constant
    nodes as initializers, no unused weights (they would count in the sizes), typed values."""
    upgraded = _ensure_qdq_opset(model)
    ir.passes.common.NameFixPass()(model)
    passes.lift_constant_nodes(model)
    passes.clean_up(model)
    passes.infer_shapes(model)
    passes.forget_names(model.graph)
    return upgraded


def _rewrite(
    graph: ir.Graph,
    plans: dict[ir.Node, _NodePlan],
    target: ir.DataType,
    low_precision_io: bool,
    report: ConversionReport,
) -> None:
    """Types, attributes and initializers of the converted slots; Casts at every boundary."""
    report.weight_bytes_before = _float_initializer_bytes(graph, ir.DataType.FLOAT)
    unchanged_low = _float_initializer_bytes(graph, target)
    original = _float32_values(graph)
    _retype_outputs(plans, target)
    _convert_initializers(graph, plans, target, report)
    if low_precision_io:
        for value in graph.inputs:
            if value.dtype == ir.DataType.FLOAT:
                _set_type(value, target)
    report.casts_inserted = _insert_casts(graph, original, plans, target, low_precision_io)
    converted_bytes = _float_initializer_bytes(graph, ir.DataType.FLOAT) + _float_initializer_bytes(
        graph, target
    )
    report.weight_bytes_after = converted_bytes - unchanged_low


# --- opset ----------------------------------------------------------------------------------------


def _ensure_qdq_opset(model: ir.Model) -> int | None:
    """Q/DQ with float16/bfloat16 scales need opset 19: upgrade (or refuse in one line)."""
    has_qdq = any(n.op_type in QDQ_OPS and n.domain in _DEFAULT_DOMAINS for n in model.graph)
    if not has_qdq or passes.default_opset(model) >= LOW_PRECISION_QDQ_OPSET:
        return None
    passes.upgrade_opset(model, LOW_PRECISION_QDQ_OPSET)  # raises OnnxqError when it cannot
    return LOW_PRECISION_QDQ_OPSET


# --- which nodes stay float32 ---------------------------------------------------------------------


def _keep_reasons(
    model: ir.Model,
    target: ir.DataType,
    ranges: Mapping[str, float],
    keep_ops: Iterable[str],
    keep_nodes: set[str],
) -> dict[str, str]:
    """Node name -> reason, for main-graph nodes with a float32 tensor that must stay float32."""
    listed = (
        dict(keep_ops) if isinstance(keep_ops, Mapping) else {op: "op type kept float32 as asked (--keep-fp32-ops)" for op in keep_ops}
    )
    unknown = keep_nodes - {n.name for n in model.graph}
    if unknown:
        raise OnnxqError(
            f"--keep-fp32-nodes names {len(unknown)} node(s) the model does not have (e.g. {sorted(unknown)[0]!r})",
            "pass node names as they appear in the model (see --explain or Netron)",
        )
    reasons = {}
    exact = _integer_arithmetic(model.graph)
    dynamic = _dynamic_quantize_chains(model.graph)
    for node in model.graph:
        if not _float32_tensors(node):
            continue
        reason = _keep_reason(model, node, target, ranges, listed, keep_nodes)
        if reason is None and node in exact:
            reason = INTEGER_ARITHMETIC_REASON
        if reason is None and node in dynamic:
            reason = DYNAMIC_QUANTIZE_REASON
        if reason:
            reasons[node.name or ""] = reason
    return reasons


DYNAMIC_QUANTIZE_REASON = (
    "TensorRT dynamic quantization (NVFP4/MXFP8) and its dequantization: the float32 global scale is "
    "shared by the quantizer and the scale's DequantizeLinear; TensorRT's form casts before the GEMM"
)


def _dynamic_quantize_chains(graph: ir.Graph) -> set[ir.Node]:
    """TensorRT's dynamic quantizers (domain ``trt``) and the DequantizeLinear chains after them."""
    chained: set[ir.Node] = set()
    for node in graph:
        if node.domain != TRT_DOMAIN:
            continue
        chained.add(node)
        pending = list(node.outputs)
        while pending:
            for use in pending.pop().uses():
                if use.node.op_type in DEQUANTIZE_OPS and use.node not in chained:
                    chained.add(use.node)
                    pending += list(use.node.outputs)
    return chained


INTEGER_ARITHMETIC_REASON = (
    "float arithmetic on integers that ends in a Cast back to integers (shapes, sizes, indices): "
    "float16 counts exactly only up to 2048"
)
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
TRT_DOMAIN = "trt"
DEQUANTIZE_OPS = frozenset({"DequantizeLinear", "TRT_MXFP8DequantizeLinear"})


def _integer_arithmetic(graph: ir.Graph) -> set[ir.Node]:
    """Nodes between a Cast from integers to float32 and a Cast from float32 back to integers, whose
    float inputs all come from such Casts, from other such nodes, or from initializers: exported
    shape arithmetic (``Shape -> Cast -> Mul(scale) -> Cast(int64) -> Resize sizes``)."""
    derived: set[ir.Node] = set()
    for node in graph:  # topological order: producers first
        floats = [v for v in node.inputs if v is not None and v.dtype == ir.DataType.FLOAT]
        if _casts_to_float32(node) or (
            floats
            and all(v.const_value is not None or v.producer() in derived for v in floats)
            and any(v.producer() in derived for v in floats)
        ):
            derived.add(node)
    reaching: set[ir.Node] = set()
    for node in reversed(list(graph)):
        ends_in_integers = node in derived and _casts_to_integer(node)
        feeds_kept = any(user in reaching for output in node.outputs for user, _ in output.uses())
        if ends_in_integers or (node in derived and feeds_kept):
            reaching.add(node)
    return reaching


def _casts_to_float32(node: ir.Node) -> bool:
    source = node.inputs[0] if node.inputs else None
    return (
        node.op_type == "Cast"
        and node.outputs[0].dtype == ir.DataType.FLOAT
        and source is not None
        and source.dtype is not None
        and source.dtype not in _FLOAT_TYPES
    )


def _casts_to_integer(node: ir.Node) -> bool:
    target = node.outputs[0].dtype if node.outputs else None
    return node.op_type == "Cast" and target is not None and target not in _FLOAT_TYPES


def _keep_reason(
    model: ir.Model,
    node: ir.Node,
    target: ir.DataType,
    ranges: Mapping[str, float],
    listed: Mapping[str, str],
    keep_nodes: set[str],
) -> str | None:
    if node.name in keep_nodes:
        return "kept float32 as asked (--keep-fp32-nodes)"
    if node.op_type in listed and node.domain in _DEFAULT_DOMAINS:
        return f"op {node.op_type}: {listed[node.op_type]}"
    if target == ir.DataType.FLOAT16:
        for value in _float32_tensors(node):
            amax = ranges.get(value.name or "")
            if amax is not None and abs(amax) > FP16_SAFE_LIMIT:
                return (
                    f"tensor {value.name} reaches |{amax:.4g}|, beyond the float16 limit {FP16_SAFE_LIMIT:g}"
                )
    if any(
        attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attribute in node.attributes.values()
    ):
        return f"{node.op_type} has subgraphs; their bodies stay float32"
    if _schema(model, node) is None:
        return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op_type}: its types are unknown"
    if node.op_type in QDQ_OPS:
        return _scale_problem(node, target)
    return None


def _scale_problem(node: ir.Node, target: ir.DataType) -> str | None:
    """A scale that becomes subnormal in the target type loses precision: the dequantized values would
    shift, so that Q/DQ stays float32 when the shift exceeds one unit in the last place of the tensor.

    Per-channel weight scales are judged by the weights they produce: a channel's error counts relative
    to the largest dequantized weight of the whole tensor. A channel whose scale flushes to zero but
    whose weights are themselves below the target type's precision at that magnitude (dead channels
    after BatchNorm folding: scales of 1e-24 beside 1e-3) changes nothing a float16 layer could see.
    """
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is None or scale.const_value is None or scale.dtype != ir.DataType.FLOAT:
        return None
    values = scale.const_value.numpy().astype(np.float64)
    finite = values[np.isfinite(values) & (values != 0)]
    if finite.size == 0:
        return None
    converted = values.astype(np.float32).astype(_NUMPY_TYPES[target]).astype(np.float64)
    tolerance = float(ml_dtypes.finfo(_NUMPY_TYPES[target]).eps)
    # the weights are read only when some scale moves: most scales are normal in the target type
    if _relative_error(values, converted) <= tolerance:
        return None
    error = _dequantized_error(node, values, converted)
    if error > tolerance:
        return (
            f"scale {scale.name} (min {finite.min():.3g}) is subnormal in {target.name.lower()}: "
            f"dequantized values off by {error:.2%} of the tensor's largest"
        )
    return None


def _dequantized_error(node: ir.Node, scale: np.ndarray, converted: np.ndarray) -> float:
    """The largest change of a dequantized value, relative to the largest dequantized value.

    Without constant quantized data (activations) or with a scale that is not per channel, the
    scale's own relative error: every value moves by it.
    """
    relative = _relative_error(scale, converted)
    data = node.inputs[0].const_value if node.inputs[0] is not None else None
    if data is None or scale.ndim != 1 or node.op_type != "DequantizeLinear":
        return relative
    quantized = data.numpy()
    axis = _attribute_int(node, "axis", 1) % quantized.ndim
    if quantized.shape[axis] != scale.size:
        return relative
    largest_code = _largest_magnitude_per_channel(quantized, axis)
    largest_value = float(np.max(np.abs(scale) * largest_code))
    if largest_value == 0.0:
        return 0.0
    return float(np.max(np.abs(converted - scale) * largest_code)) / largest_value


def _relative_error(scale: np.ndarray, converted: np.ndarray) -> float:
    mask = np.isfinite(scale) & (scale != 0)
    if not mask.any():
        return 0.0
    return float(np.max(np.abs(converted[mask] - scale[mask]) / np.abs(scale[mask])))


def _largest_magnitude_per_channel(quantized: np.ndarray, axis: int) -> np.ndarray:
    """max |code| per channel along ``axis``, from per-channel max and min (no float copy of the
    weight: a 8192x8192 INT8 weight would take 512 MB as float64)."""
    other_axes = tuple(i for i in range(quantized.ndim) if i != axis)
    highest = quantized.max(axis=other_axes) if other_axes else quantized
    lowest = quantized.min(axis=other_axes) if other_axes else quantized
    return np.maximum(np.abs(highest.astype(np.float64)), np.abs(lowest.astype(np.float64)))


def _attribute_int(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.as_int())


def _schema(model: ir.Model, node: ir.Node) -> onnx.defs.OpSchema | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 0))
    try:
        return onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        return None


def _float32_tensors(node: ir.Node) -> list[ir.Value]:
    values = [*node.inputs, *node.outputs]
    return [v for v in values if v is not None and v.dtype == ir.DataType.FLOAT]


# --- which slots of converted nodes take the target type ------------------------------------------


def _plan_nodes(model: ir.Model, target: ir.DataType, reasons: dict[str, str]) -> dict[ir.Node, _NodePlan]:
    plans = {}
    for node in model.graph:
        if not _float32_tensors(node) or (node.name or "") in reasons:
            continue
        schema = _schema(model, node)
        assert schema is not None  # nodes without one were kept
        plan = _slot_plan(node, schema, target)
        if plan.low_inputs or plan.low_outputs:
            plans[node] = plan
        else:
            opset = model.opset_imports.get("", 0)
            reasons[node.name or ""] = (
                f"the schema of {node.op_type} at opset {opset} allows no {target.name.lower()} for its float tensors"
            )
    return plans


def _slot_plan(node: ir.Node, schema: onnx.defs.OpSchema, target: ir.DataType) -> _NodePlan:
    """Slots bound to a type variable that holds float32 here and allows ``target``."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    input_vars = [_formal(schema.inputs, i) for i in range(len(node.inputs))]
    output_vars = [_formal(schema.outputs, i) for i in range(len(node.outputs))]
    float_vars = {
        var for var, v in zip(input_vars, node.inputs) if v is not None and v.dtype == ir.DataType.FLOAT
    }
    attribute_typed = {var for var in output_vars if var not in input_vars}
    if node.op_type in _ATTRIBUTE_TYPED_OPS and node.domain in _DEFAULT_DOMAINS:
        float_vars |= {
            var
            for var, v in zip(output_vars, node.outputs)
            if var in attribute_typed and v.dtype == ir.DataType.FLOAT
        }
    convertible = {var for var in float_vars if _TYPE_STRINGS[target] in allowed.get(var, set())}
    plan = _NodePlan()
    plan.low_inputs = {
        i for i, var in enumerate(input_vars) if var in convertible and _is_float32(node.inputs[i])
    }
    plan.low_outputs = {
        i for i, var in enumerate(output_vars) if var in convertible and _is_float32(node.outputs[i], True)
    }
    return plan


def _formal(formals: Sequence[onnx.defs.OpSchema.FormalParameter], index: int) -> str:
    """The type string of the formal at ``index`` (a variadic last formal covers the rest)."""
    if not formals:
        return ""
    return formals[min(index, len(formals) - 1)].type_str


def _is_float32(value: ir.Value | None, untyped_ok: bool = False) -> bool:
    if value is None:
        return False
    return value.dtype == ir.DataType.FLOAT or (untyped_ok and value.dtype is None)


def _follow_consumers(
    graph: ir.Graph, plans: dict[ir.Node, _NodePlan], reasons: dict[str, str], low_precision_io: bool
) -> None:
    """A DequantizeLinear none of whose readers wants the target type stays float32 (and a
    QuantizeLinear whose DequantizeLinears all stay), so the Cast goes after the GEMM, not between
    DQ and GEMM. Reverse order: the NVFP4 scale DQ then follows the weight DQ it feeds."""
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(list(graph)):
        if node not in plans or node.op_type not in QDQ_OPS or node.domain not in _DEFAULT_DOMAINS:
            continue
        produced = node.outputs[0]
        uses = [(user, index) for user, index in produced.uses()]
        wants_low = any(user in plans and index in plans[user].low_inputs for user, index in uses)
        wants_low |= low_precision_io and id(produced) in outputs
        if node.op_type == "QuantizeLinear":
            wants_low = any(user in plans for user, _ in uses)
        if not wants_low and (uses or id(produced) in outputs):
            del plans[node]
            reasons[node.name or ""] = "follows its consumers, which stay float32 (no Cast after a DQ)"


# --- rewriting ------------------------------------------------------------------------------------


def _float32_values(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs and node outputs of float32 type (initializers are converted, never cast)."""
    values = [v for v in graph.inputs if v.dtype == ir.DataType.FLOAT]
    values += [v for node in graph for v in node.outputs if _is_float32(v)]
    return values


def _retype_outputs(plans: dict[ir.Node, _NodePlan], target: ir.DataType) -> None:
    for node, plan in plans.items():
        for index in plan.low_outputs:
            _set_type(node.outputs[index], target)
        if plan.low_outputs and node.op_type in _ATTRIBUTE_TYPED_OPS:
            _fix_type_attribute(node, target)


def _fix_type_attribute(node: ir.Node, target: ir.DataType) -> None:
    if node.op_type == "ConstantOfShape":
        fill = node.attributes.get("value")
        array = fill.as_tensor().numpy() if fill is not None else np.zeros(1, np.float32)
        converted, _ = _converted_array(array.astype(np.float32), target)
        node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(converted))
        return
    name = _DTYPE_ATTRIBUTE.get(node.op_type, "dtype")
    if node.op_type in _OPTIONAL_DTYPE_OPS and not node.attributes.get_int(name, 0):
        return  # DequantizeLinear without output_dtype outputs its scale's (converted) type
    node.attributes[name] = ir.AttrInt64(name, int(target))


def _convert_initializers(
    graph: ir.Graph, plans: dict[ir.Node, _NodePlan], target: ir.DataType, report: ConversionReport
) -> None:
    """Every float32 initializer read by a converted slot becomes ``target``; read by float32 slots
    too, it is split so that those keep the exact original."""
    outputs = {id(v) for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        if value.dtype != ir.DataType.FLOAT or value.const_value is None:
            continue
        uses = list(value.uses())
        low = [(user, i) for user, i in uses if user in plans and i in plans[user].low_inputs]
        if not low:
            continue
        tensor, clamped = _converted_tensor(value.const_value, target)
        if clamped:
            report.clamped_values[name] = clamped
            logger.warning(
                "%s: %d values beyond half of %s's range clamped to it", name, clamped, target.name
            )
        if len(low) == len(uses) and id(value) not in outputs:
            value.const_value = tensor
            _set_type(value, target)
            continue
        copy = ir.Value(name=passes.unique_name(graph, f"{name}_{target.name.lower()}"), type=ir.TensorType(target),
                        shape=value.shape, const_value=tensor)  # fmt: skip
        graph.register_initializer(copy)
        for user, index in low:
            user.replace_input_with(index, copy)


def _converted_tensor(tensor: ir.TensorProtocol, target: ir.DataType) -> tuple[ir.TensorProtocol, int]:
    """The tensor in ``target`` and how many finite values were clamped. External tensors are read
    once to count and converted again lazily when saved (no second copy held in memory)."""
    converted, clamped = _converted_array(tensor.numpy(), target)
    if isinstance(tensor, ir.ExternalTensor):
        del converted

        def convert() -> ir.TensorProtocol:
            return ir.Tensor(_converted_array(tensor.numpy(), target)[0], name=tensor.name)

        return ir.LazyTensor(convert, target, ir.Shape(tensor.shape.numpy()), name=tensor.name), clamped
    return ir.Tensor(converted, name=tensor.name), clamped


def _converted_array(array: np.ndarray, target: ir.DataType) -> tuple[np.ndarray, int]:
    """Values beyond the safe range are clamped to it, not to the type's maximum: -1e9 mask constants
    become -32752 in float16, so that adding scores to them cannot round to -inf (-65504 - 20 would)."""
    numpy_type = _NUMPY_TYPES[target]
    largest = float(ml_dtypes.finfo(numpy_type).max) * FP16_RANGE_MARGIN
    beyond = np.isfinite(array) & (np.abs(array) > largest)
    clamped = int(np.count_nonzero(beyond))
    if clamped:
        array = np.where(beyond, np.sign(array) * largest, array)
    return np.asarray(array).astype(numpy_type), clamped


def _insert_casts(
    graph: ir.Graph,
    original: list[ir.Value],
    plans: dict[ir.Node, _NodePlan],
    target: ir.DataType,
    low_precision_io: bool,
) -> int:
    """A Cast wherever a value's new type differs from what a reader (or a graph output) wants."""
    casts: dict[tuple[int, ir.DataType], ir.Value] = {}

    def cast(value: ir.Value, dtype: ir.DataType, name: str | None = None) -> ir.Value:
        key = (id(value), dtype)
        if key not in casts or name is not None:
            casts[key] = _add_cast(graph, value, dtype, name)
        return casts[key]

    for value in original:
        for user, index in list(value.uses()):
            wanted = target if user in plans and index in plans[user].low_inputs else ir.DataType.FLOAT
            if value.dtype != wanted:
                user.replace_input_with(index, cast(value, wanted))
    wanted_output = target if low_precision_io else ir.DataType.FLOAT
    for position, value in enumerate(list(graph.outputs)):
        if value.dtype not in (ir.DataType.FLOAT, target) or value.dtype == wanted_output:
            continue
        if id(value) not in {id(v) for v in original} and value.name not in graph.initializers:
            continue
        name = value.name
        value.name = passes.unique_name(graph, f"{name}_{value.dtype.name.lower()}")
        graph.outputs[position] = cast(value, wanted_output, name)
        # the graph output keeps the declared shape (the model's contract); the value inside is left to
        # inference, which the strict checker holds to the producer (exporters declare wrong output ranks)
        value.shape = None
    return len(casts)


def _add_cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType, name: str | None) -> ir.Value:
    output = ir.Value(
        name=name or passes.unique_name(graph, f"{value.name}_{dtype.name.lower()}"),
        type=ir.TensorType(dtype),
        shape=value.shape,
    )
    node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(dtype))], outputs=[output],
                   name=passes.unique_name(graph, f"{output.name}_Cast"))  # fmt: skip
    if value.name in graph.initializers or value.producer() is None:
        graph.insert_before(next(iter(graph)), [node])
    else:
        passes.insert_after_producer(graph, value, [node])
    return output


def _float_initializer_bytes(graph: ir.Graph, dtype: ir.DataType) -> int:
    return sum(
        v.const_value.nbytes
        for v in graph.initializers.values()
        if v.dtype == dtype and v.const_value is not None
    )


def _set_type(value: ir.Value, dtype: ir.DataType) -> None:
    """A new type object: ``Value.dtype = ...`` mutates a TensorType that other values may share
    (the quantizer gives a DQ output its input's type object)."""
    value.type = ir.TensorType(dtype)
