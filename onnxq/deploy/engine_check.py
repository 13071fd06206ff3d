"""Check a built TensorRT engine against the quantization onnxq wrote: read the engine inspector's JSON
and report what TensorRT did not honour.

Input: the layer information of an engine built with ``ProfilingVerbosity.DETAILED``, as
``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` returns it or as
``trtexec --profilingVerbosity=detailed --exportLayerInfo=FILE`` writes it (the same JSON).

Format assumptions, and where they come from:

- Top level ``{"Layers": [...], "Bindings": [...]}``; ``Bindings`` is missing before TensorRT 8.4 and
  is not needed here (NVIDIA/TensorRT ``tools/experimental/trt-engine-explorer/trex/parser.py``,
  ``read_graph_file``). A top-level list of layer objects (``get_layer_information`` per layer) is
  accepted too.
- Without ``kDETAILED`` the ``Layers`` entries are plain name strings (TensorRT docs, "Engine
  Inspector"; NVIDIA/TensorRT issue 4020): that is reported as an error naming the build flag.
- Each layer: ``Name``, ``LayerType`` (implementation, e.g. ``CaskConvolution``, ``Reformat``, ``kgen``),
  optional ``ParameterType`` (the generic type, e.g. ``Convolution``), ``Inputs``/``Outputs`` with
  ``Name``, ``Location``, ``Dimensions``, ``Format/Datatype``; optional ``TacticName``, ``Origin``
  (``"QDQ"`` on reformats that implement a Q/DQ) and ``Metadata`` (trex ``layer.py``,
  ``df_preprocessing.py`` and the recorded engine graphs under ``trex/examples``).
- ``Metadata`` (TensorRT >= 8.6) holds one ``[ONNX Layer: <node name> | <properties>]`` item per ONNX node
  fused into the layer (onnx-tensorrt ``importerUtils.cpp``, ``processMetadata``; items over 4000
  characters are cut in the middle), joined by ``\\x1E`` (8.6) or ``\\x1F`` (10.x) (trex ``parser.py``,
  ``fix_unicode``). Without ``Metadata`` (older engines) the node names come from the layer ``Name``,
  which joins the fused nodes with ``" + "``.
- ``Format/Datatype`` is a long description ("Row major Int8 format", "Channel major FP16 format where
  channel % 2 == 0", "Row major linear FP32") or, for Myelin/kgen layers, a bare type ("Int8", "FP8",
  "Half", "Float", "BFloat16") (trex ``activations.py``, ``_regionFormatDict``). FP4 and Int4 are read the
  same way ("FP4", "Int4"); their exact long forms were not in any recorded sample.
- Engines with several optimization profiles repeat each layer with a ``[profile N]`` suffix; only the
  first profile (no suffix) is checked, as trex does.

What is reported (``check_engine``):

- ``not_low_precision``: a GEMM/Conv that onnxq quantized (``quantized_nodes_from_model``) whose engine
  layer does not take the planned type as an input (INT8, FP8, FP4); weight-only INT4/NVFP4 GEMMs pass
  when the layer computes in FP16/BF16 or streams the 4-bit weights; a node absent from every layer is
  reported as "not found in the engine".
- ``unfused_qdq``: Q/DQ nodes left as layers of their own (every ONNX node of the layer is a Q/DQ) that
  convert data (float -> low precision or back). Not reported: a Q that quantizes a network input (it
  has no producer to fuse into), run-time quantizers (``TRT_FP4DynamicQuantize``,
  ``TRT_MXFP8DynamicQuantize``), which are a kernel of their own, and constant or layout-only layers
  that carry a Q/DQ's name (quantized weights stored as constants).
- ``fp32_fallbacks``: compute layers whose float inputs are all FP32, except data-movement layers
  (reformats, shuffles, casts), layers reading only the FP32 network input and writing a narrower type
  (a fused down-cast), layers of quantized GEMMs (already reported above), layers holding a node the
  caller expects in FP32, and all of them when the rest of the graph was meant to be FP32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError

#: separators TensorRT puts between the ``[ONNX Layer: ...]`` items of one layer (8.6: RS, 10.x: US)
METADATA_SEPARATORS = ("\x1e", "\x1f")
METADATA_PREFIX = "[ONNX Layer: "
#: TensorRT's layer names for fused layers (used when the engine has no Metadata)
NAME_SEPARATOR = " + "
#: names TensorRT gives the reformats it inserts; their "to X + Y" part names the consumer, not them
REFORMAT_NAME_PREFIX = "Reformatting CopyNode"
PROFILE_SUFFIX = re.compile(r"\[profile +(\d+)\]")
#: TensorRT-internal layers that carry no data (multi-stream synchronisation)
SKIPPED_LAYER_TYPES = frozenset({"signal", "wait"})
#: layers that move or convert data without computing in the precision they carry
DATA_MOVEMENT_TYPES = frozenset(
    {"Reformat", "NoOp", "Shuffle", "Cast", "Constant", "Identity", "Slice", "Concatenation", "Gather"}
)
#: layer types that implement a run-time (dynamic) quantizer in the engine
DYNAMIC_QUANTIZE_LAYER_WORD = "DynamicQuantize"

#: engine datatype words (lower case) -> precision name; the first word of a format that is here wins
ENGINE_TYPE_WORDS = {
    "fp32": "fp32",
    "float": "fp32",
    "double": "fp64",
    "fp16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "fp8": "fp8",
    "e4m3": "fp8",
    "fp4": "fp4",
    "e2m1": "fp4",
    "int8": "int8",
    "int4": "int4",
    "uint8": "uint8",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
    "e8m0": "e8m0",
}
UNKNOWN = "unknown"
LOW_PRECISION = frozenset({"int8", "fp8", "fp4", "int4"})
HALF_PRECISION = frozenset({"fp16", "bf16"})
FULL_PRECISION = frozenset({"fp32", "fp64"})
FLOAT_COMPUTE = LOW_PRECISION | HALF_PRECISION | FULL_PRECISION

#: expected precisions of ``quantized_nodes_from_model``; the weight-only ones accept FP16/BF16 compute
WEIGHT_ONLY_INT4 = "int4"
WEIGHT_ONLY_FP4 = "fp4-weights"
WEIGHT_ONLY = frozenset({WEIGHT_ONLY_INT4, WEIGHT_ONLY_FP4})

#: what the non-quantized rest of the graph may be converted to (``--high-precision``)
HIGH_PRECISIONS = frozenset({"fp16", "bf16", "fp32"})
GEMM_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: ops between a DequantizeLinear and its GEMM that keep the quantized data as it is
PASS_THROUGH_OPS = frozenset({"Cast", "Transpose", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"})
MAX_PASS_THROUGH = 8
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
TRT_DOMAIN = "trt"
DYNAMIC_QUANTIZE_OPS = frozenset({"TRT_FP4DynamicQuantize", "TRT_MXFP8DynamicQuantize"})
QUANTIZE_OPS = frozenset({"QuantizeLinear"}) | DYNAMIC_QUANTIZE_OPS

ONNX_TO_PRECISION = {
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "int8",
    ir.DataType.FLOAT8E4M3FN: "fp8",
    ir.DataType.FLOAT8E4M3FNUZ: "fp8",
    ir.DataType.FLOAT8E5M2: "fp8",
    ir.DataType.FLOAT8E5M2FNUZ: "fp8",
    ir.DataType.INT4: "int4",
    ir.DataType.UINT4: "int4",
    ir.DataType.FLOAT4E2M1: "fp4",
}

HOW_TO_GET_JSON = (
    "pass the JSON of IEngineInspector.get_engine_information(LayerInformationFormat.JSON) "
    "or of trtexec --exportLayerInfo"
)
DETAILED_FIX = (
    "build the engine with ProfilingVerbosity.DETAILED (trtexec --profilingVerbosity=detailed) "
    "and export the layer information again"
)


@dataclass
class LayerInfo:
    name: str
    layer_type: str
    #: ONNX node names fused into this layer, from Metadata (or the layer name on old engines)
    onnx_nodes: list[str]
    #: precision of each input/output ("int8", "fp8", "fp4", "int4", "fp16", "bf16", "fp32", ...)
    input_types: list[str]
    output_types: list[str]
    tactic: str
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    #: the raw ``Format/Datatype`` strings
    input_formats: list[str] = field(default_factory=list)
    output_formats: list[str] = field(default_factory=list)
    parameter_type: str = ""
    origin: str = ""


@dataclass
class EngineCheck:
    #: (onnx node onnxq quantized, what TensorRT ran it in)
    not_low_precision: list[tuple[str, str]] = field(default_factory=list)
    #: Q or DQ nodes that survived as their own layers
    unfused_qdq: list[str] = field(default_factory=list)
    #: layers computing in FP32 that were not expected to
    fp32_fallbacks: list[str] = field(default_factory=list)
    #: the quantized nodes checked, with the precision each was expected in
    expected: dict[str, str] = field(default_factory=dict)
    layers_checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.not_low_precision or self.unfused_qdq or self.fp32_fallbacks)


# --- reading the inspector JSON ------------------------------------------------------------------


def read_layers(document: str | Path | Mapping[str, Any] | list[Any]) -> list[LayerInfo]:
    """The layers of an engine inspector JSON: a file path, the JSON text, or the parsed object (the
    whole document, or its list of layers)."""
    source, parsed = _load_document(document)
    raw_layers = _raw_layer_list(parsed, source)
    layers = []
    for index, raw in enumerate(raw_layers):
        if not isinstance(raw, Mapping):
            raise OnnxqError(
                f"{source}: layer {index} is {type(raw).__name__}, not an object", HOW_TO_GET_JSON
            )
        if _skip_raw_layer(raw):
            continue
        layers.append(_layer_from_raw(raw, index, source))
    return layers


def _load_document(document: str | Path | Mapping[str, Any] | list[Any]) -> tuple[str, Any]:
    if isinstance(document, (Mapping, list)):
        return "engine layer information", document
    if isinstance(document, str) and document.lstrip().startswith(("{", "[")):
        return "engine layer information", _parse_json(document, "engine layer information")
    path = Path(document)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OnnxqError(
            f"cannot read the engine layer information {path} ({error})", HOW_TO_GET_JSON
        ) from None
    return str(path), _parse_json(text, str(path))


def _parse_json(text: str, source: str) -> Any:
    try:
        # strict=False: the Metadata separators may be written as raw control characters
        return json.loads(text, strict=False)
    except json.JSONDecodeError as error:
        raise OnnxqError(
            f"{source} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})",
            HOW_TO_GET_JSON,
        ) from None


def _raw_layer_list(parsed: Any, source: str) -> list[Any]:
    if isinstance(parsed, list):
        layers: Any = parsed
    elif isinstance(parsed, Mapping) and "Layers" in parsed:
        layers = parsed["Layers"]
    else:
        raise OnnxqError(
            f'{source} has no "Layers" list, so it is not TensorRT layer information', HOW_TO_GET_JSON
        )
    if not isinstance(layers, list):
        raise OnnxqError(f'{source}: "Layers" is {type(layers).__name__}, not a list', HOW_TO_GET_JSON)
    if layers and all(isinstance(layer, str) for layer in layers):
        raise OnnxqError(f"{source} holds layer names only, without types or precisions", DETAILED_FIX)
    return layers


def _skip_raw_layer(raw: Mapping[str, Any]) -> bool:
    if raw.get("LayerType") in SKIPPED_LAYER_TYPES:
        return True
    match = PROFILE_SUFFIX.search(str(raw.get("Name", "")))
    # the first optimization profile has no suffix; later ones repeat the same layers
    return match is not None and int(match.group(1)) > 0


def _layer_from_raw(raw: Mapping[str, Any], index: int, source: str) -> LayerInfo:
    name = raw.get("Name")
    if not isinstance(name, str):
        raise OnnxqError(f'{source}: layer {index} has no "Name"', HOW_TO_GET_JSON)
    inputs = _tensors(raw, "Inputs", name, source)
    outputs = _tensors(raw, "Outputs", name, source)
    input_formats = [_format_of(tensor) for tensor in inputs]
    output_formats = [_format_of(tensor) for tensor in outputs]
    return LayerInfo(
        name=name,
        layer_type=str(raw.get("LayerType", "")),
        onnx_nodes=_onnx_nodes(raw, name),
        input_types=[engine_precision(text) for text in input_formats],
        output_types=[engine_precision(text) for text in output_formats],
        tactic=str(raw.get("TacticName", "")),
        input_names=[str(tensor.get("Name", "")) for tensor in inputs],
        output_names=[str(tensor.get("Name", "")) for tensor in outputs],
        input_formats=input_formats,
        output_formats=output_formats,
        parameter_type=str(raw.get("ParameterType", "")),
        origin=str(raw.get("Origin", "")),
    )


def _tensors(raw: Mapping[str, Any], key: str, layer: str, source: str) -> list[Mapping[str, Any]]:
    tensors = raw.get(key, [])
    if not isinstance(tensors, list) or not all(isinstance(tensor, Mapping) for tensor in tensors):
        raise OnnxqError(
            f'{source}: "{key}" of layer {layer!r} is not a list of tensor objects', HOW_TO_GET_JSON
        )
    return tensors


def _format_of(tensor: Mapping[str, Any]) -> str:
    return str(tensor.get("Format/Datatype", ""))


def engine_precision(format_text: str) -> str:
    """The precision a ``Format/Datatype`` string names ("Row major Int8 format" -> "int8")."""
    for word in re.findall(r"[A-Za-z0-9]+", format_text):
        precision = ENGINE_TYPE_WORDS.get(word.lower())
        if precision is not None:
            return precision
    return UNKNOWN


def _onnx_nodes(raw: Mapping[str, Any], name: str) -> list[str]:
    if "Metadata" in raw:
        return _nodes_from_metadata(str(raw["Metadata"]))
    if name.startswith(REFORMAT_NAME_PREFIX):
        return []
    return [part.strip() for part in name.split(NAME_SEPARATOR) if part.strip()]


def _nodes_from_metadata(metadata: str) -> list[str]:
    for separator in METADATA_SEPARATORS[1:]:
        metadata = metadata.replace(separator, METADATA_SEPARATORS[0])
    nodes = []
    for item in metadata.split(METADATA_SEPARATORS[0]):
        item = item.strip()
        if not item.startswith(METADATA_PREFIX):
            continue
        # "[ONNX Layer: name | Local Function: f]": the properties after " | " are not part of the name
        node = item[len(METADATA_PREFIX) :].removesuffix("]").split(" | ")[0].strip()
        if node:
            nodes.append(node)
    return nodes


# --- what onnxq quantized ------------------------------------------------------------------------


def quantized_nodes_from_model(model: ir.Model | onnx.ModelProto) -> dict[str, str]:
    """GEMM/Conv node name -> the precision TensorRT should run it in, from the Q/DQ feeding it.

    "int8", "fp8" and "fp4" follow the quantized activation; GEMMs with only quantized weights give
    "int4" or "fp4-weights" (weight-only: FP16/BF16 compute is fine) or the 8-bit weight type (which
    TensorRT cannot honour without a quantized activation, so the check reports it). ``MatMulNBits``
    (ONNX Runtime only) and unnamed nodes are left out.
    """
    graph = (ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model).graph
    expected = {}
    for node in graph.all_nodes():
        if node.op_type not in GEMM_OPS or node.domain not in ("", "ai.onnx") or not node.name:
            continue
        precision = _expected_precision(node)
        if precision is not None:
            expected[node.name] = precision
    return expected


def qdq_nodes_from_model(model: ir.Model | onnx.ModelProto) -> dict[str, str]:
    """Q/DQ and run-time quantizer node name -> op type: the ``qdq_nodes`` argument of ``check_engine``."""
    graph = (ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model).graph
    return {
        node.name: node.op_type
        for node in graph.all_nodes()
        if node.name
        and (
            (node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx"))
            or (node.op_type in DYNAMIC_QUANTIZE_OPS and node.domain == TRT_DOMAIN)
        )
    }


def _expected_precision(node: ir.Node) -> str | None:
    activations: list[str] = []
    weights: list[str] = []
    for value in node.inputs[:2]:
        source = _quantized_source(value)
        if source is not None:
            precision, is_weight = source
            (weights if is_weight else activations).append(precision)
    if activations:
        return activations[0]
    if not weights:
        return None
    return {"int4": WEIGHT_ONLY_INT4, "fp4": WEIGHT_ONLY_FP4}.get(weights[0], weights[0])


def _quantized_source(value: ir.Value | None) -> tuple[str, bool] | None:
    """(precision, is a weight) of the DequantizeLinear that feeds ``value``, through layout-only ops."""
    for _ in range(MAX_PASS_THROUGH):
        producer = value.producer() if value is not None else None
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type == "DequantizeLinear":
            data, dtype = producer.inputs[0], _quantized_dtype(producer)
            if data is None or dtype not in ONNX_TO_PRECISION:
                return None
            return ONNX_TO_PRECISION[dtype], _is_constant(data)
        if producer.op_type not in PASS_THROUGH_OPS:
            return None
        value = producer.inputs[0]
    return None


def _quantized_dtype(dequantize: ir.Node) -> ir.DataType | None:
    """The type of a DequantizeLinear's data: declared, else its zero point's, else its QuantizeLinear's."""
    data = dequantize.inputs[0]
    zero_point = dequantize.inputs[2] if len(dequantize.inputs) > 2 else None
    if data is not None and data.dtype is not None:
        return data.dtype
    if zero_point is not None and zero_point.dtype is not None:
        return zero_point.dtype
    quantize = data.producer() if data is not None else None
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return None
    q_zero_point = quantize.inputs[2] if len(quantize.inputs) > 2 else None
    if q_zero_point is not None and q_zero_point.dtype is not None:
        return q_zero_point.dtype
    output_dtype = quantize.attributes.get_int("output_dtype", 0)
    # ONNX: without zero point or output_dtype, QuantizeLinear produces uint8
    return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8


