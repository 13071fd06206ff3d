"""The CLI end to end: outputs, summary, errors, and that nothing the user owns is lost."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import model_builders
import numpy as np
import onnx
import pytest

from onnxq.cli import main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_quantize_writes_default_output_and_summary(
    cnn: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    assert run_cli("quantize", model, "--calib", data) == 0
    output = model.with_name("cnn.int8.onnx")
    onnx.checker.check_model(str(output), full_check=True)
    printed = capsys.readouterr().out
    assert "quantized Conv" in printed and "size" in printed and "time" in printed


def test_explain_prints_plan_and_ranges(
    cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    assert run_cli("quantize", model, "--calib", data, "--explain", "-o", tmp_path / "q.onnx") == 0
    printed = capsys.readouterr().out
    assert "placement plan" in printed and "calibrated tensors" in printed
    assert "conv1" in printed and "tiny GEMM" in printed


def test_same_inputs_give_byte_identical_outputs_and_input_untouched(
    cnn: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = cnn
    before = sha256(model), sha256(data)
    for name in ("a.onnx", "b.onnx"):
        assert run_cli("quantize", model, "--calib", data, "--mode", "fp8", "-o", tmp_path / name) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (sha256(model), sha256(data)) == before


def test_compare_min_snr_is_a_check(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cnn
    quantized = tmp_path / "q.onnx"
    assert run_cli("quantize", model, "--calib", data, "-o", quantized) == 0
    assert run_cli("compare", model, quantized, "--data", data, "--min-snr", "20") == 0
    assert run_cli("compare", model, quantized, "--data", data, "--min-snr", "200") == 1


def leftovers(folder: Path, expected: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - expected


BAD_CASES = {
    "missing model": ("missing.onnx", None, "does not exist"),
    "not onnx": ("text.onnx", None, "not a valid ONNX model"),
    "missing input": ("cnn.onnx", {"y": np.zeros((2, 16, 16, 16), np.float32)}, "x"),
    "wrong rank": ("cnn.onnx", {"x": np.zeros((2, 16, 16), np.float32)}, "rank"),
    "nan": ("cnn.onnx", {"x": np.full((2, 16, 16, 16), np.nan, np.float32)}, "NaN"),
    "empty": ("cnn.onnx", {"x": np.zeros((0, 16, 16, 16), np.float32)}, "Fix:"),
    "wrong dtype": ("cnn.onnx", {"x": np.zeros((2, 16, 16, 16), np.int64)}, "dtype"),
    "wrong dim": ("cnn.onnx", {"x": np.zeros((2, 8, 16, 16), np.float32)}, "x"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_error_and_no_output(
    case: str, cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_name, arrays, expected = BAD_CASES[case]
    (tmp_path / "text.onnx").write_text("this is not a protobuf model\n" * 10)
    data = tmp_path / "bad.npz"
    np.savez(data, **(arrays or model_builders.cnn_inputs(0, 4)))
    before = {p.name for p in tmp_path.iterdir()}
    code = run_cli("quantize", tmp_path / model_name, "--calib", data, "-o", tmp_path / "out.onnx")
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("onnxq: error:") and "Fix:" in error
    assert expected in error
    assert leftovers(tmp_path, before) == set()


def test_pickled_data_is_refused_without_unpickling(
    cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = cnn
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.mkdir, (str(marker),))

    data = tmp_path / "evil.npz"
    np.savez(data, x=np.array([Payload()], dtype=object))
    assert run_cli("quantize", model, "--calib", data, "-o", tmp_path / "out.onnx") == 2
    assert "pickle" in capsys.readouterr().err.lower()
    pickled = tmp_path / "evil.pkl"
    pickled.write_bytes(pickle.dumps(Payload()))
    assert run_cli("quantize", model, "--calib", pickled, "-o", tmp_path / "out.onnx") == 2
    assert not marker.exists() and not (tmp_path / "out.onnx").exists()


def test_output_equal_to_input_is_refused(cnn: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, data = cnn
    before = sha256(model)
    assert run_cli("quantize", model, "--calib", data, "-o", model) == 2
    assert "is the input model" in capsys.readouterr().err
    assert sha256(model) == before


def test_unwritable_output_directory(
    cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    assert run_cli("quantize", model, "--calib", data, "-o", tmp_path / "nowhere" / "q.onnx") == 2
    assert "does not exist" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits
        pytest.skip("running as root: cannot make a directory unwritable")
    assert run_cli("quantize", model, "--calib", data, "-o", locked / "q.onnx") == 2


def test_op_that_ort_cannot_run_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = model_builders.residual_cnn()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, **model_builders.cnn_inputs(0, 4))
    assert run_cli("quantize", path, "--calib", data, "-o", tmp_path / "q.onnx") == 2
    error = capsys.readouterr().err
    assert "FancyRelu" in error and "--ort-custom-ops" in error
    assert not (tmp_path / "q.onnx").exists()


def test_console_script_module_entry(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cnn
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxq",
            "quantize",
            str(model),
            "--calib",
            str(data),
            "-o",
            str(tmp_path / "q.onnx"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "q.onnx").exists()


def test_min_snr_meets_a_target_or_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "cnn.onnx"
    onnx.save(model_builders.residual_cnn(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **model_builders.cnn_inputs(20, 8))
    baseline = tmp_path / "plain.onnx"
    assert run_cli("quantize", model, "--calib", calib, "-o", baseline) == 0
    capsys.readouterr()
    # a target the plain model already meets: no layer goes back to float, the model is written
    met = tmp_path / "met.onnx"
    assert run_cli("quantize", model, "--calib", calib, "-o", met, "--min-snr", "5") == 0
    assert "0 layer(s) returned to float" in capsys.readouterr().out
    assert met.is_file()
    # an unreachable target: one line naming the best SNR reached, and no output
    unreachable = tmp_path / "never.onnx"
    assert run_cli("quantize", model, "--calib", calib, "-o", unreachable, "--min-snr", "200") == 2
    error = capsys.readouterr().err.strip()
    assert "not reached: best" in error and len(error.splitlines()) == 1, error
    assert not unreachable.exists()
