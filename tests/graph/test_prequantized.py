"""Models that already hold quantization (onnxq/graph/prequantized.py): refused, or kept as they are.

Before the fix, quantizing such a model put a second Q/DQ on tensors that were already quantized.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
import onnx.parser
import onnx_ir as ir
import pytest
from model_builders import build, randn, run, snr_db
from onnx import numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.graph import prequantized

Q, DQ = "QuantizeLinear", "DequantizeLinear"

#: conv1 is quantized (Q/DQ on x, an INT8 weight behind DQ); conv2 has only its input quantized (Q/DQ
#: on r, float weight: the planner would quantize it again); conv3 is still float
QDQ_MODEL = """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
    [x_q] xq = QuantizeLinear(x, x_scale, x_zp)
    [x_dq] xd = DequantizeLinear(xq, x_scale, x_zp)
    [w1_dq] w1d = DequantizeLinear<axis = 0>(w1_int8, w1_scale, w1_zp)
    [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(xd, w1d)
    [relu] r = Relu(c1)
    [r_q] rq = QuantizeLinear(r, r_scale, r_zp)
    [r_dq] rd = DequantizeLinear(rq, r_scale, r_zp)
    [conv2] c2 = Conv<pads = [1, 1, 1, 1]>(rd, w2)
    [relu2] r2 = Relu(c2)
    [conv3] y = Conv<pads = [1, 1, 1, 1]>(r2, w3)
}"""
#: tensors the existing quantization reads or writes: none may get another Q/DQ
EXISTING = {"x", "xq", "xd", "w1_int8", "w1d", "r", "rq", "rd"}


def qdq_model(seed: int = 120) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the partly quantized model, the float model it came from)."""
    rng = np.random.default_rng(seed)
    w1, w2, w3 = randn(rng, 32, 16, 3, 3), randn(rng, 32, 32, 3, 3), randn(rng, 32, 32, 3, 3)
    w1_scale = (np.abs(w1).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    w1_int8 = np.clip(np.rint(w1 / w1_scale[:, None, None, None]), -127, 127).astype(np.int8)
    int8_range = {"x_scale": 4.0 / 127, "r_scale": 2.0 / 127}
    quantized = build(
        QDQ_MODEL,
        {
            **{name: np.array(scale, np.float32) for name, scale in int8_range.items()},
            "x_zp": np.array(0, np.int8),
            "r_zp": np.array(0, np.int8),
            "w1_int8": w1_int8,
            "w1_scale": w1_scale,
            "w1_zp": np.zeros(32, np.int8),
            "w2": w2,
            "w3": w3,
        },
    )
    float_model = build(
        """g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
            [conv1] c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
            [relu] r = Relu(c1)
            [conv2] c2 = Conv<pads = [1, 1, 1, 1]>(r, w2)
            [relu2] r2 = Relu(c2)
            [conv3] y = Conv<pads = [1, 1, 1, 1]>(r2, w3)
        }""",
        {"w1": w1, "w2": w2, "w3": w3},
    )
    return quantized, float_model


def calibration(seed: int = 121) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((8, 16, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_quantized_model_is_refused_with_one_line(target: str) -> None:
    quantized, _ = qdq_model()
    with pytest.raises(OnnxqError) as error:
        onnxq.quantize(quantized, calibration_data=calibration(), target=target)
    assert error.value.problem == "the model is already quantized (3 DequantizeLinear, 2 QuantizeLinear)"
    assert "--keep-quantized" in error.value.fix


def test_refusal_names_the_file(tmp_path: Path) -> None:
    quantized, _ = qdq_model()
    path = tmp_path / "model.onnx"
    onnx.save(quantized, path)
    with pytest.raises(OnnxqError, match=r"^model\.onnx is already quantized"):
        onnxq.quantize(path, calibration_data=calibration(), output_path=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize(("mode", "target"), [("int8", "tensorrt"), ("fp8", "tensorrt"), ("int8", "ort")])
def test_keep_quantized_quantizes_only_what_is_still_float(mode: str, target: str) -> None:
    quantized, float_model = qdq_model()
    result = onnxq.quantize(
        quantized, mode=mode, target=target, calibration_data=calibration(), keep_quantized=True,
        high_precision="fp32",
    )  # fmt: skip
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    nodes = {n.name: n for n in proto.graph.node}
    producers = {out: n for n in proto.graph.node for out in n.output}
    # the existing quantization is untouched: same inputs, same INT8 weight behind the same DQ
    assert nodes["conv1"].input[:2] == ["xd", "w1d"] and nodes["conv2"].input[:2] == ["rd", "w2"]
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    np.testing.assert_array_equal(stored["w1_int8"], original["w1_int8"])
    # no second Q/DQ anywhere: only the file's own Q nodes read the tensors of the existing quantization
    assert {n.name for n in proto.graph.node if n.op_type == Q and n.input[0] in EXISTING} == {"x_q", "r_q"}
    assert result.plan.decision("conv2").category == prequantized.CATEGORY
    # what was float is quantized now: conv3's input and weight
    assert {producers[t].op_type for t in nodes["conv3"].input[:2]} == {DQ}
    feed = {"x": calibration(seed=122)["x"][:2]}
    reference = run(float_model, feed)[0]
    # as accurate as the worse of its two parts: the file's own INT8 layer, onnxq's grid for the rest
    fresh = onnxq.quantize(float_model, mode=mode, target=target, calibration_data=calibration()).model
    parts = (run(quantized, feed)[0], run(ir.serde.serialize_model(fresh), feed)[0])
    assert snr_db(reference, run(proto, feed)[0]) > min(snr_db(reference, p) for p in parts) - 3


def test_float_model_passes_through_unchanged_by_the_check() -> None:
    _, float_model = qdq_model()
    result = onnxq.quantize(float_model, calibration_data=calibration())
    assert not [d for d in result.plan.decisions if d.category == prequantized.CATEGORY]


SUBGRAPH_AND_CONTRIB = """<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
g (bool c, float[4, 8] x, uint8[4, 8] a, uint8[8, 8] b) => (float[4, 8] y, int32[4, 8] z, float[4, 8] u) {
    y = If(c) <
        then_branch = t () => (float[4, 8] o) { o = Relu(x) },
        else_branch = e () => (float[4, 8] o) {
            ai = MatMulInteger(a, b)
            o = Cast<to = 1>(ai)
        }
    >
    z = MatMulInteger(a, b)
    u = com.microsoft.MatMulNBits<K = 8, N = 8, bits = 4, block_size = 16>(x, packed, scales)
}"""


def test_quantized_ops_are_found_in_subgraphs_and_contrib_domains() -> None:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(SUBGRAPH_AND_CONTRIB))
    found = prequantized.quantized_nodes(model)
    assert Counter(n.op_type for n in found) == {"MatMulInteger": 2, "MatMulNBits": 1}
    assert prequantized.summary(found) == "2 MatMulInteger, 1 MatMulNBits"


@pytest.mark.parametrize(
    ("op", "quantized"),
    [
        ("QLinearConv", True),
        ("QLinearAdd", True),
        ("DynamicQuantizeLSTM", True),
        ("DynamicQuantizeLinear", True),
        ("DequantizeLinear", True),
        ("QuantizeLinear", True),
        ("ConvInteger", True),
        ("MatMulNBits", True),
        ("GatherBlockQuantized", True),
        ("Conv", False),
        ("MatMul", False),
        ("LSTM", False),
        ("Quantile", False),
    ],
)
def test_is_quantized_op(op: str, quantized: bool) -> None:
    assert prequantized.is_quantized_op(ir.Node("", op, [])) is quantized


REAL_MODELS = Path.home() / ".cache" / "onnxq-realmodels"
DDDDOCR_OLD = REAL_MODELS / "ddddocr_common_old.onnx"


def real_calibration(tmp_path: Path, name: str) -> Path:
    """4 synthetic feeds of the manifest's example shape, one .npz each."""
    entry = next(e for e in json.loads((REAL_MODELS / "manifest.json").read_text()) if e["name"] == name)
    rng = np.random.default_rng(123)
    folder = tmp_path / "calib"
    folder.mkdir()
    for index in range(4):
        feed = {
            s["name"]: (0.5 * rng.standard_normal(s["example_shape"])).astype(s["dtype"])
            for s in entry["inputs"]
        }
        np.savez(folder / f"{index}.npz", **feed)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not DDDDOCR_OLD.exists(), reason=f"real model not cached: {DDDDOCR_OLD}")
def test_real_dynamically_quantized_model(tmp_path: Path) -> None:
    """ddddocr's old OCR model holds ConvInteger and DynamicQuantizeLSTM: refused by default; with
    keep_quantized, no Q/DQ lands next to its quantized ops (the ORT target used to add 16)."""
    data = real_calibration(tmp_path, "ddddocr_common_old")
    with pytest.raises(OnnxqError, match=r"ddddocr_common_old\.onnx is already quantized \(.*ConvInteger"):
        onnxq.quantize(DDDDOCR_OLD, calibration_data=data)
    model = ir.load(DDDDOCR_OLD)
    existing = {v.name for n in prequantized.quantized_nodes(model) for v in (*n.inputs, *n.outputs) if v}
    for mode, target in [("int8", "tensorrt"), ("fp8", "tensorrt"), ("int8", "ort")]:
        output = tmp_path / f"{mode}-{target}.onnx"
        result = onnxq.quantize(
            DDDDOCR_OLD,
            mode=mode,
            target=target,
            calibration_data=data,
            keep_quantized=True,
            output_path=output,
        )
        proto = onnx.load(output)
        onnx.checker.check_model(proto, full_check=True)
        stacked = [n.name for n in proto.graph.node if n.op_type == Q and n.input[0] in existing]
        assert stacked == [], (mode, target)
        kept = prequantized.summary(prequantized.quantized_nodes(result.model))
        assert kept == prequantized.summary(prequantized.quantized_nodes(model)), (mode, target)


def test_cli_refuses_then_keeps_with_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxq.cli import main

    quantized, _ = qdq_model()
    model, data, output = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(quantized, model)
    np.savez(data, **calibration())
    assert main(["quantize", str(model), "--calib", str(data), "-o", str(output)]) != 0
    message = capsys.readouterr().err.strip()
    assert "model.onnx is already quantized (3 DequantizeLinear, 2 QuantizeLinear)" in message
    assert "Traceback" not in message and not output.exists()
    assert main(["quantize", str(model), "--calib", str(data), "-o", str(output), "--keep-quantized"]) == 0
    onnx.checker.check_model(onnx.load(output), full_check=True)