def _is_constant(value: ir.Value) -> bool:
    """Initializer, Constant output, or QuantizeLinear of one (weights quantized in the graph)."""
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type == "Constant":
        return True
    source = producer.inputs[0] if producer.inputs else None
    return producer.op_type == "QuantizeLinear" and source is not None and _is_constant(source)


# --- the check -----------------------------------------------------------------------------------


def check_engine(
    layers: list[LayerInfo],
    quantized_nodes: Mapping[str, str],
    qdq_nodes: Iterable[str],
    *,
    expected_fp32: Iterable[str] = (),
    high_precision: str = "fp16",
) -> EngineCheck:
    """Compare the engine's layers with what onnxq planned.

    ``quantized_nodes``: ``quantized_nodes_from_model``. ``qdq_nodes``: Q/DQ node names, or
    ``qdq_nodes_from_model`` (name -> op type, which also tells run-time quantizers apart).
    ``expected_fp32``: ONNX nodes deliberately kept in FP32. ``high_precision``: what the non-quantized
    rest was converted to; with "fp32" no layer is an FP32 fallback.
    """
    if high_precision not in HIGH_PRECISIONS:
        raise ValueError(f"high_precision must be one of {sorted(HIGH_PRECISIONS)}, not {high_precision!r}")
    engine = _EngineGraph(layers)
    qdq_ops = dict(qdq_nodes) if isinstance(qdq_nodes, Mapping) else dict.fromkeys(qdq_nodes, "")
    check = EngineCheck(expected=dict(quantized_nodes), layers_checked=len(layers))
    for node, precision in quantized_nodes.items():
        ran_in = _check_quantized_node(engine.layers_of(node), precision)
        if ran_in is not None:
            check.not_low_precision.append((node, ran_in))
    standalone = [layer for layer in layers if _is_qdq_only(layer, qdq_ops)]
    unfused = (node for layer in standalone for node in _unfused_nodes(layer, qdq_ops, engine))
    # a Q/DQ split over several layers is one problem
    check.unfused_qdq = list(dict.fromkeys(unfused))
    if high_precision != "fp32":
        skip = {id(layer) for layer in standalone}
        fp32_nodes = set(expected_fp32) | set(quantized_nodes)
        check.fp32_fallbacks = [
            layer.name
            for layer in layers
            if id(layer) not in skip
            and not fp32_nodes & set(layer.onnx_nodes)
            and _computes_in_fp32(layer, engine)
        ]
    return check


