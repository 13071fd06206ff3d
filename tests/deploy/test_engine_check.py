"""The engine check on TensorRT inspector JSON recorded by hand (tests/deploy/fixtures), against the
node names of models that ``onnxq.quantize`` writes for small models built here.

Fixtures: ``int8_cnn_clean`` (TensorRT 10 style, ``\\x1F`` metadata), ``int8_cnn_conv_fp16_dq_unfused``
(8.6 style, ``\\x1E``: conv2 in FP16, two DQ left as Scale layers), ``fp8_mlp_fp32_fallback`` (Myelin kgen
types: an FP32 Relu between FP8 GEMMs) and ``nvfp4_mlp_dynamic_quantize`` (DynamicQuantize layers, FP4
GEMMs).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.deploy.engine_check import (
    GEMM_OPS,
    WEIGHT_ONLY_FP4,
    WEIGHT_ONLY_INT4,
    EngineCheck,
    check_engine,
    engine_precision,
    format_report,
    qdq_nodes_from_model,
    quantized_nodes_from_model,
    read_layers,
)
from onnxq.errors import OnnxqError
from tests import model_builders

FIXTURES = Path(__file__).parent / "fixtures"
IR_VERSION = 10
K, HIDDEN, OUT, SEQ = 64, 64, 16, 4


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def _mlp() -> onnx.ModelProto:
    """x [B, 4, K] -> fc1 -> relu1 -> fc2 -> relu2 -> head, the node names of the MLP fixtures."""
    rng = np.random.default_rng(3)
    shapes = {"W1": (K, HIDDEN), "W2": (HIDDEN, HIDDEN), "W3": (HIDDEN, OUT)}
    initializers = [
        numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", SEQ, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", SEQ, OUT])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def _mlp_data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(4).standard_normal((16, SEQ, K)).astype(np.float32)}


@pytest.fixture(scope="module")
def cnn_int8() -> onnxq.QuantizeResult:
    return onnxq.quantize(
        model_builders.residual_cnn(), mode="int8", calibration_data=model_builders.cnn_inputs(1, 8)
    )


@pytest.fixture(scope="module")
def mlp_results() -> dict[str, onnxq.QuantizeResult]:
    model, data = _mlp(), _mlp_data()
    modes = {"fp8": data, "nvfp4": data, "nvfp4-w4a16": None, "int4": None}
    return {mode: onnxq.quantize(model, mode=mode, calibration_data=calib) for mode, calib in modes.items()}


def _planned_base(result: onnxq.QuantizeResult, precision: str) -> dict[str, str]:
    """The plan's quantized GEMMs (an independent record of what the inserter was asked to do)."""
    return {d.node: precision for d in result.plan.quantized_nodes() if d.op_type in GEMM_OPS}


def _planned_blocks(result: onnxq.QuantizeResult) -> dict[str, str]:
    expected = {}
    for choice in result.plan.blocks:
        if choice.activation_format == "nvfp4":
            expected[choice.node] = "fp4"
        elif choice.activation_format == "float":
            expected[choice.node] = WEIGHT_ONLY_FP4 if choice.weight_format == "nvfp4" else WEIGHT_ONLY_INT4
        else:
            expected[choice.node] = choice.activation_format
    return expected


# --- reading ------------------------------------------------------------------------------------


def test_read_layers_takes_names_types_and_nodes_from_the_inspector_json() -> None:
    layers = read_layers(FIXTURES / "int8_cnn_clean.json")
    by_name = {layer.name: layer for layer in layers}
    assert len(layers) == len(_fixture("int8_cnn_clean")["Layers"])
    conv2 = by_name["conv2 + add1 + relu2"]
    assert conv2.onnx_nodes == [
        "r1_DequantizeLinear", "w2_DequantizeLinear", "conv2", "add1", "relu2", "r2_QuantizeLinear",
    ]  # fmt: skip
    assert conv2.layer_type == "CaskConvolution" and conv2.parameter_type == "Convolution"
    assert conv2.input_types == ["int8", "int8"] and conv2.output_types == ["int8"]
    assert conv2.tactic.startswith("sm80_xmma_fprop_implicit_gemm_interleaved_i8i8")
    assert by_name["conv3 + relu3"].output_types == ["fp16"]
    assert by_name["x_QuantizeLinear"].origin == "QDQ"
    reformat = by_name["Reformatting CopyNode for Network Output y"]
    assert (
        reformat.onnx_nodes == [] and reformat.input_types == ["fp16"] and reformat.output_types == ["fp32"]
    )


