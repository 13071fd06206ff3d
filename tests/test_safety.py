"""Files through the CLI: self-contained external-data outputs, input protection, hostile external-data
locations, output paths that cannot be written, and temporary folders left by killed runs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import model_builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq import model_io, temporaries
from onnxq.cli import main


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("onnxq: error:") and "Fix:" in error and "Traceback" not in error
    return error


def listing(folder: Path) -> set[str]:
    """Every entry below ``folder``, hidden temporary folders included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def save_external(folder: Path, name: str = "model.onnx", location: str | None = None) -> Path:
    """The residual CNN saved as torch's dynamo exporter does: every tensor in ``<name>.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(
        model_builders.residual_cnn(),
        path,
        save_as_external_data=True,
        location=location or f"{name}.data",
        size_threshold=0,
    )
    return path


def calib(folder: Path) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **model_builders.cnn_inputs(1, 8))
    return path


def set_location(path: Path, tensor: str, location: str) -> None:
    """Point one external tensor of the saved model at another file (offset 0)."""
    proto = onnx.load(path, load_external_data=False)
    (found,) = [t for t in proto.graph.initializer if t.name == tensor]
    for entry in found.external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "offset":
            entry.value = "0"
    onnx.save_model(proto, path)


def locations(path: Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    found = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        found.update(e.value for e in tensor.external_data if e.key == "location")
    return found


# --- item 2: external-data outputs load on their own ---------------------------------------------


@pytest.mark.parametrize("where", ["other folder", "same folder"])
def test_external_data_output_is_self_contained(where: str, tmp_path: Path) -> None:
    source = save_external(tmp_path / "in")
    data = calib(tmp_path)
    output = (tmp_path / "out" if where == "other folder" else tmp_path / "in") / "q.onnx"
    output.parent.mkdir(exist_ok=True)
    assert run_cli("quantize", source, "--calib", data, "-o", output) == 0
    assert locations(output) == {"q.onnx.data"}
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("q.onnx", "q.onnx.data"):
        shutil.move(output.parent / name, kept / name)
    shutil.rmtree(tmp_path / "in")  # the input and its data file are gone
    session = ort.InferenceSession(str(kept / "q.onnx"), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, model_builders.cnn_inputs(2, 2))
    assert result.shape == (2, 10) and np.isfinite(result).all()


def test_external_data_outputs_are_byte_identical(tmp_path: Path) -> None:
    source = save_external(tmp_path / "in")
    data = calib(tmp_path)
    output = tmp_path / "q.onnx"
    runs = []
    for _ in range(2):
        assert run_cli("quantize", source, "--calib", data, "-o", output) == 0
        runs.append((output.read_bytes(), model_io.data_path(output).read_bytes()))
    assert runs[0] == runs[1]


def test_file_size_counts_the_files_a_model_references(tmp_path: Path) -> None:
    source = save_external(tmp_path, "m.onnx", location="weights.bin")
    assert (
        model_io.model_file_size(source) == source.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(model_builders.residual_cnn(), plain)
    model_io.data_path(plain).write_bytes(b"stale data of an earlier run")
    assert model_io.model_file_size(plain) == plain.stat().st_size


# --- item 3: the input is never overwritten ------------------------------------------------------


def test_output_onto_the_inputs_data_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_external(tmp_path)
    weights = tmp_path / "model.onnx.data"
    data = calib(tmp_path)
    before = sha256(weights)
    assert run_cli("quantize", source, "--calib", data, "-o", weights) == 2
    assert "a file the input model references" in one_line_error(capsys)
    assert sha256(weights) == before


def test_output_whose_data_file_is_the_inputs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_external(tmp_path / "in", "model.onnx", location="q.onnx.data")
    weights = tmp_path / "in" / "q.onnx.data"
    data = calib(tmp_path)
    before = sha256(weights)
    assert run_cli("quantize", source, "--calib", data, "-o", tmp_path / "in" / "q.onnx") == 2
    assert "the output's data file" in one_line_error(capsys)
    assert sha256(weights) == before


def test_output_through_a_symlink_onto_input_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_external(tmp_path / "in")
    weights = tmp_path / "in" / "model.onnx.data"
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "q.onnx"
    link.symlink_to(weights)
    before = sha256(weights)
    assert run_cli("quantize", source, "--calib", calib(tmp_path), "-o", link) == 2
    one_line_error(capsys)
    assert sha256(weights) == before


# --- item 4: hostile or broken external data ------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of an external weight fails the test: refusals must come before reading."""

    def refuse(self: ir.ExternalTensor) -> None:
        raise AssertionError(f"external tensor {self.name} was read")

    monkeypatch.setattr(ir.ExternalTensor, "_load", refuse)