class _EngineGraph:
    """Which layers hold each ONNX node, and which layer produces each engine tensor."""

    def __init__(self, layers: list[LayerInfo]) -> None:
        self._by_node: dict[str, list[LayerInfo]] = {}
        self._producer: dict[str, LayerInfo] = {}
        for layer in layers:
            for node in layer.onnx_nodes:
                self._by_node.setdefault(node, []).append(layer)
            for tensor in layer.output_names:
                self._producer[tensor] = layer

    def layers_of(self, node: str) -> list[LayerInfo]:
        return self._by_node.get(node, [])

    def from_network_input(self, tensor: str) -> bool:
        """True when ``tensor`` is a network input, possibly after reformats/shuffles of it."""
        for _ in range(len(self._producer) + 1):
            producer = self._producer.get(tensor)
            if producer is None:
                return True
            if not _is_data_movement(producer) or not producer.input_names:
                return False
            tensor = producer.input_names[0]
        return False


def _check_quantized_node(layers: list[LayerInfo], expected: str) -> str | None:
    """None when every compute layer holding the node honours ``expected``; else what it ran in."""
    compute = [layer for layer in layers if not _is_data_movement(layer)] or layers
    if not compute:
        return "not found in the engine"
    for layer in compute:
        if not _honours(layer, expected):
            return _compute_precision(layer)
    return None