def test_the_three_ways_to_pass_the_document_read_the_same_layers() -> None:
    path = FIXTURES / "fp8_mlp_fp32_fallback.json"
    from_path = read_layers(path)
    assert read_layers(str(path)) == from_path
    assert read_layers(path.read_text(encoding="utf-8")) == from_path
    assert read_layers(_fixture("fp8_mlp_fp32_fallback")) == from_path
    assert read_layers(json.dumps(_fixture("fp8_mlp_fp32_fallback")["Layers"][:2])) == from_path[:2]


@pytest.mark.parametrize(
    ("text", "precision"),
    [
        ("Row major linear FP32", "fp32"),
        ("Row major Int8 format", "int8"),
        ("Thirty-two wide channel vectorized row major Int8 format", "int8"),
        ("Four wide channel vectorized row major FP32 format", "fp32"),
        ("Channel major FP16 format where channel % 2 == 0", "fp16"),
        ("Channel major INT8 format where channel % 16 == 0", "int8"),
        ("Row major linear BFloat16 format", "bf16"),
        ("Row major linear FP8 format", "fp8"),
        ("Row major linear FP4 format", "fp4"),
        ("Half", "fp16"),
        ("Float", "fp32"),
        ("BFloat16", "bf16"),
        ("Int32", "int32"),
        ("Row major linear Int64 format", "int64"),
        ("Unknown format", "unknown"),
        ("", "unknown"),
    ],
)
def test_engine_precision_reads_long_and_kgen_format_strings(text: str, precision: str) -> None:
    assert engine_precision(text) == precision


def test_metadata_properties_raw_separators_and_later_profiles() -> None:
    document = _fixture("fp8_mlp_fp32_fallback")
    first = document["Layers"][1]
    first["Metadata"] = "[ONNX Layer: fc1 | Local Function: block (Block)]\x1e[ONNX Layer: relu1]"
    later_profile = dict(copy.deepcopy(first), Name=first["Name"] + " [profile 1]")
    signal = {"Name": "signal_0", "LayerType": "signal", "Inputs": [], "Outputs": []}
    document["Layers"] += [later_profile, signal]
    # raw control characters inside strings, as a C++ writer may leave them
    text = json.dumps(document).replace("\\u001e", "\x1e").replace("\\u001f", "\x1f")
    layers = read_layers(text)
    assert [layer.name for layer in layers] == [
        layer["Name"] for layer in _fixture("fp8_mlp_fp32_fallback")["Layers"]
    ]
    assert layers[1].onnx_nodes == ["fc1", "relu1"]


# --- the four recorded engines -------------------------------------------------------------------


def test_quantized_nodes_of_int8_and_fp8_cnn_match_the_plan(cnn_int8: onnxq.QuantizeResult) -> None:
    found = quantized_nodes_from_model(cnn_int8.model)
    assert found == _planned_base(cnn_int8, "int8") and len(found) >= 3
    fp8 = onnxq.quantize(
        model_builders.residual_cnn(), mode="fp8", calibration_data=model_builders.cnn_inputs(1, 8)
    )
    assert quantized_nodes_from_model(fp8.model) == _planned_base(fp8, "fp8") == dict.fromkeys(found, "fp8")
    # a ModelProto works the same
    assert quantized_nodes_from_model(onnx.load_from_string(_serialized(cnn_int8))) == found


def _serialized(result: onnxq.QuantizeResult) -> bytes:
    import onnx_ir as ir

    return ir.serde.serialize_model(result.model).SerializeToString()


def test_clean_int8_engine_passes(cnn_int8: onnxq.QuantizeResult) -> None:
    check = check_engine(
        read_layers(FIXTURES / "int8_cnn_clean.json"),
        quantized_nodes_from_model(cnn_int8.model),
        qdq_nodes_from_model(cnn_int8.model),
    )
    assert check == EngineCheck(expected=quantized_nodes_from_model(cnn_int8.model), layers_checked=9)
    assert check.ok
    assert format_report(check).startswith("Engine check passed: 3 quantized node(s)")


@pytest.mark.parametrize("op_types_known", [True, False])
def test_conv_in_fp16_and_surviving_dq_layers_are_reported(
    cnn_int8: onnxq.QuantizeResult, op_types_known: bool
) -> None:
    qdq = qdq_nodes_from_model(cnn_int8.model)
    check = check_engine(
        read_layers(FIXTURES / "int8_cnn_conv_fp16_dq_unfused.json"),
        quantized_nodes_from_model(cnn_int8.model),
        qdq if op_types_known else set(qdq),
    )
    assert check.not_low_precision == [("conv2", "fp16")]
    assert check.unfused_qdq == ["r1_DequantizeLinear", "w2_DequantizeLinear"]
    assert check.fp32_fallbacks == []
    assert not check.ok


