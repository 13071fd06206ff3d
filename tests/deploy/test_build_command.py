"""``onnxq build`` without TensorRT: the one-line refusals, --print-trtexec, and nothing written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.cli import main

SHAPES = "x:1x16,4x16,8x16"


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """(FP32 model with a dynamic batch, its INT8 TensorRT quantization)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(model, fp32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((8, 16)).astype(np.float32))
    quantized = tmp_path / "int8.onnx"
    onnxq.quantize(fp32, mode="int8", calibration_data=data, output_path=quantized)
    return fp32, quantized


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _engines(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "engine" in p.name)


def test_without_tensorrt_one_line_and_no_engine(
    models: tuple[Path, Path], no_tensorrt: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _, quantized = models
    assert main(["build", str(quantized), "--shapes", SHAPES]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not available" in err[0] and "--print-trtexec" in err[0]
    assert _engines(quantized.parent) == []


def test_print_trtexec_needs_no_tensorrt(
    models: tuple[Path, Path], no_tensorrt: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fp32, quantized = models
    assert main(["build", str(quantized), "--shapes", SHAPES, "--print-trtexec", "--timing-cache", "t.cache"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("trtexec ") and "--stronglyTyped" in line and "--fp16" not in line
    assert "--minShapes=x:1x16" in line and "--maxShapes=x:8x16" in line and "--timingCacheFile=t.cache" in line
    assert main(["build", str(fp32), "--shapes", SHAPES, "--print-trtexec", "--hardware-compat"]) == 0
    line = capsys.readouterr().out.strip()
    assert "--fp16" in line and "--stronglyTyped" not in line and "--hardwareCompatibilityLevel=ampere+" in line
    assert _engines(quantized.parent) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no --shapes entry"),
        (["--shapes", SHAPES, "--bench"], "--fp16-baseline"),
        (["--shapes", SHAPES, "--fp16-baseline"], "--original"),
        (["--shapes", SHAPES, "--compare", "data.npz"], "--original"),
        (["--shapes", SHAPES, "--plugins", "missing.so"], "plugin library"),
        (["--shapes", SHAPES, "--opt-level", "9"], "out of range"),
        (["--shapes", "x:8x16,4x16,1x16"], "min"),
    ],
)
def test_bad_flags_are_refused_before_tensorrt(
    models: tuple[Path, Path], no_tensorrt: None, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    _, quantized = models
    assert main(["build", str(quantized), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert _engines(quantized.parent) == []
