"""The CLI's promises beyond the happy path: one line per error (never a traceback unless --debug),
every option checked before any work, fast --help, progress in logs, uncut --explain output."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import model_builders
import numpy as np
import onnx
import pytest
from test_cli import run_cli

import onnxq
from onnxq import progress
from onnxq.calibration.auto_method import AUTO_METHOD
from onnxq.calibration.methods import registered_methods
from onnxq.choices import CALIB_METHODS, DEFAULT_CALIB_MEMORY_MB
from onnxq.cli import main


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error
    assert len(error.splitlines()) == 1, error
    return error


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnxq {onnxq.__version__}"


def test_help_imports_nothing_heavy() -> None:
    """--help is built from onnxq.choices alone: no numpy, onnx, onnx_ir, ONNX Runtime or rich."""
    code = (
        "import sys, onnxq.cli; onnxq.cli.build_parser().format_help(); "
        "print(sorted(m for m in ('numpy', 'onnx', 'onnx_ir', 'onnxruntime', 'rich') if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_light_choices_match_the_implementations() -> None:
    from onnxq.calibration.calibrator import DEFAULT_MEMORY_LIMIT_MB
    from onnxq.choices import MODES as CLI_MODES
    from onnxq.choices import TARGETS
    from onnxq.modes import MODE_SPECS
    from onnxq.placement.rules import TARGETS as RULE_TARGETS

    assert set(CALIB_METHODS) - {AUTO_METHOD} <= set(registered_methods())
    assert DEFAULT_MEMORY_LIMIT_MB == DEFAULT_CALIB_MEMORY_MB
    assert tuple(MODE_SPECS) == CLI_MODES and TARGETS == RULE_TARGETS


BAD_OPTIONS = {
    "bad regex": (["--exclude-nodes", "conv("], "--exclude-nodes"),
    "unknown op type": (["--op-types", "Conv,Foo"], "'Foo'"),
    "op type spelled wrong": (["--op-types", "matmul"], "MatMul"),
    "zero memory": (["--calib-memory", "0"], "--calib-memory"),
    "negative memory": (["--calib-memory", "-10"], "--calib-memory"),
    "nan memory": (["--calib-memory", "nan"], "--calib-memory"),
    "zero batch": (["--calib-batch-size", "0"], "--calib-batch-size"),
    "percentile above 100": (["--calib-method", "percentile", "--percentile", "101"], "--percentile"),
    "missing overrides": (["--calib-overrides", "nope.json"], "override file nope.json"),
    "missing patterns": (["--patterns", "nope.toml"], "--patterns"),
    "cache folder missing": (["--calib-cache", "no/such/folder/cache.json"], "--calib-cache"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_is_one_line_before_any_work(
    case: str,
    cnn: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = cnn
    monkeypatch.chdir(tmp_path)

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("onnxq.api.load_model", no_loading)
    options, expected = BAD_OPTIONS[case]
    assert run_cli("quantize", model, "--calib", data, *options, "-o", tmp_path / "q.onnx") == 2
    error = one_error_line(capsys)
    assert error.startswith("onnxq: error:") and "Fix:" in error and expected in error
    assert not (tmp_path / "q.onnx").exists()


def test_unexpected_error_is_one_line_with_debug_hint(
    cnn: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = cnn

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("something onnxq did not expect\nsecond line")

    monkeypatch.setattr("onnxq.api.quantize", broken)
    assert run_cli("quantize", model, "--calib", data) == 2
    error = one_error_line(capsys)
    assert "RuntimeError: something onnxq did not expect" in error and "--debug" in error
    assert run_cli("quantize", model, "--calib", data, "--debug") == 2
    assert "Traceback" in capsys.readouterr().err


def test_unavailable_provider_has_one_fix(
    cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    code = run_cli("quantize", model, "--calib", data, "--providers", "coreml", "-o", tmp_path / "q.onnx")
    assert code == 2
    error = one_error_line(capsys)
    assert error.count("Fix:") == 1 and "CoreMLExecutionProvider" in error


def long_named_cnn() -> onnx.ModelProto:
    """The residual CNN with node and tensor names far longer than a terminal line."""
    model = model_builders.residual_cnn()
    suffix = "/encoder/stage_3/block_17/some_very_long_exporter_generated_scope_name" * 2
    renames = {}
    for node in model.graph.node:
        node.name = node.name + suffix
        for index, name in enumerate(node.output):
            if name not in {o.name for o in model.graph.output}:
                renames[name] = name + suffix
                node.output[index] = renames[name]
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renames.get(name, name)
    return model


def test_explain_keeps_long_names_whole_when_piped_and_json_has_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "long.onnx"
    onnx.save(long_named_cnn(), model)
    data = tmp_path / "calib.npz"
    np.savez(data, **model_builders.cnn_inputs(1, 8))
    plan_file = tmp_path / "plan.json"
    args = (
        "quantize",
        model,
        "--calib",
        data,
        "--explain",
        "--explain-json",
        plan_file,
        "-o",
        tmp_path / "q.onnx",
    )
    assert run_cli(*args) == 0
    printed = capsys.readouterr().out
    document = json.loads(plan_file.read_text())
    assert document["decisions"] and document["ranges"]
    for decision in document["decisions"]:
        assert decision["node"] in printed  # whole, on one line: it can be pasted back
    for tensor, found in document["ranges"].items():
        assert tensor in printed
        low, high = found["chosen"]
        assert low <= high
    quantized_nodes = {d["node"] for d in document["decisions"] if d["quantized"]}
    assert quantized_nodes and all(d["tensors"] for d in document["decisions"] if d["quantized"])


def test_explain_json_in_missing_folder_fails_before_work(
    cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    code = run_cli(
        "quantize",
        model,
        "--calib",
        data,
        "--explain-json",
        tmp_path / "no" / "p.json",
        "-o",
        tmp_path / "q.onnx",
    )
    assert code == 2
    assert "--explain-json" in one_error_line(capsys)
    assert not (tmp_path / "q.onnx").exists()


def test_progress_logs_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    ticks = iter(float(t) for t in range(0, 1000, 4))  # every step takes 4 s of the fake clock
    with caplog.at_level(logging.INFO, logger="onnxq.progress"):
        items = list(progress._logged(range(10), "pass", 10, lambda: next(ticks), "batches"))
    assert items == list(range(10))
    lines = [r.getMessage() for r in caplog.records if r.name == "onnxq.progress"]
    assert lines[0] == "pass: started (10 batches)"
    assert lines[-1].startswith("pass: done, 10 batches")
    # rate-limited: one line per LOG_INTERVAL_S (10 s) of a 40 s run, not one per step
    middle = lines[1:-1]
    assert 2 <= len(middle) <= 4 and all("left" in line for line in middle)


def test_cli_shows_progress_at_default_verbosity(
    cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    logging.getLogger("onnxq.progress").setLevel(logging.NOTSET)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        assert run_cli("quantize", model, "--calib", data, "-o", tmp_path / "q.onnx") == 0
    finally:
        root.removeHandler(handler)
    assert "calibration pass 1 (ranges): started" in capsys.readouterr().err


def test_compare_models_with_different_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "a.onnx"
    onnx.save(model_builders.residual_cnn(), first)
    other = model_builders.residual_cnn()
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if name == "x" else name for name in node.input]
    second = tmp_path / "b.onnx"
    onnx.save(other, second)
    data = tmp_path / "d.npz"
    np.savez(data, **model_builders.cnn_inputs(1, 4))
    assert run_cli("compare", first, second, "--data", data) == 2
    assert "different inputs" in one_error_line(capsys)


def test_compare_warns_on_an_all_zero_output_and_on_fp8_convs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    model = model_builders.build(
        """
        g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = Relu (c)
        }
        """,
        {"w": -np.abs(model_builders.randn(rng, 16, 16, 3, 3))},
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.abs(rng.standard_normal((4, 16, 8, 8))).astype(np.float32))  # Relu(negative) = 0
    quantized = tmp_path / "q.onnx"
    assert (
        run_cli("quantize", path, "--calib", data, "--mode", "fp8", "--op-types", "Conv", "-o", quantized)
        == 0
    )
    capsys.readouterr()
    assert run_cli("compare", path, quantized, "--data", data) == 0
    error = capsys.readouterr().err
    assert "100.0% of the FP32 values are zero" in error
    assert "FP8" in error and "BASIC" in error


@pytest.mark.parametrize("written", ["-o", "--calib-cache"])
def test_files_the_run_reads_are_never_overwritten(
    written: str, cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn
    overrides = tmp_path / "overrides.json"
    overrides.write_text("{}")
    for victim in (data, overrides, model):
        before = victim.read_bytes()
        args = ["quantize", model, "--calib", data, "--calib-overrides", overrides]
        args += [written, victim] if written == "-o" else ["--calib-cache", victim, "-o", tmp_path / "q.onnx"]
        assert run_cli(*args) == 2
        error = one_error_line(capsys)
        assert "overwrite" in error or "is the input model" in error
        assert victim.read_bytes() == before