def test_fp8_engine_reports_the_fp32_relu_between_fp8_gemms(
    mlp_results: dict[str, onnxq.QuantizeResult],
) -> None:
    model = mlp_results["fp8"].model
    quantized = quantized_nodes_from_model(model)
    assert (
        quantized == _planned_base(mlp_results["fp8"], "fp8") == dict.fromkeys(["fc1", "fc2", "head"], "fp8")
    )
    layers = read_layers(FIXTURES / "fp8_mlp_fp32_fallback.json")
    check = check_engine(layers, quantized, qdq_nodes_from_model(model))
    assert (check.not_low_precision, check.unfused_qdq) == ([], [])
    assert check.fp32_fallbacks == ["__myl_ReluQuan_myl0_3"]
    # kept in FP32 on purpose, or the whole rest meant to be FP32: nothing to report
    assert check_engine(layers, quantized, qdq_nodes_from_model(model), expected_fp32=["relu2"]).ok
    assert check_engine(layers, quantized, qdq_nodes_from_model(model), high_precision="fp32").ok


def test_nvfp4_engine_with_dynamic_quantize_layers_passes(
    mlp_results: dict[str, onnxq.QuantizeResult],
) -> None:
    result = mlp_results["nvfp4"]
    quantized = quantized_nodes_from_model(result.model)
    assert quantized == _planned_blocks(result) == {"fc1": "fp4", "fc2": "fp4"}
    qdq = qdq_nodes_from_model(result.model)
    assert qdq["x_FP4DynamicQuantize"] == "TRT_FP4DynamicQuantize"
    check = check_engine(read_layers(FIXTURES / "nvfp4_mlp_dynamic_quantize.json"), quantized, qdq)
    assert check.ok, format_report(check)


def test_nvfp4_gemm_in_fp16_with_its_dequantize_left_over_is_reported(
    mlp_results: dict[str, onnxq.QuantizeResult],
) -> None:
    result = mlp_results["nvfp4"]
    document = _fixture("nvfp4_mlp_dynamic_quantize")
    layers = document["Layers"]
    fc2 = next(layer for layer in layers if "[ONNX Layer: fc2]" in layer["Metadata"])
    # TensorRT dequantized r1 on its own and ran fc2 on FP16 data
    leftover = {
        "Name": "r1_dequantize", "LayerType": "kgen",
        "Inputs": [fc2["Inputs"][0], fc2["Inputs"][1]],
        "Outputs": [{"Name": "r1_dequantized", "Format/Datatype": "Half"}],
        "Metadata": "[ONNX Layer: r1_scale_DequantizeLinear]\x1f[ONNX Layer: r1_DequantizeLinear]",
    }  # fmt: skip
    fc2["Inputs"] = [{"Name": "r1_dequantized", "Format/Datatype": "Half"}]
    fc2["Metadata"] = "\x1f".join(
        f"[ONNX Layer: {n}]" for n in ("W2_scale_DequantizeLinear", "W2_DequantizeLinear", "fc2", "relu2")
    )
    layers.insert(layers.index(fc2), leftover)
    check = check_engine(
        read_layers(document), quantized_nodes_from_model(result.model), qdq_nodes_from_model(result.model)
    )
    assert check.not_low_precision == [("fc2", "fp16")]
    assert check.unfused_qdq == ["r1_scale_DequantizeLinear", "r1_DequantizeLinear"]
    assert check.fp32_fallbacks == []


@pytest.mark.parametrize(("mode", "expected"), [("nvfp4-w4a16", WEIGHT_ONLY_FP4), ("int4", WEIGHT_ONLY_INT4)])
def test_weight_only_gemms_pass_in_fp16_and_fail_in_fp32(
    mlp_results: dict[str, onnxq.QuantizeResult], mode: str, expected: str
) -> None:
    result = mlp_results[mode]
    quantized = quantized_nodes_from_model(result.model)
    assert quantized == _planned_blocks(result) == {"fc1": expected, "fc2": expected}

    def gemm(node: str, data_type: str) -> dict[str, Any]:
        return {
            "Name": node, "LayerType": "gemm", "Metadata": f"[ONNX Layer: {node}]",
            "Inputs": [{"Name": f"{node}_in", "Format/Datatype": data_type}],
            "Outputs": [{"Name": f"{node}_out", "Format/Datatype": data_type}],
        }  # fmt: skip

    qdq = qdq_nodes_from_model(result.model)
    assert check_engine(read_layers([gemm("fc1", "Half"), gemm("fc2", "BFloat16")]), quantized, qdq).ok
    check = check_engine(read_layers([gemm("fc1", "Half"), gemm("fc2", "Float")]), quantized, qdq)
    assert check.not_low_precision == [("fc2", "fp32")]