def _honours(layer: LayerInfo, expected: str) -> bool:
    types = set(layer.input_types)
    if expected in WEIGHT_ONLY:
        # weight-only GEMMs compute in FP16/BF16 (weights folded in) or stream the 4-bit weights
        return bool(types & {"int4", "fp4"}) or _compute_precision(layer) in HALF_PRECISION | LOW_PRECISION
    return expected in types


def _compute_precision(layer: LayerInfo) -> str:
    """The narrowest float type among the layer's inputs (its outputs when it has no float input)."""
    order = ["fp4", "int4", "int8", "fp8", "bf16", "fp16", "fp32", "fp64"]
    for types in (layer.input_types, layer.output_types):
        present = [t for t in order if t in types]
        if present:
            return present[0]
    return UNKNOWN


def _computes_in_fp32(layer: LayerInfo, engine: _EngineGraph) -> bool:
    """Every float input is FP32, and the layer is not merely casting an FP32 network input down."""
    # a reformat converts (also when it implements a Q/DQ): it computes nothing in FP32
    if _has_data_movement_type(layer):
        return False
    floats = [
        (name, kind) for name, kind in zip(layer.input_names, layer.input_types) if kind in FLOAT_COMPUTE
    ]
    if not floats or any(kind not in FULL_PRECISION for _, kind in floats):
        return False
    reads_inner_fp32 = any(not engine.from_network_input(name) for name, _ in floats)
    writes_only_fp32 = all(kind in FULL_PRECISION for kind in layer.output_types if kind in FLOAT_COMPUTE)
    return reads_inner_fp32 or writes_only_fp32