def traversal_case(case: str, tmp_path: Path) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 4096)
    source = save_external(tmp_path / "model")
    if case == "parent":
        set_location(source, "fcb", "../secret.bin")
    elif case == "absolute":
        set_location(source, "fcb", str(secret))
    elif case == "symlink":
        (tmp_path / "model" / "link.bin").symlink_to(secret)
        set_location(source, "fcb", "link.bin")
    elif case == "deep":
        set_location(source, "fcb", "../../../../../../../../etc/passwd")
    return source


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink", "deep"])
def test_external_location_outside_the_model_folder_is_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weight_reads: None
) -> None:
    source = traversal_case(case, tmp_path)
    data = calib(tmp_path)
    before = listing(tmp_path)
    assert run_cli("quantize", source, "--calib", data, "-o", tmp_path / "q.onnx") == 2
    error = one_line_error(capsys)
    assert "'fcb'" in error and ("leaves the model's folder" in error or "absolute" in error)
    assert listing(tmp_path) == before


def test_truncated_external_data_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weight_reads: None
) -> None:
    source = save_external(tmp_path)
    weights = tmp_path / "model.onnx.data"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 100)
    data = calib(tmp_path)
    before = listing(tmp_path)
    assert run_cli("quantize", source, "--calib", data, "-o", tmp_path / "q.onnx") == 2
    assert "truncated" in one_line_error(capsys)
    assert listing(tmp_path) == before


# --- item 5: every output is checked before it is renamed into place ------------------------------


def test_invalid_output_is_refused_and_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect anywhere upstream that writes a bad graph: the checker stops it, nothing is left."""
    write = model_io._write

    def write_broken(model: ir.Model, path: Path, data_name: str | None) -> str | None:
        output = model.graph.outputs[0]
        model.graph.append(ir.node("NoSuchOp", [output], name="broken"))
        return write(model, path, data_name)

    monkeypatch.setattr(model_io, "_write", write_broken)
    source = tmp_path / "cnn.onnx"
    onnx.save(model_builders.residual_cnn(), source)
    data = calib(tmp_path)
    before = listing(tmp_path)
    assert run_cli("quantize", source, "--calib", data, "-o", tmp_path / "q.onnx") == 2
    assert "failed the ONNX checker" in one_line_error(capsys)
    assert listing(tmp_path) == before


# --- item 7: output paths that cannot be written ---------------------------------------------------


def test_unwritable_output_paths_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "cnn.onnx"
    onnx.save(model_builders.residual_cnn(), source)
    data = calib(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    cases = {
        tmp_path / "folder": "is a directory",
        tmp_path / "afile" / "q.onnx": "is not a directory",
        tmp_path / "missing" / "q.onnx": "does not exist",
    }
    before = listing(tmp_path)
    for output, expected in cases.items():
        assert run_cli("quantize", source, "--calib", data, "-o", output) == 2
        assert expected in one_line_error(capsys)
    assert listing(tmp_path) == before

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert run_cli("quantize", source, "--calib", data, "-o", tmp_path / "q.onnx") == 2
    assert "cannot create a temporary folder" in one_line_error(capsys)
    assert listing(tmp_path) == before


# --- item 12: temporary folders of killed runs ------------------------------------------------------


def test_a_killed_save_leaves_a_folder_the_next_run_removes(tmp_path: Path) -> None:
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, pathlib\n"
            "from onnxq.temporaries import make_temporary\n"
            f"make_temporary(pathlib.Path({str(tmp_path)!r}), 'q.onnx')\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        check=False,
    )
    assert killed.returncode == -9
    (left,) = tmp_path.glob(".q.onnx.*.tmp")
    assert json.loads((left / temporaries.OWNER_MARKER).read_text())["pid"] > 0
    source = tmp_path / "cnn.onnx"
    onnx.save(model_builders.residual_cnn(), source)
    assert run_cli("quantize", source, "--calib", calib(tmp_path), "-o", tmp_path / "q.onnx") == 0
    assert not left.exists()
    assert not list(tmp_path.glob(".*.tmp"))