# --- older engines, missing nodes, unfused quantizers -----------------------------------------------


def _trt8_layers() -> list[dict[str, Any]]:
    """Layer names as TensorRT 8.x writes them without Metadata (trex's recorded QAT ResNet)."""
    int8 = "Thirty-two wide channel vectorized row major Int8 format"
    return [
        {"Name": "QuantizeLinear_2", "LayerType": "Reformat", "Origin": "QDQ",
         "Inputs": [{"Name": "input.1", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "q2", "Format/Datatype": "Row major Int8 format"}]},
        {"Name": "conv1.weight + QuantizeLinear_7 + Conv_9 + MaxPool_12", "LayerType": "ConvActPool",
         "Inputs": [{"Name": "q2", "Format/Datatype": "Row major Int8 format"}],
         "Outputs": [{"Name": "c9", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "Softmax_20", "LayerType": "CudaSoftMax",
         "Inputs": [{"Name": "c9", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": [{"Name": "s20", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "QuantizeLinear_21", "LayerType": "Scale",
         "Inputs": [{"Name": "s20", "Format/Datatype": "Row major linear FP16 format"}],
         "Outputs": [{"Name": "q21", "Format/Datatype": int8}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to Conv_23 + Relu_24", "LayerType": "Reformat",
         "Inputs": [{"Name": "q21", "Format/Datatype": int8}],
         "Outputs": [{"Name": "q21r", "Format/Datatype": "Row major Int8 format"}]},
        {"Name": "Conv_23 + Relu_24", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "q21r", "Format/Datatype": "Row major Int8 format"}],
         "Outputs": [{"Name": "out", "Format/Datatype": "Row major linear FP32"}]},
    ]  # fmt: skip


def test_trt8_names_without_metadata_and_a_quantize_that_did_not_fuse() -> None:
    layers = read_layers({"Layers": _trt8_layers(), "Bindings": ["input.1", "out"]})
    assert layers[1].onnx_nodes == ["conv1.weight", "QuantizeLinear_7", "Conv_9", "MaxPool_12"]
    assert layers[4].onnx_nodes == []  # the reformat's name names its consumer, not itself
    qdq = {"QuantizeLinear_2", "QuantizeLinear_7", "QuantizeLinear_21"}
    check = check_engine(layers, {"Conv_9": "int8", "Conv_23": "int8"}, qdq)
    # QuantizeLinear_2 quantizes the network input (nothing to fuse into); QuantizeLinear_21 follows a
    # Softmax it could have fused into
    assert check.unfused_qdq == ["QuantizeLinear_21"]
    assert check.not_low_precision == [] and check.fp32_fallbacks == []


def test_a_quantized_node_missing_from_the_engine_is_reported() -> None:
    layers = read_layers({"Layers": _trt8_layers()})
    check = check_engine(layers, {"Conv_9": "int8", "Conv_99": "int8"}, ())
    assert check.not_low_precision == [("Conv_99", "not found in the engine")]


def test_fp32_compute_layers_are_fallbacks_but_reformats_and_shape_layers_are_not() -> None:
    raw = _trt8_layers()
    raw[2]["Inputs"][0]["Format/Datatype"] = "Row major linear FP32"  # Softmax ran in FP32
    raw.append({"Name": "shape_of_out", "LayerType": "Shape",
                "Inputs": [{"Name": "dims", "Format/Datatype": "Int64"}],
                "Outputs": [{"Name": "dims2", "Format/Datatype": "Int64"}]})  # fmt: skip
    check = check_engine(read_layers({"Layers": raw}), {"Conv_9": "int8", "Conv_23": "int8"}, ())
    assert check.fp32_fallbacks == ["Softmax_20"]


def test_format_report_lists_each_problem_once() -> None:
    check = EngineCheck(
        not_low_precision=[("conv2", "fp16")],
        unfused_qdq=["w2_DequantizeLinear"],
        fp32_fallbacks=["softmax_layer"],
        expected={"conv1": "int8", "conv2": "int8"},
        layers_checked=12,
    )
    lines = format_report(check).splitlines()
    assert lines[0] == "Engine check: 3 problem(s) (2 quantized node(s), 12 layers)"
    assert len(lines) == 5
    assert "conv2" in lines[2] and "planned int8, ran fp16" in lines[2]
    assert "w2_DequantizeLinear" in lines[3] and "softmax_layer" in lines[4]


# --- bad documents ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"Layers": [{"Name": "a",}]}', "is not valid JSON"),
        ('{"Layers": ["conv1 + relu1", "fc"]}', "ProfilingVerbosity.DETAILED"),
        ('{"Bindings": []}', 'no "Layers" list'),
        ('{"Layers": {"Name": "a"}}', '"Layers" is dict'),
        ('{"Layers": [{"LayerType": "gemm"}]}', 'layer 0 has no "Name"'),
        ('{"Layers": [{"Name": "a", "Inputs": "x"}]}', "is not a list of tensor objects"),
        ('{"Layers": [3]}', "layer 0 is int"),
    ],
)
def test_malformed_documents_give_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "layers.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(OnnxqError) as error:
        read_layers(path)
    text = str(error.value)
    assert message in text and "\n" not in text and "Fix:" in text


def test_missing_file_gives_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match="cannot read the engine layer information") as error:
        read_layers(tmp_path / "absent.json")
    assert "\n" not in str(error.value)


