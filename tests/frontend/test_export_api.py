"""``onnxq.frontend.export.export`` on small modules: exporters, dtypes, names, argument checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the front-end tests need torch (pip install 'onnxq[torch]')")

import onnx_ir as ir  # noqa: E402
from frontend_helpers import session  # noqa: E402

from onnxq.frontend import export  # noqa: E402


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.proj(x)))


def _block() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Block().eval()


def _input() -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    return session(path).run(None, {"x": x.numpy()})[0]


def test_dynamo_names_nodes_by_module_and_keeps_dynamic_axes(tmp_path: Path) -> None:
    path = export.export(_block(), _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                         dynamic_shapes={"x": {0: "batch"}})  # fmt: skip
    model = ir.load(path)
    names = {n.name for n in model.graph}
    assert "proj/Gemm" in names or "proj/MatMul" in names
    assert str(model.graph.inputs[0].shape[0]) == "batch"
    x = torch.randn(5, 16)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, x), _block()(x).numpy(), rtol=1e-5, atol=1e-5)
    assert all("stack_trace" not in key for n in model.graph for key in n.metadata_props)


def test_torchscript_is_the_fallback_when_dynamo_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(export, "_dynamo", broken)
    report = export.export_with_report(_block(), _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                                       dynamic_shapes={"x": {0: "batch"}})  # fmt: skip
    assert report.exporter == "torchscript" and report.errors[0].max_rel < 1e-5
    with torch.no_grad():
        np.testing.assert_allclose(
            _run(report.path, torch.ones(2, 16)), _block()(torch.ones(2, 16)).numpy(), atol=1e-5
        )
    model = ir.load(report.path)
    assert not [n for n in model.graph if n.op_type == "Constant"]


def test_both_exporters_failing_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(export, "_dynamo", broken)
    monkeypatch.setattr(export, "_torchscript", broken)
    with pytest.raises(export.OnnxqError, match="dynamo: cannot trace; torchscript: cannot trace"):
        export.export(_block(), _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"])
    assert list(tmp_path.iterdir()) == []


def test_fp16_is_checked_and_the_callers_module_untouched(tmp_path: Path) -> None:
    module = _block()
    report = export.export_with_report(module, _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                                       dtype="fp16")  # fmt: skip
    assert next(module.parameters()).dtype == torch.float32
    assert report.errors and report.errors[0].max_rel <= export.TOLERANCE["fp16"]
    assert ir.load(report.path).graph.inputs[0].dtype == ir.DataType.FLOAT16


def test_arguments_that_do_not_fit_are_programming_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 example inputs but 1 input names"):
        export.export(
            _block(), (_input(), _input()), tmp_path / "m.onnx", input_names=["x"], output_names=["y"]
        )
    with pytest.raises(ValueError, match="unknown inputs: z"):
        export.export(_block(), _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                      dynamic_shapes={"z": {0: "b"}})  # fmt: skip
    with pytest.raises(ValueError, match="outside rank 2"):
        export.export(_block(), _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                      dynamic_shapes={"x": {2: "b"}})  # fmt: skip


def test_bf16_that_onnx_runtime_cannot_run_is_written_unchecked(tmp_path: Path) -> None:
    report = export.export_with_report(_block(), _input(), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                                       dtype="bf16")  # fmt: skip
    assert report.path.is_file() and not report.errors
    assert "cannot run the bf16 model" in report.unchecked and report.lines() == [
        f"numerics not checked: {report.unchecked}"
    ]
    assert ir.load(report.path).graph.inputs[0].dtype == ir.DataType.BFLOAT16