def _is_data_movement(layer: LayerInfo) -> bool:
    """Moves data; a reformat that implements a Q/DQ counts as the quantizer it is."""
    return layer.origin != "QDQ" and _has_data_movement_type(layer)


def _has_data_movement_type(layer: LayerInfo) -> bool:
    return layer.layer_type in DATA_MOVEMENT_TYPES or layer.parameter_type in DATA_MOVEMENT_TYPES


def _is_qdq_only(layer: LayerInfo, qdq_ops: Mapping[str, str]) -> bool:
    return bool(layer.onnx_nodes) and all(node in qdq_ops for node in layer.onnx_nodes)


def _unfused_nodes(layer: LayerInfo, qdq_ops: Mapping[str, str], engine: _EngineGraph) -> Iterator[str]:
    """The Q/DQ nodes of a layer made of Q/DQ only, minus those that are fine on their own."""
    quantizes, dequantizes = _conversion(layer)
    if not (quantizes or dequantizes):
        # constant weights stored quantized, or a layout change that carries the Q/DQ's name
        return
    if _is_quantize_only(layer, qdq_ops, quantizes and not dequantizes):
        if _is_dynamic_quantize(layer, qdq_ops):
            return
        if layer.input_names and engine.from_network_input(layer.input_names[0]):
            return
    for node in layer.onnx_nodes:
        if qdq_ops[node] not in DYNAMIC_QUANTIZE_OPS:
            yield node