def test_quantized_nodes_follow_weight_quantize_nodes_and_casts_and_skip_unnamed_nodes() -> None:
    """Weights quantized by a QuantizeLinear in the graph (QAT exports), a Cast between the DQ and the
    GEMM (FP16 conversion), a weight-only INT4 MatMul and an unnamed GEMM."""
    rng = np.random.default_rng(5)
    int4_weight = np.clip(np.round(rng.standard_normal((8, 4)) * 3), -8, 7).astype(np.int8)
    initializers = [
        numpy_helper.from_array(model_builders.randn(rng, 4, 4, 3, 3), "w"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        helper.make_tensor("w4", TensorProto.INT4, [8, 4], int4_weight.flatten().tolist()),
        numpy_helper.from_array(np.array(0.1, np.float16), "s4"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="xd"),
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="wq"),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="wd"),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Conv", ["x", "wd"], ["y_unnamed"], pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["w4", "s4"], ["w4d"], name="w4d"),
        helper.make_node("Cast", ["w4d"], ["w4f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["a", "w4f"], ["b"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("y_unnamed", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    assert quantized_nodes_from_model(model) == {"conv": "int8", "mm": WEIGHT_ONLY_INT4}
    assert qdq_nodes_from_model(model) == {
        "xq": "QuantizeLinear", "xd": "DequantizeLinear", "wq": "QuantizeLinear",
        "wd": "DequantizeLinear", "w4d": "DequantizeLinear",
    }  # fmt: skip


def test_constant_and_layout_layers_named_after_a_dq_are_not_unfused() -> None:
    layers = read_layers(
        [
            {"Name": "w2 weights", "LayerType": "Constant", "Metadata": "[ONNX Layer: w2_DequantizeLinear]",
             "Inputs": [], "Outputs": [{"Name": "w2q", "Format/Datatype": "Int8"}]},
            {"Name": "r1 layout", "LayerType": "Reformat", "Metadata": "[ONNX Layer: r1_DequantizeLinear]",
             "Inputs": [{"Name": "r1q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
             "Outputs": [{"Name": "r1l", "Format/Datatype": "Row major Int8 format"}]},
        ]
    )  # fmt: skip
    check = check_engine(layers, {}, {"w2_DequantizeLinear": "DequantizeLinear", "r1_DequantizeLinear": ""})
    assert check.ok


def test_a_layer_casting_the_fp32_network_input_down_is_not_a_fallback_but_fp32_compute_on_it_is() -> None:
    def layer(name: str, output_type: str) -> dict[str, Any]:
        return {
            "Name": name, "LayerType": "kgen", "Metadata": f"[ONNX Layer: {name}]",
            "Inputs": [{"Name": "x", "Format/Datatype": "Float"}],
            "Outputs": [{"Name": f"{name}_out", "Format/Datatype": output_type}],
        }  # fmt: skip

    check = check_engine(read_layers([layer("cast_then_scale", "Half"), layer("normalize", "Float")]), {}, ())
    assert check.fp32_fallbacks == ["normalize"]


def test_unknown_high_precision_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="high_precision"):
        check_engine([], {}, (), high_precision="fp8")