def _conversion(layer: LayerInfo) -> tuple[bool, bool]:
    """(quantizes: float in, low precision out; dequantizes: low precision in, float out)."""
    wide = HALF_PRECISION | FULL_PRECISION
    low_in, wide_in = bool(set(layer.input_types) & LOW_PRECISION), bool(set(layer.input_types) & wide)
    low_out, wide_out = bool(set(layer.output_types) & LOW_PRECISION), bool(set(layer.output_types) & wide)
    return wide_in and low_out, low_in and wide_out


def _is_quantize_only(layer: LayerInfo, qdq_ops: Mapping[str, str], converts_down_only: bool) -> bool:
    ops = {qdq_ops[node] for node in layer.onnx_nodes}
    if "" not in ops:
        return ops <= QUANTIZE_OPS
    # op types unknown: judge by what the layer does to the data
    return converts_down_only


def _is_dynamic_quantize(layer: LayerInfo, qdq_ops: Mapping[str, str]) -> bool:
    ops = {qdq_ops[node] for node in layer.onnx_nodes}
    if ops and ops <= DYNAMIC_QUANTIZE_OPS:
        return True
    return (
        DYNAMIC_QUANTIZE_LAYER_WORD in layer.layer_type or DYNAMIC_QUANTIZE_LAYER_WORD in layer.parameter_type
    )


# --- report --------------------------------------------------------------------------------------


def format_report(check: EngineCheck) -> str:
    """A short table for the terminal: one row per problem, or one line saying all is well."""
    quantized = len(check.expected)
    if check.ok:
        return (
            f"Engine check passed: {quantized} quantized node(s) ran in their planned precision, "
            f"no Q/DQ left unfused, no FP32 fallback ({check.layers_checked} layers)."
        )
    rows = [("problem", "where", "detail")]
    rows += [
        ("not low precision", node, f"planned {check.expected.get(node, '?')}, ran {ran_in}")
        for node, ran_in in check.not_low_precision
    ]
    rows += [("unfused Q/DQ", node, "runs as its own layer") for node in check.unfused_qdq]
    rows += [("FP32 fallback", layer, "computes in FP32") for layer in check.fp32_fallbacks]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip() for row in rows]
    problems = len(rows) - 1
    header = (
        f"Engine check: {problems} problem(s) ({quantized} quantized node(s), {check.layers_checked} layers)"
    )
    return "\n".join([header, *lines])
